import pytest
import torch
from _fixtures import one_thread, tiny_pipeline

from effdiff.bench.generate import generate, grid_image, save_grid
from effdiff.bench.report import pareto_png, write_html
from effdiff.bench.runner import image_dir


def _row(recipe, speedup, fid, labels=()):
    return {"model": "m", "recipe": recipe, "torch_version": "t", "diffusers_version": "d",
            "effdiff_version": "e", "threads": 2, "dtype": "float32", "device": "cpu", "machine": "x",
            "metrics": {"speedup": speedup, "fid": fid, "fid_floor": 1.0, "psnr": 30.0, "nfe": 10,
                        "macs_per_image": 2e9, "labels": list(labels)}}


def test_html_has_table_grid_plot_and_labels(tmp_path):
    rows = [_row("", 1.0, 5.0), _row("deepcache:interval=3", 2.5, 7.0, ["trained"])]
    for row in rows:
        slug = "baseline" if not row["recipe"] else "deepcache_interval=3"
        save_grid(torch.rand(4, 1, 32, 32), image_dir(tmp_path, "run", "m") / f"{slug}.png")
    html = write_html(rows, "run", tmp_path).read_text()
    assert "<table>" in html and "deepcache:interval=3" in html and "2.50×" in html
    assert html.count("alt='grid ") == 2 and "alt='Pareto plot m'" in html
    assert "trained" in html and "data:image/png;base64," in html


def test_benchmark_figures_are_embedded_and_bad_ones_refused(tmp_path):
    import base64

    rows = [_row("", 1.0, 5.0)]
    figure = save_grid(torch.rand(2, 1, 8, 8), tmp_path / "breakeven.png")
    html = write_html(rows, "run", tmp_path, figures=[figure]).read_text()
    assert "Benchmark figures" in html and base64.b64encode(figure.read_bytes()).decode() in html
    assert "Benchmark figures" not in write_html(rows, "run", tmp_path).read_text()
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_html(rows, "run", tmp_path, tmp_path / "other.html", figures=[tmp_path / "missing.png"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a PNG"):
        write_html(rows, "run", tmp_path, tmp_path / "other.html", figures=[tmp_path / "notes.txt"])
    assert not (tmp_path / "other.html").exists()  # refused before anything is written


def test_benchmark_tables_show_their_scalar_columns_and_bad_ones_are_refused(tmp_path):
    import json

    rows = [_row("", 1.0, 5.0)]
    table = tmp_path / "distill_quality.json"
    table.write_text(json.dumps({"benchmark": "distill_quality", "when": "2026-12-06", "machine": "x", "rows": [
        {"model": "tiny-sd", "variant": "rectflow one-step", "fid": 2.2003, "student_training": {"wall": 1}},
        {"model": "tiny-dit", "variant": "lcm 4 steps", "fid": 3.47, "prompt_accuracy": 1.0}]}))
    html = write_html(rows, "run", tmp_path, tables=[table]).read_text()
    assert "Benchmark tables" in html and "distill_quality · 2026-12-06 · x" in html
    assert "<th>prompt_accuracy</th>" in html and "<td>2.2</td>" in html and "student_training" not in html
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json is not a benchmark result"):
        write_html(rows, "run", tmp_path, tmp_path / "other.html", tables=[tmp_path / "bad.json"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        write_html(rows, "run", tmp_path, tmp_path / "other.html", tables=[tmp_path / "missing.json"])
    assert not (tmp_path / "other.html").exists()


def test_accuracy_gets_its_own_pareto_plot_where_rows_have_it(tmp_path):
    rows = [_row("", 1.0, 5.0), _row("a", 2.0, 6.0)]
    assert "alt='Pareto plot m accuracy'" not in write_html(rows, "run", tmp_path).read_text()
    for row, accuracy in zip(rows, (1.0, 0.97), strict=True):
        row["metrics"]["prompt_accuracy"] = accuracy
    assert pareto_png(rows, "m", "prompt_accuracy").startswith(b"\x89PNG")
    assert "alt='Pareto plot m accuracy'" in write_html(rows, "run", tmp_path).read_text()


def test_pareto_plot_absent_without_quality():
    row = _row("", 1.0, None)
    row["metrics"]["psnr"] = None
    assert pareto_png([row], "m") is None
    assert pareto_png([_row("", 1.0, 5.0), _row("a", 2.0, 6.0)], "m").startswith(b"\x89PNG")


def test_grid_layout():
    img = grid_image(torch.zeros(10, 1, 8, 8), columns=4, pad=2)
    assert img.size == (4 * 10 + 2, 3 * 10 + 2)


@pytest.mark.usefixtures(one_thread.__name__)
def test_generate_writes_a_png(tmp_path):
    out = generate("m", "", "a handwritten one", 3, tmp_path / "g.png", seed=1, steps=2,
                   loader=tiny_pipeline)
    assert out.exists() and out.read_bytes().startswith(b"\x89PNG")


def test_catalogue_credits_a_method_with_its_own_speedup_not_a_stack(tmp_path):
    from effdiff.bench.report import markdown_table

    rows = [_row("", 1.0, 5.0), _row("deepcache:interval=3", 2.5, 7.0), _row("dpmpp2m:steps=20+deepcache", 6.0, 7.0),
            {**_row("deltadit", None, None), "metrics": {"labels": ["refused"], "refused": "unet only"}}]
    html = write_html(rows, "run", tmp_path).read_text()
    assert "Catalogue of the seed papers" in html and "deepcache: m 2.50×" in html and "deepcache: m 6.00×" not in html
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "refused: unet only" in table
