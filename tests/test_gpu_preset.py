"""The offline ``gpu`` preset end to end at smoke size on the CPU, through the script a GPU session runs: only
the sizes shrink (model, data, steps); the paper's beta grid, PPO targets and batch 64 stay, so every series
and run of the GPU frontier runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from dpo_lab import pipeline
from dpo_lab.presets import get_preset, project_root

SMOKE_SIZES = {
    "data.max_train_reviews": 2000, "tokenizer.vocab_size": 512,
    "policy.n_layer": 2, "policy.n_head": 2, "policy.n_embd": 64, "policy.n_positions": 64,
    "policy.sft_steps": 20, "policy.sft_batch_size": 16,
    "preferences.n_prompts": 24, "preferences.max_new_tokens": 8, "preferences.sample_batch_size": 96,
    "dpo.max_steps": 2, "dpo.micro_batch_size": 32, "dpo.eval_every": 2, "dpo.checkpoint_every": 2,
    "dpo.warmup_steps": 1, "baselines.max_steps": 2,
    "reward_model.max_steps": 4, "reward_model.eval_every": 2, "reward_model.max_length": 64,
    "reward_model.max_val_pairs": 32,
    "ppo.rollout_batch_size": 16, "ppo.minibatch_size": 8, "ppo.ppo_epochs": 1, "ppo.max_new_tokens": 8,
    "ppo.max_steps": 2, "ppo.eval_every": 2, "ppo.checkpoint_every": 2,
    "eval.n_prompts": 8, "eval.samples_per_prompt": 2, "eval.max_new_tokens": 8, "eval.batch_size": 16,
    "data.audit_reviews": 200, "audit.vocab_size": 2000, "audit.embed_dim": 16, "audit.channels": 16,
    "audit.epochs": 1, "audit.lm_vocab_size": 300, "audit.lm_n_layer": 1, "audit.lm_n_head": 2,
    "audit.lm_n_embd": 32, "audit.lm_steps": 10, "audit.lm_batch_size": 16,
}


def _script(out: Path, artifacts: Path) -> list[str]:
    return ["bash", str(project_root() / "scripts" / "gpu_preset.sh"), str(out),
            *(arg for k, v in SMOKE_SIZES.items() for arg in ("--set", f"{k}={v}"))]


@pytest.mark.slow
def test_gpu_script_runs_the_preset_end_to_end_and_resumes_when_cut(tmp_path: Path) -> None:
    """scripts/gpu_preset.sh, the script a session lent a GPU runs, at smoke sizes on the CPU: cut (kill -9 of
    its process group) once pi_SFT is saved, then started again, it reuses pi_SFT and writes every output."""
    full = get_preset("gpu")
    assert full.dpo.betas == (0.05, 0.1, 1.0, 5.0) and full.ppo.target_kls == (3.0, 6.0, 9.0, 12.0)
    assert full.dpo.batch_size == 64  # the paper's grid, targets and batch, kept at smoke sizes below
    artifacts, out = tmp_path / "artifacts", tmp_path / "out"
    # One run at a time on one thread: the tiny model is fastest so on a shared 2-core machine.
    env = {**os.environ, "PYTHON": sys.executable, "ARTIFACTS": str(artifacts), "WORKERS": "1",
           "OMP_NUM_THREADS": "1", "DPO_LAB_FIGURES": str(tmp_path / "unused")}
    first = subprocess.Popen(_script(tmp_path / "cut", artifacts), env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (artifacts.is_dir() and any(artifacts.glob("sft-*/report.json"))):  # pi_SFT saved
        assert first.poll() is None, "the script ended before pi_SFT was saved"
        assert time.monotonic() < deadline, "pi_SFT not saved after 300 s"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    sft = {p: p.stat().st_mtime_ns for p in artifacts.glob("sft-*/**/*") if p.is_file()}
    subprocess.run(_script(out, artifacts), env=env, check=True, capture_output=True)
    assert {p: p.stat().st_mtime_ns for p in artifacts.glob("sft-*/**/*") if p.is_file()} == sft  # reused
    assert "exit status 0" in (out / "run.txt").read_text()
    assert "==> frontier runs" in (out / "log.txt").read_text()
    points = pd.read_csv(out / "frontier_gpu_points.csv")
    summary = json.loads((out / "summary_gpu.json").read_text())
    assert set(points.method) == set(pipeline.METHODS)
    assert summary["runs"] == {"DPO": 4, "Unlikelihood": 4, "Preferred-FT": 2, "PPO": 4, "PPO-GT": 4}
    assert summary["preset"] == "gpu" and summary["timings_s"]["frontier runs"] > 0
    assert set(summary["dominance"]) == {"PPO", "PPO-GT", "PPO + PPO-GT"}
    assert (points.step == 0).sum() == 18 and points[points.step == 0].kl_mean.abs().max() < 1e-6
    table = pd.read_csv(out / "results_gpu.csv")
    assert (table.policy_backward_tokens > 0).all() and (table.optimizer_steps > 0).all()
    assert (table[table.method.str.startswith("PPO")].samples > 0).all()
