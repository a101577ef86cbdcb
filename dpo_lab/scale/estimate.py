"""What the paper's experiments would cost on a GPU, and what a DPO step needs in memory.

FLOPs by Kaplan et al. (2020, §2.1): 2·N per token forward, 6·N in training, N = the parameters matrix
multiplies use (embedding lookups out, the output projection in); attention scores and padding are left
out, so the real cost is higher. GPU hours = FLOPs / (peak FLOP/s × utilisation) / 3600.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Literal

import pandas as pd
import torch
import transformers
from transformers import AutoConfig, PretrainedConfig

from dpo_lab.dpo_trainer import accumulation_steps
from dpo_lab.presets import PRESETS, Preset

H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM5 datasheet, bf16 tensor cores, dense (1,979 is 2:4 sparse)
# Assumptions, not measurements: well-tuned bf16 training of 1-10 B models reaches 35-50% of peak; HF
# ``generate`` re-reads every weight per new token, so sampling is memory-bound.
DEFAULT_MFU = 0.40
DEFAULT_DECODE_MFU = 0.05
FLOPS_PER_PARAM_TOKEN = {"train": 6, "forward": 2, "decode": 2}
# IMDb: 280 GPT-2 tokens per review (mean of min(chars / 4, 512) over the 25,000 train reviews), 5 per prompt.
IMDB_TRAIN_REVIEWS, REVIEW_TOKENS, PROMPT_TOKENS = 25_000, 280.0, 5.0
# TL;DR and HH: round figures of the hub train splits and assumed token lengths (prompt + response).
HUB_TASKS = {"tldr": ("TL;DR (GPT-J 6B, β 0.5)", "CarperAI/openai_summarize_tldr_sft", 330.0 + 30.0, 92_000),
             "hh": ("Anthropic-HH (Pythia-2.8B, β 0.1)", "EleutherAI/pythia-2.8b", 160.0 + 70.0, 160_000)}

# ------------------------------------------------------------------------------------------ model sizes
KNOWN_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {  # the paper's models' published shapes
    "gpt2-large": ("gpt2", {"n_layer": 36, "n_embd": 1280, "n_head": 20}),
    "siebert/sentiment-roberta-large-english": ("roberta", {  # RoBERTa-large with a 2-label head
        "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
        "max_position_embeddings": 514, "type_vocab_size": 1, "num_labels": 2}),
    "CarperAI/openai_summarize_tldr_sft": ("gptj", {}),  # the defaults are GPT-J 6B's shapes
    "EleutherAI/pythia-2.8b": ("gpt_neox", {
        "vocab_size": 50304, "hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32,
        "intermediate_size": 10240, "rotary_pct": 0.25, "max_position_embeddings": 2048}),
}


def model_config(name: str) -> PretrainedConfig:
    """The config of one of :data:`KNOWN_CONFIGS` (a fresh object each call; no hub access)."""
    if name not in KNOWN_CONFIGS:
        raise KeyError(f"no config for model {name!r}; known: {list(KNOWN_CONFIGS)} (or pass a config)")
    return AutoConfig.for_model(KNOWN_CONFIGS[name][0], **KNOWN_CONFIGS[name][1])


@functools.cache
def _sizes(config_class: type, config_json: str) -> tuple[int, int, int]:
    """(parameters, N, the output projection's part of N) of a weightless instance; N counts a tied output
    matrix (a projection too) but no lookup and no classifier head (it runs once per sequence)."""
    config = config_class.from_dict(json.loads(config_json))
    classifier = config.model_type == "roberta"
    auto = getattr(transformers, f"AutoModelFor{'SequenceClassification' if classifier else 'CausalLM'}")
    with torch.device("meta"):
        model = auto.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    lookup = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    head = model.classifier if classifier else model.get_output_embeddings()
    size = sum(p.numel() for p in head.parameters())
    if classifier:
        return total, total - lookup - size, 0
    tied = head.weight is model.get_input_embeddings().weight
    return total, total - lookup + (size if tied else 0), size


def count_parameters(config: PretrainedConfig) -> int:
    """Parameters of the causal LM (a RoBERTa: the sequence classifier) that ``config`` describes."""
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"expected a transformers config, got {type(config).__name__}")
    return _sizes(type(config), config.to_json_string(use_diff=False))[0]


def matmul_params(model: str | PretrainedConfig, *, lm_head: bool = True) -> int:
    """N of the 6N rule for a :data:`KNOWN_CONFIGS` name or a config; ``lm_head=False``: without it."""
    config = model_config(model) if isinstance(model, str) else model
    _, n, head = _sizes(type(config), config.to_json_string(use_diff=False))
    return n - (0 if lm_head else head)


# ------------------------------------------------------------------------------------------ the bill
def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return value


def gpu_hours(flops: float, *, mfu: float = DEFAULT_MFU) -> float:
    """Hours one H100 needs for ``flops`` at model-FLOPs utilisation ``mfu``."""
    return flops / (H100_BF16_DENSE_FLOPS * _fraction("mfu", mfu)) / 3600.0


@dataclass(frozen=True)
class Stage:
    """One line of the bill: ``kind`` passes of ``model`` (N = ``params``) over the product of ``factors``
    (value, unit) tokens."""

    task: str
    stage: str
    model: str
    params: int
    kind: Literal["train", "forward", "decode"]
    factors: tuple[tuple[float, str], ...]

    @property
    def tokens(self) -> float:
        return math.prod(float(value) for value, _ in self.factors)

    @property
    def flops(self) -> float:
        return FLOPS_PER_PARAM_TOKEN[self.kind] * float(self.params) * self.tokens

    @property
    def arithmetic(self) -> str:
        formula = " × ".join(f"{v:,.4g} {unit}".strip() if not float(v).is_integer() else f"{int(v):,} {unit}"
                             for v, unit in self.factors)
        return f"{FLOPS_PER_PARAM_TOKEN[self.kind]} × {self.params / 1e6:,.1f}M × ({formula})"


def _points(max_steps: int, every: int) -> int:  # step 0, every ``every`` steps and the last (run.is_due)
    return 1 + math.ceil(max_steps / every)


def imdb_stages(preset: Preset | None = None) -> list[Stage]:
    """Every stage of the IMDb reproduction at ``preset`` (default ``paper``), full-length completions."""
    p = preset or PRESETS["paper"]
    if p.policy.source == "scratch":  # trained here (the gpu preset): the preset's shape and vocabulary
        config: str | PretrainedConfig = AutoConfig.for_model(
            "gpt2", n_layer=p.policy.n_layer, n_head=p.policy.n_head, n_embd=p.policy.n_embd,
            n_positions=p.policy.n_positions, vocab_size=p.tokenizer.vocab_size,
            bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is outside this vocabulary
        name = f"GPT-2 {p.policy.n_layer}x{p.policy.n_embd} (trained here)"
    else:
        config = name = p.policy.hub_name
    policy, backbone = (name, matmul_params(config)), (name, matmul_params(config, lm_head=False))
    rstar = p.reward.hub_name if p.reward.source != "offline" else None  # None: r* runs on the CPU
    rstar_n = (rstar, matmul_params(rstar) if rstar else 0)
    pref, dpo, rm, ppo, ev = p.preferences, p.dpo, p.reward_model, p.ppo, p.eval
    seq = PROMPT_TOKENS + pref.max_new_tokens
    n_samples = pref.n_prompts * pref.samples_per_prompt
    n_pairs = pref.n_prompts * math.comb(pref.samples_per_prompt, 2)  # every pair per prompt
    sft = ((p.policy.sft_steps * p.policy.sft_batch_size, "reviews") if p.policy.sft_steps > 0
           else (IMDB_TRAIN_REVIEWS, "reviews (1 epoch)"))
    base_steps = p.baselines.max_steps or dpo.max_steps
    pairwise = [("DPO (β sweep)", len(dpo.betas), dpo.max_steps),
                ("Unlikelihood (α sweep)", len(p.baselines.unlikelihood_alphas), base_steps),
                ("Preferred-FT (seeds)", len(p.baselines.preferred_ft_seeds), base_steps)]
    n_val = round(n_pairs * rm.val_fraction)
    n_val = n_val if rm.max_val_pairs is None else min(rm.max_val_pairs, n_val)
    n_train = round(n_pairs * (1 - 2 * rm.val_fraction))  # val_fraction to validation, as many to test
    rm_steps = rm.max_steps or rm.epochs * math.ceil(n_train / rm.batch_size)
    rm_seq = min(seq, rm.max_length)
    ppo_seq, eval_seq = PROMPT_TOKENS + ppo.max_new_tokens, PROMPT_TOKENS + ev.max_new_tokens
    ppo_runs = len(ppo.target_kls)  # per reward: PPO (r_phi) and PPO-GT (r*)
    rollouts = ((2 * ppo_runs, "runs"), (ppo.max_steps, "steps"), (ppo.rollout_batch_size, "rollouts"))
    scored = ((ppo_runs, "runs"), (ppo.max_steps, "steps"), (ppo.rollout_batch_size, "rollouts"))
    points = (sum(runs * _points(steps, dpo.eval_every) for _, runs, steps in pairwise)
              + 2 * ppo_runs * _points(ppo.max_steps, ppo.eval_every))
    per_point = ((points, "points"), (ev.n_prompts, "prompts"), (ev.samples_per_prompt, "samples"))
    two = (2, "seqs")  # chosen and rejected go through one forward, Preferred-FT's too
    bill = [
        ("SFT of π_ref", policy, "train", sft, (min(REVIEW_TOKENS, p.policy.n_positions), "tok")),
        ("preference data: sampling", policy, "decode", (pref.n_prompts, "prompts"),
         (pref.samples_per_prompt, "samples"), (seq, "tok")),
        ("preference data: r* scoring", rstar_n, "forward", (n_samples, "samples"), (seq, "tok")),
        ("reference log-probs (cached, shared by every run)", policy, "forward", (n_pairs, "pairs"), two,
         (seq, "tok")),
        *((name, policy, "train", (runs, "runs"), (steps, "steps"), (dpo.batch_size, "pairs"), two,
           (seq, "tok")) for name, runs, steps in pairwise),
        ("reward model r_φ: training", backbone, "train", (rm_steps, "steps"), (rm.batch_size, "pairs"), two,
         (rm_seq, "tok")),
        ("reward model r_φ: validation", backbone, "forward",  # every eval_every steps + each epoch's end
         (rm_steps // rm.eval_every + rm.epochs, "evals"), (n_val, "pairs"), two, (rm_seq, "tok")),
        ("PPO + PPO-GT: rollouts", policy, "decode", *rollouts, (ppo_seq, "tok")),
        ("PPO + PPO-GT: old and reference log-probs", policy, "forward", *rollouts, (2, "models"),
         (ppo_seq, "tok")),
        ("PPO: r_φ scoring", backbone, "forward", *scored, (ppo_seq, "tok")),
        ("PPO-GT: r* scoring", rstar_n, "forward", *scored, (ppo_seq, "tok")),
        ("PPO + PPO-GT: clipped updates", policy, "train", *rollouts, (ppo.ppo_epochs, "epochs"),
         (ppo_seq, "tok")),
        ("evaluation: sampling", policy, "decode", *per_point, (eval_seq, "tok")),
        ("evaluation: KL (policy + reference)", policy, "forward", *per_point, (2, "models"),
         (eval_seq, "tok")),
        ("evaluation: r* scoring", rstar_n, "forward", *per_point, (eval_seq, "tok")),
    ]
    task = f"IMDb ({p.name} preset)"
    return [Stage(task, stage, model, n, kind, tuple(factors))
            for stage, (model, n), kind, *factors in bill if model is not None]


def hub_task_stages() -> list[Stage]:
    """The paper's TL;DR and HH DPO runs, one epoch of batch 64 each, no GPT-4 judging; HH's π_ref is
    Preferred-FT on the chosen responses. Cross-check: the official Pythia-2.8B HH run took ~11 A100-hours;
    its reference + DPO lines here are ~3.5 at 40% MFU (it pads to 512, FSDP)."""
    stages, batch_size = [], 64
    for key, (task, model, seq, pairs) in HUB_TASKS.items():
        n, steps = matmul_params(model), math.ceil(pairs / batch_size)
        train = ((steps, "steps"), (batch_size, "pairs"), (2, "seqs"), (seq, "tok"))
        if key == "hh":  # its trainer runs the rejected responses forward too
            stages.append(Stage(task, "π_ref: Preferred-FT on chosen", model, n, "train", train))
        stages.append(Stage(task, "reference log-probs", model, n, "forward",
                            ((pairs, "pairs"), (2, "seqs"), (seq, "tok"))))
        stages.append(Stage(task, "DPO", model, n, "train", train))
    return stages


def cost_table(stages: Iterable[Stage], *, mfu: float = DEFAULT_MFU,
               decode_mfu: float = DEFAULT_DECODE_MFU) -> pd.DataFrame:
    """One row per stage, each task closed by a ``total`` row; ``decode_mfu`` is sampling's utilisation."""
    mfu, decode_mfu = _fraction("mfu", mfu), _fraction("decode_mfu", decode_mfu)
    table = pd.DataFrame([{"task": s.task, "stage": s.stage, "model": s.model, "pass": s.kind,
                           "params": s.params, "tokens": s.tokens, "flops": s.flops,
                           "utilisation": (u := decode_mfu if s.kind == "decode" else mfu),
                           "gpu_hours": gpu_hours(s.flops, mfu=u), "arithmetic": s.arithmetic}
                          for s in stages])
    if table.empty:
        raise ValueError("cost_table needs at least one stage")
    sums = table.groupby("task", sort=False)[["flops", "gpu_hours"]].sum().reset_index()
    parts = [(rows, sums[sums["task"] == task].assign(stage="total"))
             for task, rows in table.groupby("task", sort=False)]
    return pd.concat([frame for pair in parts for frame in pair], ignore_index=True)


def paper_cost_table(*, mfu: float = DEFAULT_MFU, decode_mfu: float = DEFAULT_DECODE_MFU) -> pd.DataFrame:
    """The ``paper`` preset's IMDb reproduction plus the TL;DR and HH DPO runs."""
    return cost_table([*imdb_stages(), *hub_task_stages()], mfu=mfu, decode_mfu=decode_mfu)


# ----------------------------------------------------------------------------------------- memory estimate
GiB = 2**30
# Bytes autograd saves for backward per token per GPT-2 block, in units of the width h, under bf16 autocast
# with SDPA attention, MEASURED on CPU (torch 2.13) with saved_tensors_hooks: 3 blocks minus 1
# (test_activation_bytes_match_autograd re-measures it); a checkpointed block keeps only its fp32 input, 4 h.
# Not GPU measurements; fragmentation and CUDA/NCCL workspaces not counted.
BLOCK_ACTIVATION_BYTES, CHECKPOINTED_BLOCK_BYTES = 60, 4
LOGIT_BYTES = 11  # per logit: 5 saved for backward (the fp32 copy log-softmax reads) + 6 of its gradient
AUTOCAST_WEIGHT_BYTES = 2  # autocast's bf16 copy of each cast weight, kept until backward (measured)
OPTIMIZER_BUFFERS = {"rmsprop": 1, "adamw": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB of GPU memory for one DPO training step, by part, on one 80 GiB GPU."""

    weights: float
    gradients: float
    optimizer_state: float
    autocast_weights: float
    activations: float
    logits: float
    gpu_gib: float = 80.0

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "gpu_gib")  # the parts, in order

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_gib


def dpo_memory_estimate(*, micro_batch_pairs: int = 1, seq_len: int = 512, optimizer: str = "rmsprop",
                        gradient_checkpointing: bool = False) -> MemoryEstimate:
    """Peak GPU memory of one DPO micro-batch step of gpt2-large: fp32 weights, gradients and optimizer state
    (the reference's log-probs are cached: it is not resident), then 2 x ``micro_batch_pairs`` sequences'
    activations, logits and autocast's bf16 weight copies."""
    config = model_config("gpt2-large")
    for name, value in (("micro_batch_pairs", micro_batch_pairs), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if seq_len > config.n_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context n_positions {config.n_positions}")
    if optimizer not in OPTIMIZER_BUFFERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZER_BUFFERS)}, got {optimizer!r}")
    n, d, n_layer = count_parameters(config), config.n_embd, config.n_layer
    tokens = 2 * micro_batch_pairs * seq_len  # chosen + rejected
    live = 1 if gradient_checkpointing else n_layer  # blocks whose activations are kept at once
    inputs = n_layer * CHECKPOINTED_BLOCK_BYTES * d if gradient_checkpointing else 0
    activations = tokens * (inputs + live * BLOCK_ACTIVATION_BYTES * d)
    cast_params = config.vocab_size * d + live * (12 * d**2 + 13 * d)  # the LM head's and the blocks' weights
    return MemoryEstimate(weights=4 * n / GiB, gradients=4 * n / GiB,
                          optimizer_state=4 * n * OPTIMIZER_BUFFERS[optimizer] / GiB,
                          autocast_weights=AUTOCAST_WEIGHT_BYTES * cast_params / GiB,
                          activations=activations / GiB,
                          logits=tokens * config.vocab_size * LOGIT_BYTES / GiB)


def dpo_batch_plan(global_batch: int = 64, num_processes: int = 1) -> str:
    """Each micro-batch that divides ``global_batch`` over the GPUs: its accumulation and GiB per GPU."""
    lines = [f"global batch {global_batch} on {num_processes} GPU(s):",
             "micro x accumulation | GiB per GPU (no checkpointing) | GiB (gradient checkpointing)"]
    for micro in range(1, global_batch + 1):
        if global_batch % (micro * num_processes):
            continue
        accum = accumulation_steps(global_batch, micro, num_processes)
        plain = dpo_memory_estimate(micro_batch_pairs=micro)
        ckpt = dpo_memory_estimate(micro_batch_pairs=micro, gradient_checkpointing=True)
        lines.append(f"{micro:>5} x {accum:<13} | {plain.total:7.1f}{'' if plain.fits else ' (too big)':11}"
                     f"            | {ckpt.total:7.1f}{'' if ckpt.fits else ' (too big)'}")
    return "\n".join(lines)
