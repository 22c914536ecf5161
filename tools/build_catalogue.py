"""Regenerate src/effdiff/catalogue/catalogue.json from the seed lists.

Usage: python tools/build_catalogue.py [SEEDS_DIR]   (default /work/shared/seeds)

Extraction is pattern-based over the five list formats (markdown tables, bullets, HTML tables);
family, backbone and scope come from keyword heuristics on the section heading and the title.
"implemented" is never written here: ``effdiff.catalogue.load_catalogue`` derives it from the
registry.
"""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "effdiff" / "catalogue" / "catalogue.json"
ARXIV = re.compile(r"arxiv\.org/(?:abs|pdf)/(\d{4}\.\d{4,5})", re.I)
TITLES = [
    re.compile(r"\[\[[^\]]*?\*\*(?P<short>[^*]+)\*\*\]\([^)]*\)\]\s*:?\s*[\"“](?P<title>[^\"”]+)"),
    re.compile(r"<b>\[(?P<title>.+?)\]</b>"),
    re.compile(r"\[\*\*(?P<title>.+?)\*\*\]"),
    re.compile(r"\*\*\[\d+\]\s*(?P<title>.+?)\*\*"),
    re.compile(r"^\|\s*\[(?P<title>[^\]]+)\]\((?P<url>[^)]*)\)\s*\|"),
    re.compile(r"^\s*\*\s+(?P<title>[^\[]+?)\s*\[\[Paper\]\]"),
    re.compile(r"^\s*[-*]\s+\[(?P<title>[^\]\[]{12,})\]\((?P<url>https?://[^)]*arxiv[^)]*)\)"),
]
FAMILY_WORDS = [
    ("cache", ("cache", "caching", "reuse", "deepcache", "fora", "δ-dit", "delta-dit", "teacache",
               "taylorseer")),
    ("quant", ("quant", "bit ", "-bit", "ptq", "qat", "binar", "low-bit", "fp8", "int8", "int4")),
    ("prune", ("prun", "sparse", "sparsity", "slim", "compress")),
    ("tokens", ("token", "tome", "merg", "patch")),
    ("parallel", ("parallel", "distributed", "multi-gpu", "pipefusion", "distrifusion", "xdit")),
    ("distill", ("distill", "consistency", "one-step", "one step", "few-step", "rectified", "adversarial",
                 "gan", "instaflow", "flow matching", "shortcut")),
    ("compile", ("mobile", "on-device", "deploy", "hardware", "compil", "kernel", "tensorrt", "gpu",
                 "edge device", "fpga", "accelerator")),
    ("solver", ("solver", "sampler", "sampling", "ode", "sde", "implicit", "ddim", "timestep", "time step",
                "schedule", "steps", "predictor", "integrator", "pndm")),
]
OUT_OF_SCOPE = [
    (("video", "text-to-video", "animat", "motion"), "needs video data and a video backbone"),
    (("3d", "nerf", "multi-view", "point cloud", "mesh", "shape"), "needs 3D data and a 3D backbone"),
    (("audio", "speech", "sound", "music", "wave"), "audio generation, not images"),
    (("protein", "molecul", "antibody", "docking", "drug"), "molecular data, not images"),
    (("medical", "mri", "ct ", "inverse problem"), "medical imaging data"),
    (("survey", "review", "a closer look", "understanding diffusion"), "a survey, not a method"),
    (("language model", "llm", "text generation", "discrete diffusion"), "not image diffusion"),
]
BASICS = ("basic", "preliminar", "foundational", "introduction", "mainstream network", "metric",
          "architecture components")


def _clean(text: str) -> str:
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return re.sub(r"\s+", " ", text).strip(" *:;,.[]\"")


def _heading(line: str) -> str | None:
    if line.startswith("#"):
        return _clean(line.lstrip("#"))
    cell = re.match(r"<td rowspan=\"\d+\"[^>]*>(.+?)</td>", line.strip())
    return _clean(cell.group(1)) if cell else None


def extract(path: Path) -> list[dict]:
    lines = path.read_text(errors="replace").splitlines()
    entries, headings = [], {"top": "", "sub": ""}
    for i, line in enumerate(lines):
        heading = _heading(line)
        if heading is not None:
            headings["top" if line.startswith("# ") or line.startswith("## ") else "sub"] = heading
            if line.startswith(("# ", "## ")):
                headings["sub"] = ""
            continue
        for pattern in TITLES:
            match = pattern.search(line)
            if not match:
                continue
            window = " ".join(lines[i:i + 6])
            ids = ARXIV.findall(match.groupdict().get("url") or "") or ARXIV.findall(window)
            title = _clean(match.group("title"))
            if len(title) < 6 or title.lower().startswith(("paper", "code", "github")):
                break
            entries.append({"title": title, "short": _clean(match.groupdict().get("short") or ""),
                            "arxiv": ids[0] if ids else None,
                            "section": " / ".join(h for h in (headings["top"], headings["sub"]) if h),
                            "source": path.name})
            break
    return entries


def classify(entry: dict) -> dict:
    text = f" {entry['title']} {entry['short']} ".lower()
    context = f" {entry['section']} ".lower()
    family = next((f for f, words in FAMILY_WORDS if any(w in text for w in words)), None)
    family = family or next((f for f, words in FAMILY_WORDS if any(w in context for w in words)), "other")
    both = text + context
    backbone = ("dit" if any(w in both for w in ("transformer", "dit", " vit", "flux", "pixart"))
                else "unet" if any(w in both for w in ("u-net", "unet", "stable diffusion", "latent diff"))
                else "any")
    status, reason = "planned", ""
    for words, why in OUT_OF_SCOPE:
        if any(w in text for w in words):
            status, reason = "out of scope", why
            break
    background = any(w in context for w in BASICS) and family in ("other", "solver")
    if status == "planned" and background and not any(w in text for w in ("solver", "implicit", "sampler")):
        status, reason = "out of scope", "a base model or background paper, not an acceleration method"
    if status == "planned" and family == "other":
        status, reason = "out of scope", "not an inference-acceleration method for a pipeline"
    return {**entry, "family": family, "backbone": backbone, "status": status, "reason": reason}


# Where the seed lists are wrong or the keyword rules misfile a paper (title prefix, lower case -> fields).
CORRECTIONS: dict[str, dict] = {
    "distrifusion": {"arxiv": "2402.19481"},  # the seed gives PipeFusion's id (2405.14430)
    "consistency models": {"arxiv": "2303.01469"},  # one seed gives LCM's id (2310.04378) to Song et al.
    "on distillation of guided diffusion models": {"arxiv": "2210.03142"},  # not ADD's 2311.17042
    "one-step diffusion with distribution matching": {"arxiv": "2311.18828"},  # the seed gives no link
    "lcm-lora": {"family": "distill", "status": "planned", "reason": ""},  # a few-step student: acceleration
    "attention-driven training-free efficiency": {"family": "tokens"},  # AT-EDM prunes tokens, not a solver
    "faster diffusion": {"family": "cache"},  # reuses encoder features across steps
}


def corrected(item: dict) -> dict:
    title = item["title"].lower()
    fixes = next((f for prefix, f in CORRECTIONS.items() if title.startswith(prefix)), {})
    return {**item, **fixes}


def build(seeds: Path) -> list[dict]:
    merged: dict[str, dict] = {}
    for path in sorted(seeds.glob("*.txt")):
        for entry in extract(path):
            item = corrected(classify(entry))
            key = item["arxiv"] or re.sub(r"[^a-z0-9]", "", item["title"].lower())[:60]
            if key in merged:
                merged[key]["sources"] = sorted(set(merged[key]["sources"]) | {item["source"]})
                continue
            item["sources"] = [item.pop("source")]
            merged[key] = item
    return sorted(merged.values(), key=lambda e: (e["family"], e["title"].lower()))


if __name__ == "__main__":
    seeds = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/shared/seeds")
    entries = build(seeds)
    OUT.write_text(json.dumps({"generated_by": "tools/build_catalogue.py", "entries": entries}, indent=1,
                              ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["family"]] = counts.get(e["family"], 0) + 1
    print(f"{len(entries)} entries -> {OUT}: {counts}")
