"""One DPO loop for 1 and N processes: the global batch split over processes, a real 2-process CPU run
(torchrun + gloo, ``python -m dpo_lab.scale.launch``) against a 1-process run of the same global batch, and a
2-process run resumed from its checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_pairs import CONFIG, PAIRS  # tests/ is on sys.path (pytest prepends it)
from transformers import GPT2LMHeadModel

from dpo_lab.dpo_trainer import accumulation_steps, make_accelerator, process_micro_batches
from dpo_lab.loop import batch_indices
from dpo_lab.presets import get_preset
from dpo_lab.run import dpo_run, load_policy, read_metrics, save_policy
from dpo_lab.scale.launch import main

REPO = Path(__file__).resolve().parents[1]
SETS = {"dpo.batch_size": 4, "dpo.micro_batch_size": 2, "dpo.max_steps": 3, "dpo.checkpoint_every": 1,
        "dpo.eval_every": 3, "dpo.lr": 3e-3, "dpo.optimizer": "adamw", "dpo.warmup_steps": 1}


def test_accumulation_steps_and_divisibility_error() -> None:
    assert accumulation_steps(64, 16, 1) == 4
    assert accumulation_steps(64, 8, 2) == 4
    assert accumulation_steps(4, 2, 2) == 1
    with pytest.raises(ValueError, match=r"not divisible by micro_batch_size 4 x 3 process\(es\) = 12"):
        accumulation_steps(64, 4, 3)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive integer"):
        accumulation_steps(64, 0, 1)


def test_shards_of_a_step_are_its_global_batch() -> None:
    """Per step, the processes together see exactly the single-process global batch, each pair once."""
    for step in range(1, 4):
        indices = batch_indices(10, 8, step, 3)
        shards = [process_micro_batches(indices, 2, p, 2) for p in range(2)]
        assert [len(s) for s in shards] == [2, 2]  # accumulation 2 on each process
        assert sorted(i for s in shards for micro in s for i in micro) == sorted(indices)
        assert process_micro_batches(indices, 2, 0, 1) == [indices[m:m + 2] for m in range(0, 8, 2)]


def test_bad_batch_is_refused_before_training(tiny_model, tiny_tokenizer, tmp_path) -> None:
    reference = GPT2LMHeadModel(tiny_model.config).eval()
    config = dataclasses.replace(CONFIG, batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="global batch_size 6 is not divisible"):
        dpo_run(tiny_model, reference, tiny_tokenizer, PAIRS, config=config, beta=0.1, seed=0,
                  out_dir=tmp_path / "run", max_length=32, ref_cache_dir=tmp_path / "ref",
                  accelerator=make_accelerator("cpu"), progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _torchrun(tmp_path: Path, model_dir: Path, pairs_file: Path, out: str, **sets: object) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dpo_lab.scale.launch", "--cpu", "--no-progress", "--preset", "smoke", "--value", "0.1",
           "--pairs", str(pairs_file), "--model", str(model_dir), "--max-length", "32",
           "--out", str(tmp_path / out)]
    for key, value in {**SETS, **sets}.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout
    return done.stdout


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tiny_model, tiny_tokenizer, tmp_path) -> None:
    """torchrun, 2 CPU processes (gloo), micro-batch 2 each vs one process with micro-batch 4: the same
    global batch of 4, so the same losses and weights; one metrics file with one line per step. Then a
    2-process run stopped after step 2 and continued to step 3 ends where the uninterrupted one did."""
    model_dir = save_policy(tiny_model, tiny_tokenizer, tmp_path / "sft")
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(dict(zip(PAIRS, row, strict=True))) + "\n"
                                  for row in zip(*PAIRS.values(), strict=True)))
    _torchrun(tmp_path, model_dir, pairs_file, "two")

    policy, tokenizer = load_policy(model_dir)
    reference, _ = load_policy(model_dir)
    config = dataclasses.replace(get_preset("smoke", **SETS).dpo, micro_batch_size=4)
    one = dpo_run(policy, reference, tokenizer, PAIRS, config=config, beta=0.1, seed=0,
                    out_dir=tmp_path / "one", max_length=32, ref_cache_dir=tmp_path / "ref",
                    accelerator=make_accelerator("cpu"), progress=False)
    two_metrics = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(list((tmp_path / "two").rglob("metrics.jsonl"))) == 1
    assert [r["step"] for r in two_metrics] == [1, 2, 3]
    assert two_metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for ra, rb in zip(read_metrics(one.metrics_path), two_metrics, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/rejected", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)
        if ra["step"] > 1:  # at step 1 every reward is 0 up to rounding, so "r_w > r_l" is a coin flip
            assert rb["rewards/accuracies"] == ra["rewards/accuracies"]
    two_policy, _ = load_policy(tmp_path / "two" / "checkpoints" / "step-000003")
    for (name, p), q in zip(policy.named_parameters(), two_policy.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
    start, _ = load_policy(model_dir)
    moved = max((p - q).abs().max().item() for p, q in zip(start.parameters(), two_policy.parameters(),
                                                               strict=True))
    assert moved > 1e-4  # three AdamW steps at lr 3e-3 moved the weights: equality is not trivial

    # Resume under 2 processes: 2 steps, then the same run asked for 3 picks up at its step-2 checkpoint.
    _torchrun(tmp_path, model_dir, pairs_file, "resumed", **{"dpo.max_steps": 2})
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2]
    _torchrun(tmp_path, model_dir, pairs_file, "resumed")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for ra, rb in zip(two_metrics, resumed, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    resumed_policy, _ = load_policy(tmp_path / "resumed" / "checkpoints" / "step-000003")
    for (name, p), q in zip(two_policy.named_parameters(), resumed_policy.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)


def test_cli_rejects_bad_arguments(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--value", "0.1", "--pairs", str(tmp_path / "p.jsonl")])
    assert "--pairs and --model go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--value", "0.1", "--preset", "smoke", "--set", "dpo.micro_batch_size=5"])
    assert re.search(r"must divide|not divisible", capsys.readouterr().err)  # refused before any work
    with pytest.raises(SystemExit):
        main(["--value", "0.1", "--preset", "smoke", "--pairs", str(tmp_path / "p.jsonl"), "--model", "gpt2",
              "--out", str(tmp_path / "out"), "--set", "dpo.loss_type=plackett_luce"])
    assert "--pairs holds pairs" in capsys.readouterr().err
