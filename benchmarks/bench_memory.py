"""Peak resident memory of each stage of the ``cpu`` preset (issue #6, part 4).

Each stage runs in a fresh interpreter (``benchmarks.common.run_worker``) and reports VmHWM, its peak
resident set size (not ``ru_maxrss``, which Linux carries across fork + exec): torch's tensors count,
unlike tracemalloc's. The interpreter's own footprint after importing dpo_lab (torch, transformers,
datasets, sklearn) is measured the same way and shown as "imports", so the stage's share is the difference.

Nothing is written into the shared ``artifacts/``: every worker gets a temporary ``DPO_LAB_ARTIFACTS`` into
which the finished cpu-preset stages it *reads* are copied (SFT policy, r* classifier, preference pairs,
reference log-probs; build them first with ``make reproduce``), and the stage it *measures* is built there
from scratch. Stages are shortened where length does not change the peak (the same batch shapes repeat
every step); the table says how. Run: ``.venv/bin/python benchmarks/bench_memory.py [--quick]``.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO,
    describe_machine,
    emit_result,
    markdown_table,
    peak_rss_mib,
    run_worker,
)

# stage -> (what it runs, preset overrides, shared stage folders it reads)
STAGES: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "imports": ("import dpo_lab.pipeline and its dependencies; nothing else", {}, ()),
    "data + tokenizer": ("load the offline IMDb CSV, train the 4,096-token BPE on the train reviews", {}, ()),
    "SFT": ("data + tokenizer, then SFT for 5 steps of 32 reviews (preset: 600) + held-out perplexity",
            {"policy.sft_steps": 5, "policy.sft_warmup_steps": 1}, ()),
    "r* classifier": ("fit TF-IDF + logistic regression on the train reviews, held-out accuracy", {}, ()),
    "preference data": ("sample 4 x 32 tokens for 256 train prompts (preset: 1,500) in batches of 128, "
                        "score with r*, build pairs", {"preferences.n_prompts": 256}, ("sft", "reward")),
    "DPO": ("one DPO run, beta 0.1, 5 steps of 32 pairs (preset: 250), reference log-probs cached, "
            "evaluation at steps 0 and 5 on 32 test prompts",
            {"dpo.max_steps": 5, "dpo.eval_every": 5, "dpo.checkpoint_every": 5, "eval.n_prompts": 32},
            ("sft", "reward", "preferences", "reference-logps")),
    "reward model": ("train r_phi (SFT backbone + head, Eq. 2) 5 steps of 32 pairs (preset: 150) + "
                     "validation on 128 pairs (preset: 512)",
                     {"reward_model.max_steps": 5, "reward_model.eval_every": 5,
                      "reward_model.max_val_pairs": 128},
                     ("sft", "reward", "preferences")),
    "PPO": ("one PPO-GT run (r*), 2 steps of 64 rollouts x 32 tokens, 4 epochs (preset: 60 steps), "
            "evaluation at steps 0 and 2 on 32 test prompts",
            {"ppo.max_steps": 2, "ppo.eval_every": 2, "ppo.checkpoint_every": 2, "eval.n_prompts": 32},
            ("sft", "reward")),
    "evaluation": ("one frontier point of pi_SFT: 256 test prompts x 2 samples x 32 tokens, r*, exact "
                   "sequence KL to pi_ref", {}, ("sft", "reward")),
}


def _copy_inputs(needs: tuple[str, ...], shared: Path, target: Path) -> None:
    """Copy the finished cpu-preset stage folders a worker reads into its private artifacts dir."""
    from dpo_lab import pipeline
    from dpo_lab.presets import get_preset

    preset = get_preset("cpu")
    folders = {"sft": f"sft-{pipeline.sft_key(preset)}", "reward": f"reward-{pipeline.reward_key(preset)}",
               "preferences": f"preferences-{pipeline.preferences_key(preset)}",
               "reference-logps": "reference-logps"}
    for need in needs:
        source = shared / folders[need]
        if not source.is_dir() or (need != "reference-logps" and not (source / ".complete").is_file()):
            raise SystemExit(f"{source} is missing or unfinished: run `make reproduce` (cpu preset) first")
        shutil.copytree(source, target / folders[need])


def worker(spec: dict[str, Any]) -> None:
    """Run one stage in this (fresh) process and emit its peak RSS."""
    stage = spec["stage"]
    _, overrides, _ = STAGES[stage]
    start = time.perf_counter()
    from dpo_lab import pipeline
    from dpo_lab.presets import get_preset

    preset = get_preset("cpu", **overrides)
    if stage == "data + tokenizer":
        from dpo_lab.models import train_tokenizer

        train_tokenizer(pipeline.imdb(preset)["train"]["text"], preset.tokenizer.vocab_size)
    elif stage == "SFT":
        pipeline.sft_policy(preset, progress=False)
    elif stage == "r* classifier":
        pipeline.reward_model(preset)
    elif stage == "preference data":
        pipeline.preference_data(preset, progress=False)
    elif stage == "DPO":
        pipeline.dpo(preset, 0.1, progress=False)
    elif stage == "reward model":
        pipeline.learned_reward(preset, progress=False)
    elif stage == "PPO":
        pipeline.ppo(preset, "PPO-GT", 6.0, progress=False)
    elif stage == "evaluation":
        from dpo_lab.evaluate import evaluate_policy

        policy, tokenizer, _ = pipeline.sft_policy(preset, progress=False)
        reward, _ = pipeline.reward_model(preset)
        evaluate_policy(policy, policy, tokenizer, pipeline.prompts(preset, tokenizer, "test"), reward,
                        preset.eval, seed=preset.seed)
    elif stage != "imports":
        raise SystemExit(f"unknown stage {stage!r}")
    emit_result({"stage": stage, "peak_rss_mib": peak_rss_mib(), "seconds": time.perf_counter() - start})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="imports, evaluation and DPO only")
    parser.add_argument("--stages", default=None, help="comma-separated stage names (default: all)")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    names = list(STAGES)
    if args.stages:
        names = [s.strip() for s in args.stages.split(",")]
    elif args.quick:
        names = ["imports", "evaluation", "DPO"]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {list(STAGES)}")
    from dpo_lab.presets import artifacts_dir

    shared = artifacts_dir()  # the caller's (DPO_LAB_ARTIFACTS or <repo>/artifacts): read, never written
    original = os.environ.get("DPO_LAB_ARTIFACTS")
    print(describe_machine())
    rows = []
    total = time.perf_counter()
    for name in names:
        description, _, needs = STAGES[name]
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            _copy_inputs(needs, shared, Path(tmp))
            os.environ["DPO_LAB_ARTIFACTS"] = tmp  # inherited by the worker; restored below
            try:
                result = run_worker(Path(__file__), {"stage": name}, timeout=600)
            finally:
                if original is None:
                    os.environ.pop("DPO_LAB_ARTIFACTS", None)
                else:
                    os.environ["DPO_LAB_ARTIFACTS"] = original
        rows.append({"stage": name, "peak RSS (MiB)": round(result["peak_rss_mib"]),
                     "wall s": round(result["seconds"], 1), "what ran": description})
        print(f"  {name}: {result['peak_rss_mib']:.0f} MiB in {result['seconds']:.1f} s", flush=True)
    print(f"{'total wall':>14}: {time.perf_counter() - total:.0f} s; load after {os.getloadavg()}")
    print(f"{'repo':>14}: {REPO}")
    print()
    print(markdown_table(rows, ["stage", "peak RSS (MiB)", "wall s", "what ran"]))


if __name__ == "__main__":
    main()
