import pytest
import torch
from conftest import sample

import effdiff
from effdiff import RecipeError
from effdiff.api import is_accelerated


def test_remove_is_bit_identical(tiny_pipe):
    before = sample(tiny_pipe, steps=4)
    scheduler, cls = tiny_pipe.scheduler, type(tiny_pipe)
    effdiff.accelerate(tiny_pipe, "dpmpp2m:steps=3")
    accelerated = sample(tiny_pipe, steps=4)
    assert not torch.equal(before, accelerated)
    tiny_pipe.effdiff.remove()
    assert torch.equal(before, sample(tiny_pipe, steps=4))
    assert tiny_pipe.scheduler is scheduler and type(tiny_pipe) is cls
    assert not is_accelerated(tiny_pipe)
    denoiser = tiny_pipe.unet if hasattr(tiny_pipe, "unet") else tiny_pipe.transformer
    assert not denoiser._forward_pre_hooks


def test_recipe_steps_are_default_explicit_call_wins(tiny_sd):
    effdiff.accelerate(tiny_sd, "euler:steps=3")
    calls = []
    tiny_sd.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    tiny_sd("x", output_type="pt", guidance_scale=2.0)
    assert len(calls) == 3
    calls.clear()
    tiny_sd("x", num_inference_steps=2, output_type="pt", guidance_scale=2.0)
    assert len(calls) == 2


def test_describe_lists_methods(tiny_sd):
    effdiff.accelerate(tiny_sd, "unipc:steps=6,karras=true")
    text = tiny_sd.effdiff.describe()
    assert "unipc [solver]" in text and "steps=6" in text and "karras=true" in text
    assert tiny_sd.effdiff.recipe == "unipc:steps=6,karras=true"
    assert [m.name for m in tiny_sd.effdiff.methods] == ["unipc"]


def test_accelerating_again_stacks_or_refuses(tiny_sd):
    before = sample(tiny_sd)
    effdiff.accelerate(tiny_sd, "euler:steps=4")
    with pytest.raises(RecipeError, match="both take over the scheduler"):
        effdiff.accelerate(tiny_sd, "ddim")
    assert tiny_sd.effdiff.recipe == "euler:steps=4"
    tiny_sd.effdiff.remove()
    assert torch.equal(before, sample(tiny_sd))


def test_a_bare_denoiser_is_refused_with_what_to_pass(tiny_sd):
    with pytest.raises(TypeError, match="takes the pipeline, not its UNet2DConditionModel"):
        effdiff.accelerate(tiny_sd.unet, "fora")


def test_unsupported_backbone_refused():
    class Pipe:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(RecipeError, match="unsupported backbone Linear; supported: UNet2DConditionModel"):
        effdiff.accelerate(Pipe(), "ddim")


def test_failed_apply_leaves_pipe_untouched(tiny_sd, monkeypatch):
    from effdiff.methods.solvers.schedulers import SOLVER_CLASSES

    def boom(self, pipe, ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(SOLVER_CLASSES["deis"], "apply", boom)
    cls = type(tiny_sd)
    with pytest.raises(RuntimeError):
        effdiff.accelerate(tiny_sd, "euler+deis" if False else "deis")
    assert type(tiny_sd) is cls and not is_accelerated(tiny_sd)


def test_second_remove_is_a_no_op_and_describe_says_removed(tiny_sd):
    before = sample(tiny_sd, steps=3)
    effdiff.accelerate(tiny_sd, "deepcache:interval=2")
    handle = tiny_sd.effdiff
    tiny_sd.effdiff.remove()
    tiny_sd.effdiff.remove()  # the handle stays, inactive: no diffusers AttributeError
    assert handle is tiny_sd.effdiff and not is_accelerated(tiny_sd) and "removed" in tiny_sd.effdiff.describe()
    assert torch.equal(before, sample(tiny_sd, steps=3))
    effdiff.accelerate(tiny_sd, "deepcache:interval=2")  # a removed handle does not block a new recipe
    assert is_accelerated(tiny_sd) and tiny_sd.effdiff is not handle
    tiny_sd.effdiff.remove()


def test_asking_again_for_an_active_method_names_both_calls(tiny_sd):
    effdiff.accelerate(tiny_sd, "deepcache:interval=3")
    with pytest.raises(RecipeError, match=r"already active.*'deepcache'.*'deepcache:interval=2'") as exc:
        effdiff.accelerate(tiny_sd, "deepcache:interval=2")
    assert "listed twice" not in str(exc.value)
    with pytest.raises(RecipeError, match="listed twice in the recipe"):  # a recipe that really lists it twice
        effdiff.accelerate(tiny_sd, "ddim+ddim")
    tiny_sd.effdiff.remove()
