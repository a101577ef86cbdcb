"""DPO through Accelerate: global-batch bookkeeping, equivalence with train_dpo, a real 2-process CPU run
(torchrun + gloo) against a 1-process run of the same global batch, and the memory estimate."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from transformers import GPT2Config, GPT2LMHeadModel

from dpo_lab.distributed import (
    ACTIVATION_BYTES,
    StepBatches,
    accumulation_steps,
    dpo_batch_plan,
    dpo_memory_estimate,
    gpt2_param_count,
    main,
    make_accelerator,
    train_dpo_accelerate,
)
from dpo_lab.dpo_trainer import train_dpo
from dpo_lab.models import load_policy, save_policy
from dpo_lab.presets import get_preset
from dpo_lab.runs import batch_indices, load_weights, read_metrics
from tests.toy_pairs import CONFIG, PAIRS

REPO = Path(__file__).resolve().parents[1]


def test_accumulation_steps_and_divisibility_error() -> None:
    assert accumulation_steps(64, 16, 1) == 4
    assert accumulation_steps(64, 8, 2) == 4
    assert accumulation_steps(4, 2, 2) == 1
    with pytest.raises(ValueError, match=r"not divisible by micro_batch_size 4 x 3 process\(es\) = 12"):
        accumulation_steps(64, 4, 3)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive integer"):
        accumulation_steps(64, 0, 1)


def test_shards_of_a_step_are_its_global_batch() -> None:
    """Accelerate's own sharder deals the micro-batches: per step, the processes together see exactly
    train_dpo's global batch, each pair once."""
    sampler = StepBatches(n_items=10, batch_size=8, micro_batch_size=2, seed=3, first_step=1, last_step=3)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=p)) for p in range(2)]
    assert [len(s) for s in shards] == [6, 6]  # 3 steps x accumulation 2
    for step in range(3):
        seen = [i for p in range(2) for batch in shards[p][2 * step:2 * step + 2] for i in batch]
        assert sorted(seen) == sorted(batch_indices(10, 8, step + 1, 3))


def test_bad_batch_is_refused_before_training(tiny_model, tiny_tokenizer, tmp_path) -> None:
    reference = GPT2LMHeadModel(tiny_model.config).eval()
    config = dataclasses.replace(CONFIG, batch_size=5, micro_batch_size=2)
    with pytest.raises(ValueError, match="global batch_size 5 is not divisible"):
        train_dpo_accelerate(tiny_model, reference, tiny_tokenizer, PAIRS, config=config, beta=0.1, seed=0,
                             out_dir=tmp_path / "run", max_length=32, accelerator=make_accelerator(cpu=True),
                             progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_one_process_matches_train_dpo(tiny_model, tiny_tokenizer, tmp_path) -> None:
    """Same pairs, batches, optimizer and warmup: log 2 at step 1 and the same trajectory as train_dpo."""
    reference = GPT2LMHeadModel(tiny_model.config).eval()
    reference.load_state_dict(tiny_model.state_dict())
    other = GPT2LMHeadModel(tiny_model.config).eval()
    other.load_state_dict(tiny_model.state_dict())
    config = dataclasses.replace(CONFIG, max_steps=3, checkpoint_every=3, eval_every=3)
    same = {"config": config, "beta": 0.1, "seed": 0, "max_length": 32, "progress": False}
    plain = train_dpo(other, reference, tiny_tokenizer, PAIRS, out_dir=tmp_path / "plain",
                      ref_cache_dir=tmp_path / "ref", device="cpu", **same)
    accel = train_dpo_accelerate(tiny_model, reference, tiny_tokenizer, PAIRS, out_dir=tmp_path / "accel",
                                 accelerator=make_accelerator(cpu=True), ref_cache_dir=tmp_path / "ref",
                                 **same)
    a, b = read_metrics(plain.metrics_path), read_metrics(accel.metrics_path)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert b[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "lr", "grad_norm", "rewards/margins", "logps/chosen", "epoch"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    assert b[-1]["rewards/margins"] > 0  # it learned something: the comparison is not of two frozen models
    for (name, p), q in zip(tiny_model.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
    saved = GPT2LMHeadModel(tiny_model.config)
    load_weights(saved, accel.checkpoint_dir)  # safetensors checkpoint of the unwrapped model
    torch.testing.assert_close(saved.state_dict()["lm_head.weight"],
                               tiny_model.state_dict()["lm_head.weight"])
    # A rerun of the finished run returns at once with the same result.
    again = train_dpo_accelerate(tiny_model, reference, tiny_tokenizer, PAIRS, out_dir=tmp_path / "accel",
                                 accelerator=make_accelerator(cpu=True), **same)
    assert again.last_metrics == accel.last_metrics


def test_two_processes_match_one_process(tiny_model, tiny_tokenizer, tmp_path) -> None:
    """torchrun, 2 CPU processes (gloo), micro-batch 2 each vs one process with micro-batch 4: the same
    global batch of 4, so the same losses and weights; one metrics file with one line per step."""
    model_dir = save_policy(tiny_model, tiny_tokenizer, tmp_path / "sft")
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(dict(zip(PAIRS, row, strict=True))) + "\n"
                                  for row in zip(*PAIRS.values(), strict=True)))
    sets = {"dpo.batch_size": 4, "dpo.micro_batch_size": 2, "dpo.max_steps": 3, "dpo.checkpoint_every": 3,
            "dpo.eval_every": 3, "dpo.lr": 3e-3, "dpo.optimizer": "adamw", "dpo.warmup_steps": 1}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dpo_lab.distributed", "--cpu", "--no-progress", "--preset", "smoke", "--beta", "0.1",
           "--pairs", str(pairs_file), "--model", str(model_dir), "--max-length", "32",
           "--out", str(tmp_path / "two")]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout

    policy, tokenizer = load_policy(model_dir)
    reference, _ = load_policy(model_dir)
    config = dataclasses.replace(get_preset("smoke", **sets).dpo, micro_batch_size=4)
    one = train_dpo_accelerate(policy, reference, tokenizer, PAIRS, config=config, beta=0.1, seed=0,
                               out_dir=tmp_path / "one", max_length=32,
                               accelerator=make_accelerator(cpu=True), progress=False)
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


def test_cli_rejects_bad_arguments(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--beta", "0.1", "--pairs", str(tmp_path / "p.jsonl")])
    assert "--pairs and --model go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--beta", "0.1", "--preset", "smoke", "--set", "dpo.micro_batch_size=5"])
    assert "global batch_size 16 is not divisible" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ memory estimate
def test_gpt2_large_memory_estimate() -> None:
    config = GPT2Config(n_layer=36, n_embd=1280, n_head=20)  # gpt2-large's shape, built without weights
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    assert gpt2_param_count(36, 1280, 50257, 1024) == n == 774_030_080
    rms, adam = dpo_memory_estimate(), dpo_memory_estimate(optimizer="adamw")
    assert rms.weights == rms.gradients == rms.optimizer_state == pytest.approx(4 * n / 2**30)
    assert adam.optimizer_state == pytest.approx(2 * rms.optimizer_state)
    assert dpo_memory_estimate(reference="bf16").reference == pytest.approx(2 * n / 2**30)
    one, two = dpo_memory_estimate(micro_batch_pairs=1), dpo_memory_estimate(micro_batch_pairs=2)
    assert two.activations == pytest.approx(2 * one.activations)
    ckpt = dpo_memory_estimate(micro_batch_pairs=16, gradient_checkpointing=True)
    plain = dpo_memory_estimate(micro_batch_pairs=16)
    assert ckpt.activations < plain.activations / 5 and ckpt.logits == plain.logits
    # The paper's batch 64 on one 80 GB GPU: 16 x 4 fits, 32 x 2 does not without checkpointing.
    assert plain.fits and not dpo_memory_estimate(micro_batch_pairs=32).fits
    assert dpo_memory_estimate(micro_batch_pairs=64, gradient_checkpointing=True).fits
    assert "16 x 4" in dpo_batch_plan(64)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        dpo_memory_estimate(seq_len=2048)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_activation_coefficients_match_autograd(attention: str) -> None:
    """Re-measure ACTIVATION_BYTES: bytes autograd saves per token per block under bf16 autocast."""
    h, heads, s = 128, 4, 64

    def saved_bytes(n_layer: int) -> int:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=64, n_positions=s, n_embd=h, n_layer=n_layer, n_head=heads,
                            bos_token_id=0, eos_token_id=0, attn_implementation=attention)
        model = GPT2LMHeadModel(config).eval()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=torch.randint(0, 64, (2, s)), use_cache=False)
        return sum(seen.values())

    per_block = (saved_bytes(3) - saved_bytes(1)) / 2
    weight_copies = 2 * 12 * h * h  # autocast's bf16 copies of a block's matrices
    per_token = (per_block - weight_copies) / (2 * s)
    expected = ACTIVATION_BYTES["block"] * h
    if attention == "eager":
        expected += ACTIVATION_BYTES["eager_attention_per_head_key"] * heads * s
    assert per_token == pytest.approx(expected, rel=0.05)
