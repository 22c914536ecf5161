"""The search's picture: every measured stack by its proxy speed-up and PSNR, the front, and what was chosen."""

from __future__ import annotations

import io
from typing import Any


def search_png(study: Any, chosen: str) -> bytes:
    """Speed-up vs proxy PSNR of the study's trials: targets met (blue) or missed (grey), the hand-written stacks
    enqueued first (squares), the proxy front (red line) and the saved recipe (star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    from effdiff.tune.study import front

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for t in trials:
        feasible = all(v <= 0 for v in t.user_attrs.get("constraints", [1.0]))
        marker = "s" if t.user_attrs.get("hand_written") else "o"
        ax.scatter(t.values[0], t.values[1], marker=marker, s=22, color="tab:blue" if feasible else "lightgrey",
                   edgecolors="black" if t.user_attrs.get("hand_written") else "none", linewidths=0.5)
    line = front(study)
    ax.plot([p["speedup"] for p in line], [p["psnr"] for p in line], color="tab:red", lw=1,
            label="front (targets met on the proxies)")
    star = next((p for p in line if p["recipe"] == chosen), None)
    if star is None:
        star = next(({"speedup": t.values[0], "psnr": t.values[1]} for t in trials
                     if t.user_attrs.get("recipe") == chosen), None)
    if star is not None:
        ax.scatter(star["speedup"], star["psnr"], marker="*", s=160, color="gold", edgecolors="black",
                   label=f"saved: {chosen}"[:70], zorder=3)
    ax.set_xlabel("speed-up vs baseline (×, paired timing on the proxy batch)")
    ax.set_ylabel("PSNR vs baseline, dB (proxy samples)")
    ax.set_title(f"effdiff tune — {study.study_name}: {len(trials)} stacks measured")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
