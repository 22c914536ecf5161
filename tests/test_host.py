"""The host facts every timing's record carries: which SIMD extensions the CPU has, in a fixed order."""

from __future__ import annotations

import effdiff.host as host


def test_simd_lists_the_extensions_the_cpu_has_in_a_fixed_order(monkeypatch):
    fields = {"flags": "fpu amx_bf16 sse avx2 avx512f", "model name": "Some CPU"}
    monkeypatch.setattr(host, "_cpuinfo_field", lambda field: fields.get(field, ""))
    assert host.simd() == ["avx2", "avx512f", "amx_bf16"]
    assert host.cpu_description() == "Some CPU [avx2 avx512f amx_bf16]"
    fields.clear()
    assert host.simd() == [] and host.cpu_flags() == frozenset()


def test_a_machine_without_proc_cpuinfo_has_no_flags(monkeypatch):
    def missing(*_args, **_kwargs):
        raise OSError("no /proc")

    host._cpuinfo_field.cache_clear()
    monkeypatch.setattr("builtins.open", missing)
    try:
        assert host._cpuinfo_field("flags") == ""
    finally:
        monkeypatch.undo()
        host._cpuinfo_field.cache_clear()
