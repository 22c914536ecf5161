"""The HTML report opened in a real browser (headless Chromium): every image decodes, no console message,
and a screenshot renders. Skipped, with the reason, where Debian's ``chromium`` is not installed
(``.ci/run`` installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import unescape

import pytest
import torch

from effdiff.bench.generate import save_grid
from effdiff.bench.report import write_html
from effdiff.bench.runner import image_dir, recipe_slug

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")

# Appended to a copy of the report: after load, the images that did not decode are written into the DOM.
CHECKER = ("<script>window.addEventListener('load', () => { const bad = [...document.images]"
           ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src);"
           "document.body.setAttribute('data-broken', JSON.stringify(bad));"
           "document.body.setAttribute('data-images', String(document.images.length)); });</script>")


def _row(recipe: str, speedup: float | None, fid: float | None, labels=(), **extra) -> dict:
    metrics = {"speedup": speedup, "fid": fid, "fid_floor": 1.0, "psnr": 30.0, "nfe": 10, "macs_per_image": 2e9,
               "labels": list(labels), **extra}
    if fid is not None:
        metrics.update(fid_delta=fid - 2.4, fid_delta_ci=[fid - 2.9, fid - 1.9], fid_vs_baseline="tie")
    return {"model": "tiny-sd", "recipe": recipe, "torch_version": "t", "diffusers_version": "d",
            "effdiff_version": "e", "threads": 2, "dtype": "float32", "device": "cpu", "machine": "x",
            "metrics": metrics}


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium_with_every_image_and_no_console_message(tmp_path):
    rows = [_row("", 1.0, 2.4), _row("dpmpp2m:steps=20", 2.5, 2.3),
            _row("dpmpp2m:steps=20+deepcache:interval=3+tome:ratio=0.5,max_downsample=2", 5.3, 2.5),
            _row("dpmpp2m:steps=20+deepcache:interval=3", 6.1, 2.4, ["noisy"]),
            _row("deltadit", None, None, ["refused"], refused="deltadit supports dit backbones, not unet")]
    folder = image_dir(tmp_path, "run", "tiny-sd")
    for row in rows[:4]:
        save_grid(torch.rand(20, 1, 32, 32), folder / f"{recipe_slug(row['recipe'])}.png")
    report = write_html(rows, "run", tmp_path)
    checked = tmp_path / "checked.html"
    checked.write_text(report.read_text().replace("</body>", CHECKER + "</body>"))

    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", checked.as_uri())
    broken = re.search(r'data-broken="([^"]*)"', dom.stdout)
    assert broken is not None, f"the page did not finish loading: {dom.stderr[-2000:]}"
    assert json.loads(unescape(broken.group(1))) == []
    assert int(re.search(r'data-images="(\d+)"', dom.stdout).group(1)) == 4 + 1  # four grids and one Pareto plot
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []

    shot = tmp_path / "report.png"
    _chromium("--screenshot=" + str(shot), "--window-size=1400,1800", report.as_uri())
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000  # a page, not a blank
