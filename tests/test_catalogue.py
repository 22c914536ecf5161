from effdiff.catalogue import catalogue_rows, load_catalogue
from effdiff.registry import FAMILIES, implemented_arxiv_ids


def test_entries_are_well_formed():
    entries = load_catalogue()
    assert len(entries) > 150
    for e in entries:
        assert e["title"] and e["family"] in (*FAMILIES, "other")
        assert e["status"] in ("implemented", "planned", "out of scope")
        assert e["status"] != "out of scope" or e["reason"]


def test_implemented_is_derived_from_registry():
    ids = implemented_arxiv_ids()
    entries = load_catalogue()
    for e in entries:
        assert (e["status"] == "implemented") == bool(e["arxiv"] and e["arxiv"] in ids)
    ddim = next(e for e in entries if e["arxiv"] == "2010.02502")
    assert ddim["status"] == "implemented" and "ddim" in ddim["methods"]


def test_rows_filter():
    rows = catalogue_rows(status="implemented")
    assert rows and all(r["status"] == "implemented" and r["methods"] for r in rows)
    assert all(r["family"] == "quant" for r in catalogue_rows(family="quant"))
