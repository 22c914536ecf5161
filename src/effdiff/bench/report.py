"""Reports of one bench run: a rich terminal table and a single self-contained HTML file.

The HTML embeds everything (image grids and Pareto plots as base64 PNG) so it can be mailed or
attached to an issue as one file. Labels travel with every row: speed-only, simulated, trained.
"""

from __future__ import annotations

import base64
import html
import io
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from effdiff.bench.runner import STORE_NAME, image_dir, recipe_slug
from effdiff.bench.store import ResultsStore

COLUMNS = (  # (header, metrics key, format)
    ("speed-up", "speedup", "{:.2f}×"),
    ("s/image", "time_per_image_s", "{:.3f}"),
    ("NFE", "nfe", "{:d}"),
    ("GMACs/img", "macs_per_image", "gmac"),
    ("GFLOP/s", "gflops_achieved", "{:.1f}"),
    ("peak MB", "peak_memory_mb", "{:.0f}"),
    ("PSNR", "psnr", "{:.2f}"),
    ("SSIM", "ssim", "{:.3f}"),
    ("FID", "fid", "{:.2f}"),
    ("FID floor", "fid_floor", "{:.2f}"),
    ("KID", "kid", "{:.4f}"),
    ("acc", "prompt_accuracy", "{:.1%}"),
)


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt == "gmac":
        return f"{value / 1e9:.3f}"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _labels(metrics: dict[str, Any]) -> str:
    text = ", ".join(metrics.get("labels") or [])
    return f"{text}: {metrics['refused']}" if metrics.get("refused") else text


HEADERS = ("model", "recipe", *[c[0] for c in COLUMNS], "labels")


def row_cells(row: dict[str, Any]) -> list[str]:
    """One result row as display strings, in ``HEADERS`` order (terminal, HTML and Markdown agree)."""
    m = row["metrics"]
    return [row["model"], row["recipe"] or "baseline", *[_fmt(m.get(k), f) for _, k, f in COLUMNS], _labels(m)]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (the README's bench section is generated from it)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def load_rows(out_dir: str | Path, run_id: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(run id, its rows) from ``out_dir``'s store; the latest run when no id is given."""
    with ResultsStore(Path(out_dir) / STORE_NAME) as store:
        run_id = run_id or store.latest_run()
        if run_id is None:
            raise ValueError(f"no bench runs stored in {Path(out_dir) / STORE_NAME}")
        return run_id, store.rows(run_id)


def print_table(rows: list[dict[str, Any]], console=None) -> None:
    """The results as a rich table in the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="effdiff bench (speed-ups: same run, same prompts and seeds)")
    for header in HEADERS:
        table.add_column(header, justify="left" if header in ("model", "recipe", "labels") else "right")
    for row in rows:
        table.add_row(*row_cells(row))
    (console or Console(width=None if sys.stdout.isatty() else 200)).print(table)


def _png_b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def pareto_png(rows: list[dict[str, Any]], model: str) -> bytes | None:
    """Speed-up vs FID (or PSNR without FID) for one model's recipes; None for speed-only models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["metrics"].get("speedup"), r["metrics"], r["recipe"] or "baseline") for r in rows
              if r["model"] == model]
    key = "fid" if all(m.get("fid") is not None for _, m, _ in points) else "psnr"
    points = [(s, m[key], name) for s, m, name in points if s is not None and m.get(key) is not None]
    if not points:
        return None
    lower_better = key == "fid"
    front = [p for p in points if not any(
        q is not p and q[0] >= p[0] and (q[1] <= p[1] if lower_better else q[1] >= p[1])
        and (q[0], q[1]) != (p[0], p[1]) for q in points)]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue")
    front.sort()
    ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", lw=1, label="Pareto front")
    for s, v, name in points:
        ax.annotate(name, (s, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
    floor = next((r["metrics"].get("fid_floor") for r in rows if r["model"] == model), None)
    if key == "fid" and floor is not None:
        ax.axhline(floor, color="grey", ls="--", lw=1, label="real-vs-real floor")
    ax.set_xlabel("speed-up vs baseline (×)")
    ax.set_ylabel("FID (lower is better)" if key == "fid" else "PSNR vs baseline, dB")
    ax.set_title(model)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _table_html(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row_cells(row)) + "</tr>" for row in rows]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _best_speedups(rows: list[dict[str, Any]]) -> dict[str, str]:
    """{method name: best measured speed-up per model in this run} over recipes of that method alone.

    Stacks are left out so a method is not credited with a solver's share of a combined speed-up.
    """
    best: dict[tuple[str, str], float] = {}
    for row in rows:
        speedup = row["metrics"].get("speedup")
        if speedup is None or not row["recipe"] or "+" in row["recipe"]:
            continue
        key = (row["recipe"].split(":", 1)[0].strip(), row["model"])
        best[key] = max(best.get(key, 0.0), speedup)
    out: dict[str, list[str]] = {}
    for (name, model), value in sorted(best.items()):
        out.setdefault(name, []).append(f"{model} {value:.2f}×")
    return {name: ", ".join(values) for name, values in out.items()}


def _catalogue_html(rows: list[dict[str, Any]]) -> str:
    """Every method named in the seed papers with its status here and, when run, its measured speed-up."""
    from effdiff.catalogue import catalogue_rows

    measured = _best_speedups(rows)
    body = []
    for entry in catalogue_rows():
        names = [n for n in entry["methods"].split(",") if n]
        numbers = "; ".join(f"{n}: {measured[n]}" for n in names if n in measured)
        cells = (entry["title"], entry["arxiv"], entry["family"], entry["backbone"], entry["status"],
                 entry["methods"] or entry["reason"], numbers)
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("paper", "arXiv", "family", "backbone", "status",
                                              "methods / reason", "best speed-up in this run"))
    return (f"<h2>Catalogue of the seed papers</h2><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _env_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    r = rows[0]
    keys = ("torch_version", "diffusers_version", "effdiff_version", "threads", "dtype", "device", "machine")
    return "<p class='env'>" + " · ".join(f"{k}: {html.escape(str(r[k]))}" for k in keys) + "</p>"


def _figures_html(figures: Sequence[str | Path]) -> str:
    """Plots made by the benchmark scripts (e.g. token merging's break-even), embedded with their file name."""
    parts = []
    for figure in map(Path, figures):
        if not figure.is_file():
            raise FileNotFoundError(f"figure {figure} does not exist")
        if figure.suffix.lower() != ".png":
            raise ValueError(f"figure {figure} is not a PNG")
        name = html.escape(figure.name)
        parts.append(f"<figure><img class='plot' alt='{name}' src='{_png_b64(figure.read_bytes())}'>"
                     f"<figcaption>{html.escape(str(figure))}</figcaption></figure>")
    return "<h2>Benchmark figures</h2>" + "".join(parts) if parts else ""


def write_html(
    rows: list[dict[str, Any]], run_id: str, out_dir: str | Path, path: str | Path | None = None,
    figures: Sequence[str | Path] = (),
) -> Path:
    """One self-contained HTML file: table, per-model Pareto plot, per-recipe image grids, extra figures."""
    out_dir = Path(out_dir)
    path = Path(path) if path is not None else out_dir / f"report-{run_id}.html"
    figures_html = _figures_html(figures)  # a bad figure fails before anything is written
    parts = [f"<h1>effdiff bench — run {html.escape(run_id)}</h1>", _env_html(rows),
             "<p>Speed-ups are ratios against the baseline (DDIM, CFG, same steps) timed in the same process "
             "(warm, median of ≥ 3, alternating). PSNR/SSIM are measured against the baseline's own images; "
             "FID/KID against the 1,000 held-out digits, beside the real-vs-real floor: as many real training "
             "digits as samples, scored against the same reference. "
             "<b>speed-only</b>: random-weight twin, no quality; <b>simulated</b>: fake-quant without a "
             "low-bit kernel; <b>trained</b>: the recipe trains or calibrates.</p>",
             "<h2>Results</h2>", _table_html(rows)]
    for model in dict.fromkeys(r["model"] for r in rows):
        parts.append(f"<h2>{html.escape(model)}</h2>")
        plot = pareto_png(rows, model)
        if plot is not None:
            parts.append(f"<img class='plot' alt='Pareto plot {html.escape(model)}' src='{_png_b64(plot)}'>")
        else:
            parts.append("<p>speed-only model: no quality axis, no Pareto plot.</p>")
        for row in (r for r in rows if r["model"] == model):
            grid = image_dir(out_dir, run_id, model) / f"{recipe_slug(row['recipe'])}.png"
            if grid.exists():
                label = html.escape(f"{row['recipe'] or 'baseline'} {_labels(row['metrics'])}".strip())
                src = _png_b64(grid.read_bytes())
                parts.append(f"<figure class='grid'><img alt='grid {label}' src='{src}'>"
                             f"<figcaption>{label}</figcaption></figure>")
    parts.append(figures_html)
    parts.append(_catalogue_html(rows))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}.env{color:#555;font-size:12px}"
             "figure.grid{display:inline-block;margin:6px}img{image-rendering:pixelated}")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>effdiff bench {html.escape(run_id)}"
           f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path


def report(out_dir: str | Path, run_id: str | None = None, html_path: str | Path | None = None,
           console=None, figures: Sequence[str | Path] = ()) -> Path:
    """Print the table of a stored run and write its HTML report; returns the HTML path."""
    run_id, rows = load_rows(out_dir, run_id)
    print_table(rows, console)
    return write_html(rows, run_id, out_dir, html_path, figures)
