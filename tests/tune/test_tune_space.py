"""The search space comes from the registry's declarations: slots by main resource, knobs by ``Param.search``;
a method that takes several resources closes the slots of the others, so no two methods on one resource are ever
proposed; methods that need something made first are left out with the reason; impossible stacks are refused
before compute; a hand-written recipe maps back to the trial that makes it."""

import optuna
import pytest

from effdiff.errors import RecipeError
from effdiff.registry import Param, all_methods
from effdiff.tune.space import NONE, Target, is_range, resources, searched, slots, suggest, without_unavailable
from effdiff.tune.study import params_of

UNET = Target("unet", "cpu", "UNet2DConditionModel", frozenset({"single"}))
DIT = Target("dit", "cpu", "PixArtTransformer2DModel", frozenset({"single"}))


def test_slots_follow_backbone_device_and_resource():
    unet, dit = slots(UNET), slots(DIT)
    assert "deepcache" in unet["block outputs"] and "deepcache" not in sum(dit.values(), [])  # a U-Net method
    assert "fp8" not in sum(unet.values(), [])  # CUDA only
    assert {"dpmpp2m", "lcm"} <= set(unet["scheduler"])  # a student takes the scheduler, as a solver does
    for space in (unet, dit):
        methods = sum(space.values(), [])
        assert len(methods) == len(set(methods))  # one slot per method
        assert not {"cfgparallel", "compile", "ays", "ptq"} & set(methods)  # ranks, minutes, no knob, simulated
    assert "compile" in sum(slots(UNET, include=("compile",)).values(), [])
    assert "fora" not in sum(slots(UNET, exclude=("fora",)).values(), [])
    assert "block outputs" not in slots(UNET, exclude=("cache",)) and "layer outputs" not in slots(
        UNET, exclude=("cache",))


def test_a_search_outside_the_valid_range_is_a_declaration_error():
    with pytest.raises(ValueError, match="expected int in"):
        Param(int, 3, 1, 10, search=(0, 4))
    with pytest.raises(TypeError, match=r"needs \(low, high\) or two or more values"):
        Param(float, 0.1, 0.0, 1.0, search=(0.1,))
    assert is_range(Param(int, 3, 1, 10, search=(2, 8))) and not is_range(Param(int, 10, 2, 200, search=(5, 8, 10)))


def test_a_method_without_a_searched_knob_is_tried_only_if_it_says_so():
    unet = set(sum(slots(UNET).values(), []))
    for name, cls in all_methods().items():
        if name in unet:
            assert searched(cls) or cls.tried_by_tune, name


def test_suggested_stacks_are_valid_recipes_within_the_baseline_steps():
    space = slots(UNET)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize"] * 2)
    recipes, refused = [], 0
    for _ in range(60):
        trial = study.ask()
        try:
            recipes.append(suggest(trial, space, max_steps=10))
        except RecipeError:
            refused += 1  # two methods whose order or resources clash: refused before anything runs
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    from effdiff.recipe import parse

    for recipe in recipes:
        for method in parse(recipe):
            assert method.values.get("steps", 0) <= 10 or method.family != "solver"
    assert len(set(recipes)) > 30 and refused < 30


@pytest.mark.parametrize("recipe", ["dpmpp2m:steps=20+deepcache:interval=3", "fbcache", "unipc:steps=10+int8",
                                    "lcm:steps=4", "dpmpp2m:steps=20+diffpruning+deepcache:interval=3"])
def test_a_hand_written_stack_is_enqueued_as_the_trial_that_suggests_it(recipe):
    from effdiff.recipe import build, to_string

    space = slots(UNET)
    params = params_of(recipe, space, max_steps=50)
    assert params is not None and sum(v != NONE for k, v in params.items() if k.startswith("slot:")) == len(
        recipe.split("+"))
    study = optuna.create_study(directions=["maximize"] * 2)
    study.enqueue_trial(params)
    assert suggest(study.ask(), space, max_steps=50) == to_string(build(recipe))


def test_a_stack_outside_the_space_is_not_enqueued():
    space = slots(UNET)
    assert params_of("unipc:steps=10", space, max_steps=6) is None  # more steps than the baseline
    assert params_of("deepcache:interval=20", space, max_steps=50) is None  # outside the searched range
    assert params_of("ptq", space, max_steps=50) is None  # not a candidate
    assert params_of("fora+taylorseer", space, max_steps=50) is None  # two in one slot
    assert params_of("not-a-method", space, max_steps=50) is None


@pytest.mark.parametrize("target", [UNET, DIT])
def test_no_suggested_stack_puts_two_methods_on_one_resource(target):
    space = slots(target)
    assert list(space).index("scheduler") < list(space).index("denoiser weights")  # a student's main slot first
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1), directions=["maximize"] * 2)
    students = 0
    for _ in range(150):
        trial = study.ask()
        try:
            recipe = suggest(trial, space, max_steps=50)
        except RecipeError as exc:
            assert "cannot be stacked" not in str(exc)
            continue
        finally:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        from effdiff.recipe import parse

        taken = [r for m in parse(recipe) for r in resources(m.name)]
        assert len(taken) == len(set(taken)), recipe
        if any(m.name in ("lcm", "progressive", "rectflow") for m in parse(recipe)):
            students += 1
            assert "slot:denoiser weights" not in trial.params  # closed, not suggested
    assert students > 10


def test_a_student_stack_maps_back_without_the_closed_slot():
    space = slots(UNET)
    params = params_of("lcm:steps=4+deepcache:interval=3", space, max_steps=50)
    assert params is not None and "slot:denoiser weights" not in params
    assert params_of("lcm:steps=4+diffpruning", space, max_steps=50) is None  # both take the denoiser weights


def test_methods_that_need_something_made_first_are_left_out_with_the_command(tmp_path):
    from effdiff.zoo.load import load

    pipe = load("tiny-dit")
    space, left_out = without_unavailable(slots(DIT), pipe)
    assert "laptop" in left_out and "effdiff compress tiny-dit --method laptop" in left_out["laptop"]
    kept = sum(space.values(), [])
    assert "laptop" not in kept and {"rectflow", "ditprune", "dpmpp2m"} <= set(kept)  # shipped ones stay
