"""The one base class of the real-kernel precision methods (``bf16``/``fp16`` casts, the integer kernels)."""

from __future__ import annotations

from effdiff.registry import Method


class NativeQuant(Method):
    """A method that changes the dtype or kernels the denoiser *actually* runs with (not simulated).

    They all sit after the solver and before the caches and token methods (a cache stores what the
    quantized layers compute), and all say in ``describe`` what they changed (``report``). The simulated
    low-bit methods have their own base (``lowbit.base.QuantMethod``); both save in ``quant/saved.py``'s format.
    """

    tried_by_tune = True  # a real dtype or kernel swap: no knob to search, still a candidate

    family = "quant"
    after: tuple[str, ...] = ("solver",)
    before = ("cache", "tokens")

    def report(self) -> str:
        """What was changed, once applied ("" before)."""
        return ""

    def describe(self) -> str:
        report = self.report()
        return super().describe() + (f": {report}" if report else "")
