"""GPU-cost arithmetic: parameter counts from configs, the 6N / 2N rule, GPU hours, the paper's bill."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from dpo_lab.presets import PRESETS
from dpo_lab.scale import estimate

TINY = [
    (GPT2LMHeadModel, GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=8)),
    (GPT2LMHeadModel, GPT2Config(n_layer=3, n_embd=12, n_head=3, vocab_size=40, n_positions=6, n_inner=20,
                                 tie_word_embeddings=False)),
    (GPTJForCausalLM, GPTJConfig(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=8, rotary_dim=4)),
    (GPTNeoXForCausalLM, GPTNeoXConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                       intermediate_size=40, vocab_size=50)),
    (GPTNeoXForCausalLM, GPTNeoXConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                       intermediate_size=24, vocab_size=30, attention_bias=False,
                                       tie_word_embeddings=True)),
    (RobertaForSequenceClassification, RobertaConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=40, vocab_size=50,
        max_position_embeddings=20, type_vocab_size=1, num_labels=2)),
]


@pytest.mark.parametrize(("cls", "config"), TINY, ids=lambda x: getattr(x, "__name__", None) or x.model_type)
def test_count_matches_an_instantiated_tiny_model(cls, config):
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):  # keep special ids inside the tiny vocab
        if getattr(config, token, None) is not None:
            setattr(config, token, 0)
    model = cls(config)
    assert estimate.count_parameters(config) == sum(p.numel() for p in model.parameters())


def test_gpt2_large_from_its_config_without_building_it():
    total = estimate.count_parameters(estimate.model_config("gpt2-large"))
    assert total == 774_030_080  # gpt2-large's published 774M
    # N of the 6N rule: no wte/wpe lookups, but the tied lm_head matmul counts.
    n = estimate.matmul_params("gpt2-large")
    assert n == total - 1024 * 1280
    assert estimate.matmul_params("gpt2-large", lm_head=False) == n - 50257 * 1280
    # GPT-J's untied LM head has a bias; RoBERTa's classifier head runs once per sequence, not per token.
    gptj = estimate.model_config("CarperAI/openai_summarize_tldr_sft")
    assert estimate.matmul_params(gptj) == estimate.count_parameters(gptj) - 50400 * 4096
    roberta = estimate.model_config("siebert/sentiment-roberta-large-english")
    head = 1024 * 1024 + 1024 + 1024 * 2 + 2
    lookups = (50265 + 514 + 1) * 1024  # word, position and token-type embeddings
    assert estimate.matmul_params(roberta) == estimate.count_parameters(roberta) - lookups - head


def test_other_paper_models():
    assert estimate.count_parameters(estimate.model_config("EleutherAI/pythia-2.8b")) == pytest.approx(
        2.8e9, rel=0.01)
    assert estimate.count_parameters(estimate.model_config("CarperAI/openai_summarize_tldr_sft")) == \
        pytest.approx(6.05e9, rel=0.01)
    assert estimate.count_parameters(estimate.model_config(
        "siebert/sentiment-roberta-large-english")) == pytest.approx(355e6, rel=0.01)
    with pytest.raises(KeyError, match="no config"):
        estimate.model_config("gpt-5")
    with pytest.raises(TypeError, match="transformers config"):
        estimate.count_parameters({"n_layer": 2})


def test_six_n_rule_on_a_tiny_case():
    # A 1-layer linear "model": 6 FLOPs per parameter per token in training, 2 forward-only.
    n, tokens = 10, 7

    def stage_flops(params: int, kind: str, n_tokens: float) -> float:
        return estimate.Stage("t", "s", "m", params, kind, ((n_tokens, "tok"),)).flops

    assert stage_flops(n, "train", tokens) == 6 * n * tokens == 3 * stage_flops(n, "forward", tokens)
    # Measured: one linear layer d_in x d_out, forward = 2·d_in·d_out per row (multiply + add).
    lin = torch.nn.Linear(4, 3, bias=False)
    assert stage_flops(lin.weight.numel(), "forward", 1) == 2 * 4 * 3
    hours = estimate.gpu_hours(estimate.H100_BF16_DENSE_FLOPS * 0.5 * 3600, mfu=0.5)
    assert hours == pytest.approx(1.0)
    assert estimate.gpu_hours(1e18, mfu=0.2) == pytest.approx(2 * estimate.gpu_hours(1e18, mfu=0.4))


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), True, "0.4"])
def test_bad_mfu_is_refused(bad):
    with pytest.raises(ValueError, match="mfu"):
        estimate.gpu_hours(1e18, mfu=bad)
    with pytest.raises(ValueError, match="mfu"):
        estimate.cost_table(estimate.hub_task_stages(), mfu=bad)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least one stage"):
        estimate.cost_table([])
    with pytest.raises(ValueError, match="decode_mfu"):
        estimate.cost_table(estimate.hub_task_stages(), decode_mfu=0)
    with pytest.raises(ValueError, match="micro_batch_pairs must be a positive integer"):
        estimate.dpo_memory_estimate(micro_batch_pairs=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        estimate.dpo_memory_estimate(optimizer="sgd")


def test_a_stage_keeps_its_arithmetic():
    s = estimate.Stage("t", "s", "m", 10**6, "train",
                       ((4, "runs"), (2400, "steps"), (64, "pairs"), (2, "seqs"), (68.5, "tok")))
    assert s.tokens == 4 * 2400 * 64 * 2 * 68.5
    assert s.arithmetic == "6 × 1.0M × (4 runs × 2,400 steps × 64 pairs × 2 seqs × 68.5 tok)"


def _stage(stages, name):
    (found,) = [s for s in stages if s.stage == name]
    return found


def test_flops_scale_linearly_in_steps_and_runs():
    paper = PRESETS["paper"]
    base = estimate.imdb_stages(paper)
    doubled = estimate.imdb_stages(dataclasses.replace(paper, dpo=dataclasses.replace(
        paper.dpo, max_steps=2 * paper.dpo.max_steps)))
    assert _stage(doubled, "DPO (β sweep)").flops == 2 * _stage(base, "DPO (β sweep)").flops
    more_betas = estimate.imdb_stages(dataclasses.replace(paper, dpo=dataclasses.replace(
        paper.dpo, betas=(*paper.dpo.betas, 0.3))))
    ratio = _stage(more_betas, "DPO (β sweep)").flops / _stage(base, "DPO (β sweep)").flops
    assert ratio == pytest.approx((len(paper.dpo.betas) + 1) / len(paper.dpo.betas))
    # The DPO line is the 6N rule on the preset's numbers: steps x 64 pairs x 2 sequences x (5 + 64) tokens.
    dpo = _stage(base, "DPO (β sweep)")
    tokens = 4 * 2400 * 64 * 2 * (5 + paper.preferences.max_new_tokens)
    assert dpo.tokens == tokens
    assert dpo.flops == 6 * estimate.matmul_params("gpt2-large") * tokens
    assert "6 × 772.7M × (4 runs × 2,400 steps × 64 pairs × 2 seqs × 69 tok)" == dpo.arithmetic


def test_gpu_preset_is_billed_at_its_own_shape_and_its_offline_r_star_on_the_cpu():
    gpu = PRESETS["gpu"]
    stages = estimate.imdb_stages(gpu)
    shape = GPT2Config(n_layer=gpu.policy.n_layer, n_head=gpu.policy.n_head, n_embd=gpu.policy.n_embd,
                       n_positions=gpu.policy.n_positions, vocab_size=gpu.tokenizer.vocab_size)
    n = estimate.matmul_params(shape)
    # GPT-2 small's 124M less the 50,257 - 16,384 vocabulary rows it does not have; the LM head is tied.
    assert estimate.count_parameters(shape) == pytest.approx(124.4e6 - (50257 - 16384) * 768, rel=0.01)
    assert not [s for s in stages if "r*" in s.stage]  # TF-IDF + logistic regression: no GPU rows
    assert {s.model for s in stages} == {"GPT-2 12x768 (trained here)"}
    dpo = _stage(stages, "DPO (β sweep)")
    tokens = (len(gpu.dpo.betas) * gpu.dpo.max_steps * gpu.dpo.batch_size * 2
              * (5 + gpu.preferences.max_new_tokens))
    assert dpo.params == n and dpo.flops == 6 * n * tokens
    assert _stage(stages, "reward model r_φ: training").params == estimate.matmul_params(shape, lm_head=False)
    # The paper preset keeps its hub models, r* included.
    paper_models = {s.model for s in estimate.imdb_stages(PRESETS["paper"])}
    assert paper_models == {"gpt2-large", "siebert/sentiment-roberta-large-english"}


def test_paper_cost_table_totals_and_utilisations():
    table = estimate.paper_cost_table(mfu=0.4, decode_mfu=0.05)
    assert list(table.columns) == ["task", "stage", "model", "pass", "params", "tokens", "flops",
                                   "utilisation", "gpu_hours", "arithmetic"]
    assert table["task"].nunique() == 3
    for task, rows in table.groupby("task"):
        body, total = rows[rows["stage"] != "total"], rows[rows["stage"] == "total"]
        assert len(total) == 1 and total.index[0] == rows.index[-1], task  # the total closes its task
        assert total["flops"].iloc[0] == pytest.approx(body["flops"].sum())
        assert total["gpu_hours"].iloc[0] == pytest.approx(body["gpu_hours"].sum())
    body = table[table["stage"] != "total"]
    assert set(body.loc[body["pass"] == "decode", "utilisation"]) == {0.05}
    assert set(body.loc[body["pass"] != "decode", "utilisation"]) == {0.4}
    expected = body["flops"] / (estimate.H100_BF16_DENSE_FLOPS * body["utilisation"]) / 3600
    assert (body["gpu_hours"] - expected).abs().max() < 1e-9
    # Halving the utilisation doubles every line's hours.
    slower = estimate.paper_cost_table(mfu=0.2, decode_mfu=0.025)
    assert slower["gpu_hours"].sum() == pytest.approx(2 * table["gpu_hours"].sum())
    assert math.isfinite(table["gpu_hours"].sum()) and (body["flops"] > 0).all()


def test_hh_bills_its_reference_and_tldr_does_not():
    stages = estimate.hub_task_stages()
    tldr = [s.stage for s in stages if s.task.startswith("TL;DR")]
    hh = [s.stage for s in stages if s.task.startswith("Anthropic")]
    assert tldr == ["reference log-probs", "DPO"]
    assert hh[0].startswith("π_ref: Preferred-FT")
    dpo = [s for s in stages if s.task.startswith("TL;DR") and s.stage == "DPO"][0]
    assert dpo.tokens == 1438 * 64 * 2 * (330 + 30)  # 92,000 pairs / 64 = 1,437.5: 1,438 steps, one epoch


# ------------------------------------------------------------------------------------------ memory estimate
def test_gpt2_large_memory_estimate() -> None:
    config = GPT2Config(n_layer=36, n_embd=1280, n_head=20)  # gpt2-large's shape, built without weights
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    assert estimate.count_parameters(config) == n == 774_030_080
    rms, adam = estimate.dpo_memory_estimate(), estimate.dpo_memory_estimate(optimizer="adamw")
    assert rms.weights == rms.gradients == rms.optimizer_state == pytest.approx(4 * n / 2**30)
    assert adam.optimizer_state == pytest.approx(2 * rms.optimizer_state)
    one = estimate.dpo_memory_estimate(micro_batch_pairs=1)
    two = estimate.dpo_memory_estimate(micro_batch_pairs=2)
    assert two.activations == pytest.approx(2 * one.activations)
    ckpt = estimate.dpo_memory_estimate(micro_batch_pairs=16, gradient_checkpointing=True)
    plain = estimate.dpo_memory_estimate(micro_batch_pairs=16)
    assert ckpt.activations < plain.activations / 5 and ckpt.logits == plain.logits
    # The paper's batch 64 on one 80 GB GPU: 16 x 4 fits, 32 x 2 does not without checkpointing.
    assert plain.fits and not estimate.dpo_memory_estimate(micro_batch_pairs=32).fits
    assert estimate.dpo_memory_estimate(micro_batch_pairs=64, gradient_checkpointing=True).fits
    assert "16 x 4" in estimate.dpo_batch_plan(64)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        estimate.dpo_memory_estimate(seq_len=2048)


def test_activation_bytes_match_autograd() -> None:
    """Re-measure BLOCK_ACTIVATION_BYTES: bytes autograd saves per token per block under bf16 autocast."""
    h, heads, s = 128, 4, 64

    def saved_bytes(n_layer: int) -> int:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=64, n_positions=s, n_embd=h, n_layer=n_layer, n_head=heads,
                            bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
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
    assert per_token == pytest.approx(estimate.BLOCK_ACTIVATION_BYTES * h, rel=0.05)
