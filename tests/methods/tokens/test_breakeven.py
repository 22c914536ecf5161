"""A token method says when it was measured to slow down a model like the one it is applied to (same method,
device type and backbone kind, nearest token count), and stays quiet where it was measured to pay."""

from __future__ import annotations

import pytest
from conftest import make_tiny_dit

import effdiff
from effdiff.methods.tokens.breakeven import ROWS, nearest, notice


def test_the_nearest_measurement_decides():
    assert nearest("tome", "cpu", "unet", 3000).tokens == 2304
    assert notice("tome", "cpu", "unet", 4096) is None  # 1.17x on sd15-arch at 512 px
    slower = notice("tome", "cpu", "dit", 200)
    assert slower and "0.78x" in slower and "tiny-dit" in slower and "200" in slower
    assert "H200" in notice("tome", "cuda", "unet", 4096)
    assert notice("todo", "mps", "unet", 4096) is None  # never measured there: nothing to say
    assert all(row.tokens > 0 and row.speedup > 0 and row.where for row in ROWS)


def test_accelerate_warns_and_describes_a_measured_slow_down():
    pipe = make_tiny_dit()
    with pytest.warns(UserWarning, match="tome was measured to slow down a dit"):
        effdiff.accelerate(pipe, "tome:ratio=0.5")
    assert "expect no speed-up" in pipe.effdiff.describe()
    pipe.effdiff.remove()
