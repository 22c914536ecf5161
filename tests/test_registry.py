import pytest

from effdiff.registry import FAMILIES, Method, Param, RecipeError, all_methods, get_method, methods_rows


def test_every_method_declares_metadata():
    methods = all_methods()
    expected = {"ddim", "dpmpp2m", "heun", "euler-a", "unipc", "deis", "pndm", "dpm2s", "dpm3s", "ays"}
    assert expected <= set(methods)
    for cls in methods.values():
        assert cls.family in FAMILIES
        assert cls.backbones and cls.devices
        assert cls.paper is not None and (cls.paper.arxiv or cls.paper.url) and cls.paper.title
        assert cls.__doc__ and (cls.paper.arxiv or cls.paper.title) in " ".join(cls.__doc__.split())


def test_unknown_method_suggests_close_name():
    with pytest.raises(RecipeError, match=r"did you mean 'dpmpp2m'.*valid methods: .*ddim"):
        get_method("dpmp2m")


def test_bad_param_lists_range_and_valid_params():
    cls = get_method("ddim")
    with pytest.raises(RecipeError, match=r"int in \[1, 1000\]"):
        cls(steps=0)
    with pytest.raises(RecipeError, match=r"did you mean 'steps'.*valid: steps"):
        cls(stpes=3)


def test_param_coercion():
    assert Param(bool, False).coerce("true") is True
    assert Param(int, 1, 0, 9).coerce("7") == 7
    assert Param(str, "a", choices=("a", "b")).coerce("b") == "b"
    for bad in ("x", 2.5, float("nan")):
        with pytest.raises(ValueError):
            Param(int, 1, 0, 9).coerce(bad) if bad != float("nan") else Param(float, 1.0).coerce(bad)


def test_subclass_registration_checks_family():
    with pytest.raises(TypeError, match="family"):
        type("Bogus", (Method,), {"name": "bogus-family", "family": "magic"})


def test_methods_rows_cover_registry():
    rows = methods_rows()
    assert [r["name"] for r in rows] == list(all_methods())
    ddim = next(r for r in rows if r["name"] == "ddim")
    assert ddim["arxiv"] == "2010.02502" and "steps=20" in ddim["params"]
