"""The offline ``gpu`` preset end to end at smoke size on the CPU: only the sizes shrink (model, data, steps);
the paper's beta grid, PPO targets and batch 64 stay, so every series and run of the GPU frontier runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dpo_lab import pipeline
from dpo_lab.presets import get_preset
from dpo_lab.reproduce import reproduce

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
}


@pytest.mark.slow
def test_gpu_preset_runs_end_to_end_at_smoke_size(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DPO_LAB_ARTIFACTS", str(tmp_path / "artifacts"))
    preset = get_preset("gpu", **SMOKE_SIZES)
    full = get_preset("gpu")
    assert preset.dpo.betas == full.dpo.betas == (0.05, 0.1, 1.0, 5.0)  # the paper's grid, kept
    assert preset.ppo.target_kls == full.ppo.target_kls == (3.0, 6.0, 9.0, 12.0)
    assert preset.dpo.batch_size == full.dpo.batch_size == 64
    summary = reproduce(preset, progress=False, out_dir=tmp_path / "figures")
    points = pd.read_csv(tmp_path / "figures" / "frontier_gpu_points.csv")
    assert set(points.method) == set(pipeline.METHODS)
    assert summary["runs"] == {"DPO": 4, "Unlikelihood": 4, "Preferred-FT": 2, "PPO": 4, "PPO-GT": 4}
    assert (points.step == 0).sum() == 18 and points[points.step == 0].kl_mean.abs().max() < 1e-6
    table = pd.read_csv(tmp_path / "figures" / "results_gpu.csv")
    assert (table.policy_backward_tokens > 0).all() and (table.optimizer_steps > 0).all()
    assert (table[table.method.str.startswith("PPO")].samples > 0).all()
    assert json.loads((tmp_path / "figures" / "summary_gpu.json").read_text())["preset"] == "gpu"
