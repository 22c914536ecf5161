"""Reports of one bench run: a rich terminal table and a single self-contained HTML file.

The HTML embeds everything (image grids and Pareto plots as base64 PNG) so it can be mailed or
attached to an issue as one file. Labels travel with every row: speed-only, simulated, trained.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from effdiff.bench.runner import image_dir, recipe_slug, store_location
from effdiff.bench.store import ResultsStore


def _half_width(interval: Any) -> float | None:
    return (interval[1] - interval[0]) / 2 if isinstance(interval, (list, tuple)) and len(interval) == 2 else None


def _with_spread(fmt: str, spread_key: str | None = None, ci_key: str | None = None, scale: float = 1.0):
    """A cell ``value±spread``: the spread is a standard deviation over seeds or half a 95 % interval."""
    def cell(m: dict[str, Any], key: str) -> str:
        value = m.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        spread = m.get(spread_key) if spread_key else _half_width(m.get(ci_key)) if ci_key else None
        text = fmt.format(value * scale)
        return f"{text}±{fmt.format(spread * scale).lstrip('-')}" if spread is not None else text
    return cell


def _fid_delta(m: dict[str, Any], key: str) -> str:
    """FID minus the baseline's on the same seeds, ± half its paired 95 % interval, and the verdict."""
    delta, verdict = m.get("fid_delta"), m.get("fid_vs_baseline")
    if delta is None or verdict is None:
        return "–"
    spread = _half_width(m.get("fid_delta_ci"))
    word = {"higher": "worse", "lower": "better"}.get(verdict, verdict)
    return f"{delta:+.2f}±{spread:.2f} {word}" if spread is not None else f"{delta:+.2f} {word}"


COLUMNS = (  # (header, metrics key, format string or cell function)
    ("speed-up", "speedup", "{:.2f}×"),
    ("s/image", "time_per_image_s", "{:.3f}"),
    ("compile s", "compile_seconds", "{:.1f}"),  # the compiling first call minus a steady one (compile rows)
    ("NFE", "nfe", "{:d}"),
    ("GMACs/img", "macs_per_image", "gmac"),
    ("GFLOP/s", "gflops_achieved", "{:.1f}"),
    ("peak MB", "peak_memory_mb", "{:.0f}"),
    ("PSNR", "psnr", _with_spread("{:.2f}", spread_key="psnr_std")),
    ("SSIM", "ssim", _with_spread("{:.3f}", spread_key="ssim_std")),
    ("FID", "fid", "{:.2f}"),
    ("FID − base", "fid_delta", _fid_delta),
    ("FID floor", "fid_floor", "{:.2f}"),
    ("acc %", "prompt_accuracy", _with_spread("{:.1f}", ci_key="prompt_accuracy_ci", scale=100)),
)

LEGEND = ("± after PSNR/SSIM: standard deviation over the samples' seeds; after accuracy: half the 95 % bootstrap "
          "interval over the generated samples. FID − base: the difference to the baseline's FID on the same seeds, ± "
          "half its paired 95 % bootstrap interval; 'tie' when that interval holds 0 (FID alone gets no interval: "
          "resampling inflates it). KID is stored but not shown: with every digit asked equally often it reads "
          "negative even for real digits. FID floor: the FID of as many real training "
          "digits (same digit mix) against the same 1,000 held-out digits, i.e. what a perfect generator scores at "
          "this sample count (FID is biased upwards at small counts). Labels: noisy (the timed repetitions' speed-ups "
          "disagree by more than 20 %), drift (the baseline timed beside the recipe ran more than 20 % off the "
          "baseline row: the machine's speed changed, so compare speed-ups, not s/image across rows), "
          "loaded (other processes used more than half a core while timing), cost≠quality (the timed "
          "batch and the quality samples did different work), speed-only, simulated, trained, quick.")


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt == "gmac":
        return f"{value / 1e9:.3f}"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _cell(m: dict[str, Any], key: str, fmt: Any) -> str:
    return fmt(m, key) if callable(fmt) else _fmt(m.get(key), fmt)


def _labels(metrics: dict[str, Any]) -> str:
    text = ", ".join(metrics.get("labels") or [])
    return f"{text}: {metrics['refused']}" if metrics.get("refused") else text


HEADERS = ("model", "recipe", *[c[0] for c in COLUMNS], "labels")


def row_cells(row: dict[str, Any]) -> list[str]:
    """One result row as display strings, in ``HEADERS`` order (terminal, HTML and Markdown agree)."""
    m = row["metrics"]
    return [row["model"], row["recipe"] or "baseline", *[_cell(m, k, f) for _, k, f in COLUMNS], _labels(m)]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (the README's bench section is generated from it)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def _open(out_dir: str | Path, store: str | None = None) -> ResultsStore:
    return ResultsStore(store_location(out_dir, store), create=False)


def load_rows(out_dir: str | Path, run_id: str | None = None,
              store: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(run id, its rows) from ``out_dir``'s store (or ``store``); the latest run that stored rows when no id is
    given."""
    with _open(out_dir, store) as store:
        if run_id is not None:
            store.check_run(run_id)
        run_id = run_id or store.latest_run()
        if run_id is None:
            raise ValueError(f"no bench runs with results stored in {store.path}")
        rows = store.rows(run_id)
        if not rows:
            raise ValueError(f"run {run_id!r} stored no results yet; `effdiff report --list --out {out_dir}` shows "
                             "every run with its state")
        return run_id, rows


def list_runs(out_dir: str | Path, console=None, store: str | None = None) -> list[dict[str, Any]]:
    """Print every stored run: id, start, state, rows stored of expected, models; returns the summaries."""
    from rich.console import Console
    from rich.table import Table

    with _open(out_dir, store) as opened:
        runs = opened.summaries()
    table = Table(title=f"runs in {opened.path} (resume one with effdiff bench --resume RUN)")
    for header in ("run", "started (UTC)", "state", "rows", "models", "quick"):
        table.add_column(header, overflow="fold")
    for run in runs:
        rows = f"{run['rows']}/{run['expected']}" if run["expected"] else str(run["rows"])
        table.add_row(run["run_id"], run["started"][:19].replace("T", " "), run["state"], rows,
                      ", ".join(run["models"] or []), "yes" if run["quick"] else "")
    (console or Console(width=None if sys.stdout.isatty() else 160)).print(table)
    return runs


def run_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """Run-level sentences: a loaded machine, a quick run, rows whose timing disagrees with their samples."""
    notes = []
    loaded = [r for r in rows if "loaded" in (r["metrics"].get("labels") or [])]
    if loaded:
        worst = max(r["metrics"].get("foreign_cores") or 0 for r in loaded)
        notes.append(f"LOADED RUN: other processes kept up to {worst:.1f} cores busy while {len(loaded)} of "
                     f"{len(rows)} rows were timed; their speed-ups are not trustworthy (rerun on a quiet machine).")
    noisy = [r for r in rows if "noisy" in (r["metrics"].get("labels") or [])]
    if noisy:
        notes.append(f"{len(noisy)} of {len(rows)} rows are noisy (their timed repetitions disagree by more than "
                     "20 %); read their speed-ups as rough.")
    drifted = [r for r in rows if "drift" in (r["metrics"].get("labels") or [])]
    if drifted:
        notes.append(f"{len(drifted)} of {len(rows)} rows drift: the machine ran at another speed than during the "
                     "baseline row, so their s/image do not compare with it; their speed-ups (paired) do.")
    if any("quick" in (r["metrics"].get("labels") or []) for r in rows):
        notes.append("QUICK RUN: a smoke run (10 steps, 10 samples); its numbers do not rank methods.")
    return notes


def print_table(rows: list[dict[str, Any]], console=None) -> None:
    """The results as a rich table in the terminal; recipes wrap instead of being cut."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="effdiff bench (speed-ups: same run, same prompts and seeds)", caption=LEGEND)
    for header in HEADERS:
        left = header in ("model", "recipe", "labels")
        table.add_column(header, justify="left" if left else "right", overflow="fold",
                         min_width=24 if header == "recipe" else None)
    for row in rows:
        table.add_row(*row_cells(row))
    console = console or Console(width=None if sys.stdout.isatty() else 240)
    console.print(table)
    for note in run_warnings(rows):
        console.print(note)


def _png_b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


UNRELIABLE = ("noisy", "loaded", "cost≠quality")  # "drift" leaves a row's own paired speed-up intact


AXES = {"fid": "FID (lower is better)", "psnr": "PSNR vs baseline, dB",
        "prompt_accuracy": "prompt accuracy (higher is better)"}


def pareto_png(rows: list[dict[str, Any]], model: str, key: str | None = None) -> bytes | None:
    """Speed-up vs FID with 95 % intervals for one model's recipes that have both (PSNR when none has FID;
    ``key="prompt_accuracy"`` for speed-up vs accuracy).

    Points are numbered and named in a key beside the plot, so long recipe names never overlap. Rows
    marked noisy, loaded or cost≠quality are drawn hollow and kept off the front: their position is not
    a measurement to choose by. None when nothing can be plotted (a speed-only model).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["model"] == model and r["metrics"].get("speedup") is not None]
    key = key or ("fid" if any(r["metrics"].get("fid") is not None for r in mine) else "psnr")
    points = [(r["metrics"]["speedup"], r["metrics"][key], r["recipe"] or "baseline", r["metrics"]) for r in mine
              if r["metrics"].get(key) is not None]
    if not points:
        return None
    lower_better = key == "fid"
    reliable = [p for p in points if not set(p[3].get("labels") or ()) & set(UNRELIABLE)]
    front = sorted(p for p in reliable if not any(
        q is not p and q[0] >= p[0] and (q[1] <= p[1] if lower_better else q[1] >= p[1])
        and (q[0], q[1]) != (p[0], p[1]) for q in reliable))
    fig, (ax, key_ax) = plt.subplots(1, 2, figsize=(9.5, 4.2), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    for number, (speed, value, _, m) in enumerate(points, 1):
        ci, delta = m.get(f"{key}_delta_ci"), m.get(f"{key}_delta")  # paired interval, drawn around the point
        yerr = [[max(0.0, delta - ci[0])], [max(0.0, ci[1] - delta)]] if ci and delta is not None else None
        hollow = bool(set(m.get("labels") or ()) & set(UNRELIABLE))
        ax.errorbar([speed], [value], yerr=yerr, fmt="o", ms=6, capsize=3, color="tab:blue",
                    mfc="white" if hollow else "tab:blue")
        ax.annotate(str(number), (speed, value), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", lw=1, label="Pareto front")
    floor = next((r["metrics"].get("fid_floor") for r in mine if r["metrics"].get("fid_floor") is not None), None)
    if key == "fid" and floor is not None:
        ax.axhline(floor, color="grey", ls="--", lw=1, label="real-vs-real floor")
    ax.set_xlabel("speed-up vs baseline (×)")
    ax.set_ylabel(AXES.get(key, key))
    ax.set_title(model)
    ax.legend(fontsize=7)
    absent = [r["recipe"] or "baseline" for r in rows if r["model"] == model and r["metrics"].get(key) is None]
    lines = [f"{n}  {name}{' (unreliable)' if set(m.get('labels') or ()) & set(UNRELIABLE) else ''}"
             for n, (_, _, name, m) in enumerate(points, 1)]
    if key in ("fid", "prompt_accuracy"):
        lines += ["", "bars: paired 95 % interval of the difference", "to the baseline (same seeds)"]
    lines += ["hollow: noisy, loaded or cost≠quality (off the front)"]
    if absent:
        lines += ["", f"not plotted (no {key.upper()}: refused or speed-only):", *[f"   {a}" for a in absent]]
    key_ax.axis("off")
    key_ax.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=7, family="monospace", wrap=True)
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


def _scalar_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key holding a number, string or bool in any row, in first-seen order (nested records left out)."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update((k, None) for k, v in row.items() if isinstance(v, (int, float, str, bool)))
    return list(columns)


def _tables_html(tables: Sequence[str | Path]) -> str:
    """Result files of the benchmark scripts (a JSON object with ``rows``: the distilled students' and the
    compressed models' quality tables), each as an HTML table under its benchmark name, date and machine."""
    parts = []
    for table in map(Path, tables):
        if not table.is_file():
            raise FileNotFoundError(f"table {table} does not exist")
        try:
            result = json.loads(table.read_text())
            rows = result["rows"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"table {table} is not a benchmark result (a JSON object with rows)") from None
        columns = _scalar_columns(rows)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(row.get(c), '{:.4g}'))}</td>" for c in columns)
                       + "</tr>" for row in rows)
        about = " · ".join(html.escape(str(result[k])) for k in ("benchmark", "when", "machine") if k in result)
        parts.append(f"<h3>{html.escape(table.name)}</h3><p class='env'>{about}</p>"
                     f"<table><tr>{head}</tr>{body}</table>")
    return "<h2>Benchmark tables</h2>" + "".join(parts) if parts else ""


def write_html(
    rows: list[dict[str, Any]], run_id: str, out_dir: str | Path, path: str | Path | None = None,
    figures: Sequence[str | Path] = (), tables: Sequence[str | Path] = (),
) -> Path:
    """One self-contained HTML file: table, per-model Pareto plot, per-recipe image grids, extra figures and
    tables."""
    out_dir = Path(out_dir)
    path = Path(path) if path is not None else out_dir / f"report-{run_id}.html"
    figures_html = _figures_html(figures)  # a bad figure or table fails before anything is written
    tables_html = _tables_html(tables)
    warnings = "".join(f"<p class='warn'>{html.escape(note)}</p>" for note in run_warnings(rows))
    parts = [f"<h1>effdiff bench — run {html.escape(run_id)}</h1>", _env_html(rows), warnings,
             "<p>Speed-ups are ratios against the baseline (DDIM, CFG, same steps) timed in the same process "
             "(warm, median of ≥ 3, alternating). PSNR/SSIM are measured against the baseline's own images; "
             "FID/KID against the 1,000 held-out digits. "
             "<b>speed-only</b>: random-weight twin, no quality; <b>simulated</b>: fake-quant without a "
             "low-bit kernel; <b>trained</b>: the recipe trains or calibrates.</p>",
             "<h2>Results</h2>", _table_html(rows), f"<p class='legend'>{html.escape(LEGEND)}</p>"]
    for model in dict.fromkeys(r["model"] for r in rows):
        parts.append(f"<h2>{html.escape(model)}</h2>")
        plot = pareto_png(rows, model)
        if plot is not None:
            parts.append(f"<img class='plot' alt='Pareto plot {html.escape(model)}' src='{_png_b64(plot)}'>")
            accuracy = pareto_png(rows, model, "prompt_accuracy")
            if accuracy is not None:
                parts.append(f"<img class='plot' alt='Pareto plot {html.escape(model)} accuracy' "
                             f"src='{_png_b64(accuracy)}'>")
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
    parts.append(tables_html)
    parts.append(_catalogue_html(rows))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:nth-child(-n+2),td:last-child{text-align:left}.env{color:#555;font-size:12px}"
             "figure.grid{display:inline-block;margin:6px}img{image-rendering:pixelated}"
             ".warn{color:#a00;font-weight:bold}.legend{color:#444;font-size:12px;max-width:70em}")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>effdiff bench {html.escape(run_id)}"
           f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path


def report(out_dir: str | Path, run_id: str | None = None, html_path: str | Path | None = None,
           console=None, figures: Sequence[str | Path] = (), tables: Sequence[str | Path] = (),
           store: str | None = None) -> Path:
    """Print the table of a stored run and write its HTML report; returns the HTML path."""
    run_id, rows = load_rows(out_dir, run_id, store)
    print_table(rows, console)
    return write_html(rows, run_id, out_dir, html_path, figures, tables)
