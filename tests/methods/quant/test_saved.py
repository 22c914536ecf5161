"""The one save format of both quantization packages: a file from one is read, or refused, by the other's reader."""

import pytest
import torch

import effdiff
from effdiff import RecipeError
from effdiff.methods.quant import saved


def test_round_trip_keeps_tensors_and_header(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {"a/codes": torch.arange(6, dtype=torch.uint8), "b": torch.randn(2, 3)}
    size = saved.write(path, tensors, {"method": "ptq", "layers": {"a": {"wbits": 4}}})
    assert size == path.stat().st_size
    back, header = saved.read(path, "ptq")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert header["layers"] == {"a": {"wbits": 4}} and header["format"] == saved.FORMAT


def test_a_header_without_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="method"):
        saved.write(tmp_path / "x.safetensors", {"b": torch.zeros(1)}, {"layers": {}})


def test_a_lowbit_calibration_is_refused_by_a_native_method_by_name(tiny_sd, tmp_path, fresh_quant_memo):
    path = tmp_path / "cal.safetensors"
    effdiff.accelerate(tiny_sd, "ptq:wbits=8,abits=16,prompts=2,steps=4")
    tiny_sd.effdiff.methods[0].save(str(path))
    tiny_sd.effdiff.remove()
    with pytest.raises(RecipeError, match="was saved by ptq, not int8wo"):
        effdiff.accelerate(tiny_sd, f"int8wo:load={path}")


def test_a_plain_safetensors_file_is_not_taken_for_a_saved_model(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(RecipeError, match="not written by effdiff"):
        saved.read(path, "int8")
