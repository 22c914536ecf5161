"""``tuned:NAME`` in a recipe: the stack ``effdiff tune`` saved under NAME, expanded where it is written."""

import pytest
from conftest import make_tiny_sd

from effdiff.api import accelerate
from effdiff.errors import RecipeError
from effdiff.recipe import parse
from effdiff.tuned import load_tuned, save_tuned, tuned_dir


def test_a_saved_stack_joins_a_written_one(private_cache):
    save_tuned("mine", {"recipe": "fora:interval=2", "model": "tiny-sd"})
    pipe = accelerate(make_tiny_sd(), "ddim:steps=4+tuned:mine")
    assert [m.spec() for m in pipe.effdiff.methods] == ["ddim:steps=4", "fora:interval=2"]
    assert load_tuned("mine")["name"] == "mine"


def test_an_unknown_name_lists_the_saved_ones(private_cache):
    with pytest.raises(RecipeError, match="none is saved in"):
        parse("tuned:other")
    save_tuned("mine", {"recipe": "fora"})
    with pytest.raises(RecipeError, match=r"no tuned recipe 'other' \(saved: mine\); make one with `effdiff tune"):
        parse("tuned:other")


@pytest.mark.parametrize("content", ["{not json", '{"model": "x"}', '{"recipe": "tuned:loop"}', '{"recipe": 3}'])
def test_a_broken_record_is_refused_with_its_path(content, private_cache):
    tuned_dir().mkdir(parents=True)
    (tuned_dir() / "bad.json").write_text(content)
    with pytest.raises(RecipeError, match="bad.json"):
        parse("tuned:bad")


@pytest.mark.parametrize("name", ["", "../up", "a b", "x" * 101])
def test_names_are_file_safe(name):
    with pytest.raises(RecipeError, match="a tuned recipe's name is letters"):
        save_tuned(name, {"recipe": "fora"})
