import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from effdiff.recipe import RecipeError, build, check, order, parse, to_string
from effdiff.registry import Method, all_methods, get_method


def test_parse_string_with_params():
    (m,) = parse("dpmpp2m:steps=12,karras=true")
    assert m.name == "dpmpp2m" and m["steps"] == 12 and m["karras"] is True


def test_parse_list_and_instances_roundtrip():
    methods = parse([get_method("ddim")(steps=7), "ays:steps=5"])
    assert [m.name for m in methods] == ["ddim", "ays"]
    assert to_string(methods) == "ddim:steps=7+ays:steps=5"
    assert [m.spec() for m in parse(to_string(methods))] == [m.spec() for m in methods]


def test_order_follows_declarations_not_writing_order():
    assert [m.name for m in build("ays+euler")] == ["euler", "ays"]


def test_order_detects_contradiction():
    a = type("OrderA", (Method,), {"family": "cache", "after": ("order-b",)})()
    b = type("OrderB", (Method,), {"family": "cache", "after": ("order-a",)})()
    a.name, b.name = "order-a", "order-b"
    with pytest.raises(RecipeError, match="contradict"):
        order([a, b])


def test_every_pair_the_checks_accept_has_an_order():
    """Declared constraints never contradict for two registered methods (``compile`` with a parallel method once
    did: each declared itself before the other), and compile goes before what decides per call in Python."""
    names = sorted(all_methods())
    unordered = []
    for a, b in itertools.permutations(names, 2):
        try:
            build(f"{a}+{b}")
        except RecipeError as exc:
            if "contradict" in str(exc):
                unordered.append((a, b))
    assert unordered == []
    assert [m.name for m in build("seqparallel+compile")] == ["compile", "seqparallel"]


@pytest.mark.parametrize(("text", "message"), [
    ("ddim+euler", "cannot be stacked: both take over the scheduler"),
    ("ddim+ddim", "listed twice"),
    ("ddim+", "empty method"),
    ("ddim:steps", "expected key=value"),
    ("ddim:steps=3,steps=4", "given twice"),
    ("ddim:", "nothing after"),
    ("ddim:steps=abc", "expected int"),
])
def test_refusals_are_sentences(text, message):
    with pytest.raises(RecipeError, match=message):
        build(text)


def test_backbone_and_device_refused_before_compute():
    unet_only = type("UNetOnly", (Method,), {"family": "cache", "backbones": frozenset({"unet"})})()
    unet_only.name = "unet-only"  # an instance name: not registered globally
    with pytest.raises(RecipeError, match="supports unet backbones, not PixArt"):
        build([unet_only], kind="dit", backbone_name="PixArtTransformer2DModel")
    with pytest.raises(RecipeError, match="runs on"):
        build("ddim", device="xpu")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("dimpeulr2+:=,.-_ 0123456789aystrkTF")), max_size=40))
def test_parser_never_crashes(text):
    try:
        methods = build(text)
    except RecipeError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert all(isinstance(m, Method) for m in methods)


@pytest.mark.parametrize("text, expected", [
    ("dpm++", "dpmpp2m"), ("deepcache+dpm++", "deepcache+dpmpp2m"), ("dpm+++deepcache", "dpmpp2m+deepcache"),
    ("DPM++2M:steps=10", "dpmpp2m:steps=10"), ("dpmpp+deepcache:interval=2", "dpmpp2m+deepcache:interval=2"),
])
def test_aliases_with_a_plus_are_not_split(text, expected):
    assert to_string(parse(text)) == expected


def test_a_method_is_refused_on_stream_layouts_it_does_not_declare():
    """Every registered method covers every layout today; the check still names what a narrower one lacks."""
    method = get_method("tome")()
    method.streams = frozenset({"single"})
    with pytest.raises(RecipeError, match="works on single-stream blocks; Flux has concat/joint-stream blocks"):
        check([method], streams=frozenset({"single", "joint", "concat"}), backbone_name="Flux")
    check([method], streams=frozenset({"single"}))
