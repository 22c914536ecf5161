"""Markdown tables and the issue's target checks from the GPU run's scenes_results.json.

Usage: python tools/scenes_table.py scenes_results.json
"""

from __future__ import annotations

import json
import sys

from effdiff.zoo.scenes import CATEGORIES


def _cell(setting: dict, key: str) -> str:
    return f"{setting['mean'][key]:.3f} ± {setting['std'][key]:.3f}"


def tables(report: dict) -> str:
    """One table per model (setting × category, mean ± std over seeds), then the judge's accuracy."""
    lines = []
    for model, result in report["models"].items():
        if "error" in result:
            lines += [f"**{model}**: evaluation failed", "", "```", result["error"].strip(), "```", ""]
            continue
        record = result["record"]
        lines += [f"**{model}** ({record.get('parameters', 0):,} parameters, {record.get('steps_done')} steps, "
                  f"{record.get('wall_seconds')} s on {record.get('machine')}); guidance {report['guidance']}, "
                  f"{report['prompts']} prompts × {report['seeds']} seeds", "",
                  "| setting | " + " | ".join(CATEGORIES) + " | overall | s / seed |",
                  "|---" * (len(CATEGORIES) + 3) + "|"]
        for label, setting in result["settings"].items():
            cells = [_cell(setting, c) for c in (*CATEGORIES, "overall")]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {setting['seconds_per_seed']} |")
        lines.append("")
    accuracy = report["judge"]["heldout_accuracy"]
    lines.append("scene-judge held-out accuracy: " + ", ".join(f"{k} {v:.2%}" for k, v in accuracy.items()))
    return "\n".join(lines)


def targets(report: dict) -> list[tuple[str, bool]]:
    """The issue's targets, each with whether the run met it."""
    checks = [(f"judge {head} accuracy ≥ 95 %", value >= 0.95)
              for head, value in report["judge"]["heldout_accuracy"].items()]
    for model, result in report["models"].items():
        s = result.get("settings")
        if not s:
            checks.append((f"{model}: evaluated", False))
            continue
        overall = {label: (v["mean"]["overall"], v["std"]["overall"]) for label, v in s.items()}
        (m50, s50), (m5, s5) = overall["ddim-50"], overall["ddim-5"]
        checks += [
            (f"{model}: DDIM-50 + CFG overall {m50:.3f} ≥ 0.80", m50 >= 0.80),
            (f"{model}: DDIM-5 {m5:.3f} below DDIM-50 by > 3 std (the larger one: {max(s5, s50):.3f})",
             m50 - m5 > 3 * max(s5, s50)),
        ]
        for solver in ("dpm++-10", "unipc-10"):
            checks.append((f"{model}: {solver} {overall[solver][0]:.3f} > DDIM-10 {overall['ddim-10'][0]:.3f}",
                           overall[solver][0] > overall["ddim-10"][0]))
    return checks


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        data = json.load(handle)
    print(tables(data))
    print()
    for text, ok in targets(data):
        print(f"- [{'x' if ok else ' '}] {text}")
