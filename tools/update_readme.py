"""Regenerate the README's generated sections: the methods table (from the registry and catalogue)
and the bench table (from a stored run), between ``<!-- NAME:start -->`` / ``<!-- NAME:end -->`` markers.

Usage: python tools/update_readme.py [--out effdiff-bench] [--run RUN_ID] [--command "effdiff bench"]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

from effdiff.bench.report import LEGEND, load_rows, markdown_table, run_warnings
from effdiff.catalogue import catalogue_rows
from effdiff.registry import methods_rows

README = Path(__file__).resolve().parents[1] / "README.md"


def methods_section() -> str:
    rows = methods_rows()
    lines = ["## Methods", "", f"{len(rows)} registered methods (`effdiff methods` prints them with every parameter's "
             "range). Backbones: `unet` (SD U-Nets), `dit` (PixArt, DiT, and the MMDiTs FLUX and SD3, whose joint "
             "blocks only the methods without a stream restriction handle).", "",
             "| method | family | backbones | defaults | paper |", "|---|---|---|---|---|"]
    for r in rows:
        defaults = ", ".join(p.split(" (", 1)[0] for p in re.split(r", (?=\w+=)", r["params"]) if p)
        backbones = r["backbones"] + ("" if r["streams"] == "concat,joint,single" else f" ({r['streams']}-stream)")
        source = f"arXiv {r['arxiv']}" if r["arxiv"] else r["url"]
        lines.append(f"| `{r['name']}` | {r['family']} | {backbones} | {defaults} | "
                     f"{r['paper']} ({source}, {r['venue']}) |")
    status = collections.Counter(c["status"] for c in catalogue_rows())
    lines += ["", f"The catalogue of the seed papers ({sum(status.values())} entries, data in "
              "`src/effdiff/catalogue/catalogue.json`): " + ", ".join(f"{n} {s}" for s, n in status.most_common())
              + ". `effdiff methods` lists each with its status or the reason it is out of scope."]
    return "\n".join(lines)


def bench_section(out: str, run: str | None, command: str) -> str:
    run_id, rows = load_rows(out, run)
    env = rows[0]
    return "\n".join([
        "## Latest bench", "",
        f"`{command}` (run `{run_id}`; torch {env['torch_version']}, diffusers {env['diffusers_version']}, "
        f"{env['threads']} threads, {env['dtype']}, {env['device']}, {env['machine']}). Speed-ups are ratios to "
        "the baseline (DDIM 50 steps, guidance 4) timed in the same process; PSNR/SSIM vs the baseline's images; "
        "FID vs the held-out digits beside the floor.", "",
        markdown_table(rows), "", *[f"**{note}**" for note in run_warnings(rows)], "", LEGEND,
    ])


def replace(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no <!-- {name}:start --> … <!-- {name}:end --> markers")
    return pattern.sub(lambda _: f"<!-- {name}:start -->\n{body}\n<!-- {name}:end -->", text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="effdiff-bench")
    parser.add_argument("--run")
    parser.add_argument("--command", default="effdiff bench")
    parser.add_argument("--no-bench", action="store_true")
    args = parser.parse_args()
    text = replace(README.read_text(), "methods", methods_section())
    if not args.no_bench:
        text = replace(text, "bench", bench_section(args.out, args.run, args.command))
    README.write_text(text)


if __name__ == "__main__":
    main()
