import pytest
import torch
from conftest import sample
from diffusers import HeunDiscreteScheduler

import effdiff


def _record(pipe):
    seen = []
    ctx = pipe.effdiff.context
    denoiser = pipe.effdiff.adapter.model
    handle = denoiser.register_forward_pre_hook(lambda m, a: seen.append(
        (ctx.step_index, ctx.call_index, ctx.total_steps, ctx.first_order, ctx.timestep)))
    return seen, handle


def test_ddim_steps_and_reset(tiny_pipe):
    effdiff.accelerate(tiny_pipe, "ddim:steps=4")
    seen, _ = _record(tiny_pipe)
    sample(tiny_pipe)
    assert [s[:3] for s in seen] == [(i, i, 4) for i in range(4)]
    assert [s[4] for s in seen] == tiny_pipe.effdiff.context.timesteps
    seen.clear()
    sample(tiny_pipe, steps=3)
    assert [s[:3] for s in seen] == [(i, i, 3) for i in range(3)]
    assert tiny_pipe.effdiff.context.cfg


def test_no_cfg_branch(tiny_sd):
    effdiff.accelerate(tiny_sd, "ddim")
    sample(tiny_sd, steps=2, guidance_scale=1.0)
    assert tiny_sd.effdiff.context.branch == "cond" and not tiny_sd.effdiff.context.cfg


def test_heun_two_calls_per_step(tiny_sd):
    effdiff.accelerate(tiny_sd, "heun:steps=3")
    assert isinstance(tiny_sd.scheduler, HeunDiscreteScheduler)
    seen, _ = _record(tiny_sd)
    sample(tiny_sd, steps=3)
    steps = [s[0] for s in seen]
    assert steps == [0, 0, 1, 1, 2]  # 2n-1 denoiser calls for n Heun steps
    assert [s[1] for s in seen] == list(range(5))
    assert [s[3] for s in seen] == [True, False, True, False, True]
    assert {s[2] for s in seen} == {3}


@pytest.mark.parametrize("recipe", ["ddim", "heun", "dpmpp2m"])
def test_img2img_partial_schedule(tiny_sd, recipe):
    effdiff.accelerate(tiny_sd, recipe)
    seen, _ = _record(tiny_sd)
    image = torch.zeros(1, 8, 8)
    sample(tiny_sd, steps=10, image=image, strength=0.5)
    order = 2 if recipe == "heun" else 1
    assert seen[0][:2] == (0, 0)
    assert {s[2] for s in seen} == {5}
    assert len(seen) == 5 * order - (order - 1)
    assert seen[-1][0] == 4



def test_a_stochastic_scheduler_still_gets_the_callers_generator_under_a_recipe(tiny_sd):
    """The step wrapper keeps ``scheduler.step``'s signature, which pipelines read to pass ``generator``: without it
    Euler ancestral (and LCM) drew from the global RNG and a seeded call was not reproducible."""
    import inspect

    import effdiff

    effdiff.accelerate(tiny_sd, "euler-a:steps=3")
    try:
        runs = [tiny_sd("a digit", output_type="pt", generator=torch.Generator().manual_seed(0)).images
                for _ in range(2)]
        assert "generator" in inspect.signature(tiny_sd.scheduler.step).parameters
        assert torch.equal(runs[0], runs[1])
    finally:
        tiny_sd.effdiff.remove()
