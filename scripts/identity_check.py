"""Fingerprints of a DPO, a PPO and an r_phi run: does a refactoring leave every number as it was?

    python scripts/identity_check.py            # smoke: trains them in a fresh artifacts folder
    python scripts/identity_check.py --cpu-dpo  # instead: retrain the cpu DPO beta=0.1 run, compare

Prints one sha256 per run's metrics (and of the SFT and r_phi weights); run it before and after a change and
compare the lines. The cpu check links the cached upstream stages (SFT, r*, audit, pairs) of ./artifacts into
a scratch folder, so only the DPO run itself is retrained, then compares its metrics with the cached run's,
byte for byte (wall-clock fields aside).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def cpu_dpo(scratch: Path) -> None:
    cached = ROOT / "artifacts"
    for stage in cached.iterdir():
        if stage.is_dir() and stage.name != "training":
            (scratch / stage.name).symlink_to(stage)
    os.environ["DPO_LAB_ARTIFACTS"] = str(scratch)
    import torch

    from dpo_lab import pipeline
    from dpo_lab.presets import get_preset
    torch.set_num_threads(1)  # as reproduce's workers train: other thread counts sum in another order
    preset = get_preset("cpu")
    fresh = pipeline.run_dir(preset, "DPO", 0.1)
    old = cached / "training" / fresh.name / "metrics.jsonl"
    if not old.exists():
        sys.exit(f"no cached cpu DPO beta=0.1 run at {old.parent}: run `make reproduce` first")
    pipeline.dpo(preset, 0.1, progress=False)
    new = fresh / "metrics.jsonl"
    same = comparable(new) == comparable(old)
    verdict = "identical to" if same else "DIFFERS from"
    print(f"cpu   {'dpo-beta0.1':24s} {digest(new)} {verdict} cached {digest(old)}")
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
