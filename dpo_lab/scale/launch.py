"""``accelerate launch`` entry: the one DPO loop (``dpo_trainer.train_dpo``) on several processes or GPUs.

    accelerate launch -m dpo_lab.scale.launch --preset paper --method DPO --value 0.1
    accelerate launch -m dpo_lab.scale.launch --pairs tldr.jsonl --model EleutherAI/gpt-j-6b --value 0.5 \\
        --out runs/tldr-gptj --gradient-checkpointing
    torchrun --nproc_per_node 2 -m dpo_lab.scale.launch --cpu ...      # several CPU processes (gloo)

A preset's run trains in the pipeline's own run folder, so a run started on one process resumes on several.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dpo_lab.dpo_trainer import accumulation_steps, make_accelerator
from dpo_lab.presets import PRESETS, get_preset, parse_overrides
from dpo_lab.run import dpo_run


def train_in_processes(preset: str, overrides: Mapping[str, Any], method: str, value: float,
                       processes: int) -> None:
    """Train a preset's pairwise run on ``processes`` processes (``torchrun``: GPUs, or gloo on CPU); a
    failure raises with the exit code and the output's tail."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive integer, got {processes!r}")
    import torch

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "dpo_lab.scale.launch", "--preset", preset, "--method", method, "--value", str(value),
           "--no-progress", *([] if torch.cuda.is_available() else ["--cpu"])]
    for key, val in overrides.items():  # as YAML, which parse_overrides reads back
        text = yaml.safe_dump(val, default_flow_style=True).removesuffix("...\n").strip()
        cmd += ["--set", f"{key}={text}"]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:8])} ... exited with {done.returncode}:\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")


def load_pairs(path: Path) -> Any:
    """Pairs from a JSON-lines file of prompt/chosen/rejected objects; a damaged file, a bad row or a bad
    pair is a ValueError naming the file (and the row)."""
    import datasets

    from dpo_lab.batching import PAIR_COLUMNS
    from dpo_lab.preferences import validate_preferences
    from dpo_lab.scale.hub_tasks import read_jsonl

    if not path.is_file():
        raise FileNotFoundError(f"--pairs {path} is not a file")
    rows = read_jsonl(path)
    for i, row in enumerate(rows):
        if bad := [c for c in PAIR_COLUMNS if not isinstance(row.get(c), str)]:
            raise ValueError(f"--pairs {path}, row {i}: {bad[0]} must be a string, got {row.get(bad[0])!r}")
    pairs = datasets.Dataset.from_dict({c: [row[c] for row in rows] for c in PAIR_COLUMNS})
    try:
        validate_preferences(pairs, require_rewards=False)
    except ValueError as err:
        raise ValueError(f"--pairs {path}: {err}") from err
    return pairs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accelerate launch -m dpo_lab.scale.launch",
                                     description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--preset", default=None, choices=sorted(PRESETS),
        help="settings (with --pairs only its DPO settings and seed; default $DPO_LAB_PRESET or 'cpu')")
    add("--method", default="DPO", choices=["DPO", "Unlikelihood", "Preferred-FT"])
    add("--value", "--beta", dest="value", type=float, required=True,
        help="DPO: beta of Eq. 7; Unlikelihood: alpha; Preferred-FT: the seed")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a preset setting, e.g. --set dpo.micro_batch_size=8 (repeatable)")
    add("--pairs", type=Path, default=None, help="preference pairs: a .jsonl file of prompt/chosen/rejected")
    add("--model", default=None, help="with --pairs: hub name or folder of the SFT model (policy, reference)")
    add("--max-length", type=int, default=512, help="with --pairs: prompt + completion tokens")
    add("--out", type=Path, default=None, help="run folder (required with --pairs)")
    add("--cpu", action="store_true", help="CPU processes (gloo) even where CUDA exists")
    add("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, train on every process, print the result on the main one."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.pairs is None) != (args.model is None):
        parser.error("--pairs and --model go together (or give neither, to train on the preset's IMDb pairs)")
    if args.pairs is not None and (args.out is None or args.method == "Unlikelihood"):
        parser.error("--pairs needs --out and trains DPO or Preferred-FT")
    if args.max_length < 2:
        parser.error(f"--max-length must be >= 2, got {args.max_length}")
    try:
        preset = get_preset(args.preset, **parse_overrides(args.overrides))
        accumulation_steps(preset.dpo.batch_size, preset.dpo.micro_batch_size,
                           int(os.environ.get("WORLD_SIZE", "1")))
    except (KeyError, TypeError, ValueError) as err:
        parser.error(str(err.args[0] if err.args else err))
    if args.pairs is not None and preset.dpo.loss_type == "plackett_luce":
        parser.error("--pairs holds pairs; dpo.loss_type=plackett_luce ranks each prompt's samples: drop "
                     "--pairs to rank the preset's IMDb samples, or choose another loss_type")
    accelerator = make_accelerator("cpu" if args.cpu else None)
    if args.pairs is not None:  # DPO or Preferred-FT from --model (the policy; a frozen copy as reference)
        from dpo_lab.scale.hub_tasks import load_models

        policy, reference, tokenizer = load_models(args.model, max_length=args.max_length)
        if args.gradient_checkpointing:
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        dpo = args.method == "DPO"
        result = dpo_run(policy, reference, tokenizer, load_pairs(args.pairs), config=preset.dpo,
                         beta=args.value if dpo else None, objective="dpo" if dpo else "preferred_ft",
                         seed=preset.seed if dpo else int(args.value), out_dir=args.out,
                         max_length=args.max_length, accelerator=accelerator,
                         ref_cache_dir=args.out / "reference-logps", progress=not args.no_progress)
    else:
        from dpo_lab import pipeline

        progress = not args.no_progress
        with accelerator.main_process_first():  # build (main) or read (others) the cached stages
            pipeline.sft_policy(preset, progress=progress)
            pipeline.preference_data(preset, progress=progress)
        result = pipeline.pairwise(preset, args.method, args.value, progress=progress,
                                   accelerator=accelerator,
                                   gradient_checkpointing=args.gradient_checkpointing)
    if accelerator.is_main_process:
        print(f"finished {result.steps} steps on {accelerator.num_processes} process(es): "
              f"{result.checkpoint_dir}")
        print({k: round(v, 4) for k, v in result.last_metrics.items() if isinstance(v, float)})
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
