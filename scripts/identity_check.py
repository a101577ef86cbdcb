"""Fingerprints of a DPO, a PPO and an r_phi run: does a refactoring leave every number as it was?

    python scripts/identity_check.py            # smoke: trains them in a fresh artifacts folder
    python scripts/identity_check.py --cpu-dpo  # instead: retrain the cpu DPO beta=0.1 run, compare

Prints one sha256 per run's metrics (and of the SFT and r_phi weights); run it before and after a change and
compare the lines. The cpu check links the cached upstream stages (SFT, r*, audit, pairs) of the artifacts
folder (``DPO_LAB_ARTIFACTS``, default ./artifacts) into a scratch folder and copies its shared caches
(reference log-probs, start evaluations), so only the DPO run itself is retrained and nothing is written to
the cached folder, then compares its metrics with the cached run's 250-step schedule, byte for byte
(wall-clock fields aside).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def digest(path: Path) -> str:
    return hashlib.sha256(comparable(path)).hexdigest()[:16]


def comparable(path: Path) -> bytes:
    """The file's bytes; for metrics, each line without its wall-clock fields (`*wall_s`, `time/*`)."""
    if path.suffix != ".jsonl":
        return path.read_bytes()
    rows = [{k: v for k, v in json.loads(line).items() if not (k.endswith("wall_s") or k.startswith("time/"))}
            for line in path.read_text().splitlines()]
    return "\n".join(json.dumps(row) for row in rows).encode()


def smoke(scratch: Path) -> None:
    os.environ["DPO_LAB_ARTIFACTS"] = str(scratch)
    from dpo_lab import pipeline
    from dpo_lab.presets import get_preset
    preset = get_preset("smoke")
    pipeline.dpo(preset, 0.1, progress=False)
    pipeline.ppo(preset, "PPO", preset.ppo.target_kls[0], progress=False)
    for metrics in sorted(scratch.glob("training/*/metrics.jsonl")):
        print(f"smoke {metrics.parent.name.rsplit('-', 1)[0]:24s} {digest(metrics)}")
    for stage in ("sft", "reward-model"):
        for weights in sorted(scratch.glob(f"{stage}-*/**/*.safetensors")):
            print(f"smoke {stage + ' ' + weights.name:24s} {digest(weights)}")


def cached_metrics(cached: Path, fresh: Path, steps: int) -> Path:
    """The cached metrics of ``fresh``'s run at ``steps`` steps. A run continued past them in place (the
    budget sweep takes DPO beta=0.1 to 563 steps) keeps its ``steps``-step schedule in ``<run>-steps<N>``
    (``run.schedule_dir``): comparing with the continued run's file would differ from step 251 on."""
    from dpo_lab.run import schedule_dir

    return schedule_dir(cached / "training" / fresh.name, steps) / "metrics.jsonl"


def cpu_dpo(scratch: Path) -> None:
    from dpo_lab.presets import artifacts_dir

    cached = artifacts_dir()
    for stage in cached.iterdir():
        if stage.name in ("reference-logps", "start-eval"):  # written to when missing: copies, not links
            shutil.copytree(stage, scratch / stage.name)
        elif stage.is_dir() and stage.name != "training":
            (scratch / stage.name).symlink_to(stage)
    os.environ["DPO_LAB_ARTIFACTS"] = str(scratch)
    import torch

    from dpo_lab import pipeline
    from dpo_lab.presets import get_preset
    torch.set_num_threads(1)  # as reproduce's workers train: other thread counts sum in another order
    preset = get_preset("cpu")
    old = cached_metrics(cached, pipeline.run_dir(preset, "DPO", 0.1), pipeline.run_steps(preset, "DPO"))
    if not old.exists():
        sys.exit(f"no cached cpu DPO beta=0.1 run at {old.parent}: run `make reproduce` first")
    new = pipeline.dpo(preset, 0.1, progress=False).metrics_path
    same = comparable(new) == comparable(old)
    verdict = "identical to" if same else "DIFFERS from"
    print(f"cpu   {'dpo-beta0.1':24s} {digest(new)} {verdict} cached {digest(old)} ({old.parent.name})")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dpo", action="store_true",
                        help="instead retrain the cpu DPO beta=0.1 run and compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.cpu_dpo:
            cpu_dpo(Path(tmp))
        else:
            smoke(Path(tmp))
