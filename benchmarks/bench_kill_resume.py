"""Kill -9 a running `effdiff bench` at random moments, resume it each time, and check the store.

A reliability check of the main job (not a test: it takes minutes). One small bench (tiny-sd, three
recipes, 4 samples, 5 steps) is started, SIGKILLed at a random moment, resumed with the run id it
printed, killed again, ... until ``--kills`` kills have landed; a run that finishes before its kill is
checked complete and a new one is started. After every kill the store must have lost no finished row
and duplicated none; at the end the last run is left to finish and must be complete with every row.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/bench_kill_resume.py [--kills 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = ["--model", "tiny-sd", "--recipes", "ddim:steps=3", "deepcache:interval=3", "fbcache",
         "--samples", "4", "--steps", "5", "--timing-batch", "1"]
RUN_ID = re.compile(r"run (\d{8}-\d{6}-[0-9a-f]{6})")


def _rows(store: Path, run_id: str) -> list[tuple[str, str]]:
    if not store.exists():
        return []
    with sqlite3.connect(store) as conn:
        return conn.execute("SELECT model, recipe FROM results WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()


def _text_after(log: Path, offset: int) -> str:
    """What a child wrote to the shared log after ``offset`` bytes (the table's box characters are multi-byte)."""
    return log.read_bytes()[offset:].decode("utf-8", errors="replace")


def _state(store: Path, run_id: str) -> str | None:
    with sqlite3.connect(store) as conn:
        row = conn.execute("SELECT state FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return row[0] if row else None


def _start(out: Path, run_id: str | None, log) -> subprocess.Popen:
    args = [sys.executable, "-m", "effdiff.cli", "bench", *BENCH, "--out", str(out)]
    if run_id:
        args = [sys.executable, "-m", "effdiff.cli", "bench", "--resume", run_id, "--out", str(out)]
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-wait", type=float, default=40.0, help="longest random wait before a kill (s)")
    parser.add_argument("--json", type=Path, help="write the record here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(tempfile.mkdtemp(prefix="effdiff-kill-"))
    store, log_path = out / "results.sqlite", out / "bench.log"
    run_id: str | None = None
    seen: list[tuple[str, str]] = []
    record = {"kills": [], "lost": 0, "duplicated": 0, "orphan_runs": 0, "runs_completed_between_kills": 0}
    expected = 4  # the baseline and three recipes
    with log_path.open("a") as log:
        while len(record["kills"]) < args.kills:
            wait = rng.uniform(0.5, args.max_wait)
            log.flush()
            offset = log_path.stat().st_size if log_path.exists() else 0
            proc = _start(out, run_id, log)
            time.sleep(wait)
            finished_early = proc.poll() is not None
            if not finished_early:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if run_id is None:
                found = RUN_ID.findall(_text_after(log_path, offset))
                run_id = found[0] if found else None
                if run_id is None:
                    record["orphan_runs"] += 1
            rows = _rows(store, run_id) if run_id else []
            lost = [r for r in seen if r not in rows]
            duplicated = len(rows) - len(set(rows))
            record["lost"] += len(lost)
            record["duplicated"] += duplicated
            if finished_early:  # the run completed before its kill: check it, then start a new one
                done = len(set(rows)) == expected and _state(store, run_id) == "complete"
                record["runs_completed_between_kills"] += done
                print(f"run {run_id} finished within {wait:.1f} s: {len(rows)} rows, complete {done}", flush=True)
                if not done:
                    record["incomplete_run"] = run_id
                run_id, seen = None, []
                continue
            record["kills"].append({"after_s": round(wait, 1), "run": run_id, "rows": len(rows)})
            print(f"kill {len(record['kills']):2d} after {wait:5.1f} s: run {run_id}, {len(rows)} rows, "
                  f"lost {len(lost)}, duplicated {duplicated}", flush=True)
            seen = rows
        log.flush()
        offset = log_path.stat().st_size
        final = subprocess.run([sys.executable, "-m", "effdiff.cli", "bench", *(
            ["--resume", run_id] if run_id else BENCH), "--out", str(out)], stdout=log, stderr=subprocess.STDOUT)
    run_id = run_id or RUN_ID.findall(_text_after(log_path, offset))[0]
    rows = _rows(store, run_id)
    record.update(run_id=run_id, final_exit=final.returncode, final_rows=len(rows), expected_rows=expected,
                  final_state=_state(store, run_id), folder=str(out),
                  complete=final.returncode == 0 and len(set(rows)) == expected and _state(store, run_id) == "complete"
                  and "incomplete_run" not in record)
    print(json.dumps(record, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0 if record["complete"] and record["lost"] == 0 and record["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
