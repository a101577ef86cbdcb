"""How the frontier stage scales with ``reproduce --workers``, and how far its progress bar's ETA is off.

Each worker count trains the same subset of the ``cpu`` preset's frontier (DPO and PPO-GT runs, shortened so
that a trial takes minutes) from the cached SFT policy and pairs, in a fresh process with fresh run folders.
The ETA the bar would show is recorded at every update and compared with the time that was really left
(one worker trains in this process, each run with its own bar: there is no stage ETA to check).

    .venv/bin/python benchmarks/bench_workers.py              # workers 1 .. cores, ~12 min on 2 cores
    .venv/bin/python benchmarks/bench_workers.py --workers 2  # one worker count
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, emit_result, markdown_table, run_worker  # noqa: E402

# A quarter of the cpu frontier's work: 2 DPO and 2 PPO-GT runs, the cpu preset's settings, fewer steps.
SUBSET = {"dpo.betas": [0.1, 1.0], "ppo.target_kls": [3.0, 6.0], "dpo.max_steps": 100, "ppo.max_steps": 20}
METHODS = ("DPO", "PPO-GT")


def trial(workers: int) -> dict:
    """One frontier stage at ``workers`` in this process; wall seconds and the ETA's error over time."""
    from dpo_lab import pipeline
    from dpo_lab.presets import artifacts_dir, get_preset

    preset = get_preset("cpu", **SUBSET)
    cached = artifacts_dir()
    for stage in ("sft", "preferences"):  # built by `make reproduce` (or pipeline.preference_data)
        if not any(cached.glob(f"{stage}-*")):
            raise SystemExit(f"no cached {stage} stage under {cached}: run make reproduce first")
    scratch = Path(tempfile.mkdtemp(prefix="bench_workers_"))
    for stage in cached.iterdir():  # the shared stages, not the runs
        if stage.is_dir() and stage.name.split("-")[0] in ("sft", "reward", "preferences"):
            (scratch / stage.name).symlink_to(stage)
    os.environ["DPO_LAB_ARTIFACTS"] = str(scratch)
    samples: list[tuple[float, float]] = []  # (elapsed s, predicted s left) at every bar update
    update = pipeline._PoolProgress.update
    start = time.perf_counter()

    def recording(self, running, finished):
        update(self, running, finished)
        done, elapsed = self.bar.n / self.bar.total, time.perf_counter() - start
        if done > 0:
            samples.append((elapsed, elapsed * (1 - done) / done))

    pipeline._PoolProgress.update = recording
    try:
        pipeline.frontier(preset, METHODS, progress=False, workers=workers)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    wall = time.perf_counter() - start
    # Relative ETA error from 10% of the stage on (before that a rate is a guess from one run's start).
    errors = [left / (wall - t) - 1 for t, left in samples if 0.1 * wall <= t < wall - 1]
    at = {f"eta_error_at_{q}%": next((left / (wall - t) - 1 for t, left in samples if t >= q / 100 * wall),
                                     None) for q in (10, 25, 50, 75)}
    return {"workers": workers, "wall_s": round(wall, 1), "samples": len(samples), "trace": samples,
            "max_abs_eta_error": max((abs(e) for e in errors), default=None), **at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="*", help="worker counts (default 1 .. cores)")
    parser.add_argument("--trace", type=Path, help="write every (elapsed s, ETA s) sample as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        emit_result(trial(json.loads(args.worker)["workers"]))
        return
    print(describe_machine())
    counts = args.workers or list(range(1, len(os.sched_getaffinity(0)) + 1))
    rows = [run_worker(Path(__file__), {"workers": n}, timeout=3600) for n in counts]
    for row in rows:
        row["speed_up"] = rows[0]["wall_s"] / row["wall_s"]
    if args.trace:
        args.trace.write_text(json.dumps({r["workers"]: {"wall_s": r["wall_s"], "trace": r["trace"]}
                                          for r in rows}))
    print(markdown_table(rows, ["workers", "wall_s", "speed_up", "max_abs_eta_error", "eta_error_at_10%",
                                "eta_error_at_25%", "eta_error_at_50%", "eta_error_at_75%"]))


if __name__ == "__main__":
    main()
