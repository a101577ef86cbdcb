"""What the paper's experiments would cost on a GPU: FLOPs by the 6N / 2N rule, then GPU hours.

For a transformer with N parameters taking part in a token's matrix multiplies (Kaplan et al. 2020, §2.1):

    forward  ≈ 2·N FLOPs per token        (reference log-probs, scoring, sampling)
    training ≈ 6·N FLOPs per token        (forward 2N + backward 4N)

    GPU hours = FLOPs / (peak FLOP/s × model-FLOPs utilisation) / 3600

N excludes the embedding *lookups* (input and position embeddings select a row; they multiply nothing) but
includes the output projection to the vocabulary (for GPT-2 the tied input embedding, used as a matrix).
The attention-score term Kaplan et al. add, 2·n_layer·n_ctx·d per token, is left out: at 512 tokens it is
~3% of 2N for gpt2-large (:func:`attention_share`). Padding is left out too (the token counts are real
tokens), so padded batches and a lower utilisation than assumed both make the real cost higher.

Parameter counts are computed from each model's config arithmetically (no weights are built or fetched);
the tests check the arithmetic against tiny instantiated models of each architecture.

Memory of DPO on gpt2-large (774,030,080 parameters) on one 80 GB GPU, from :func:`dpo_memory_estimate`
(GiB = 2**30 bytes; sequences of 512 tokens, bf16 autocast, SDPA attention; ``print(dpo_batch_plan())``
prints the whole table):

    policy weights fp32 2.9 | gradients fp32 2.9 | RMSprop state (1 buffer) 2.9, AdamW (2 buffers) 5.8
    autocast's bf16 weight copies 1.4 (0.2 with gradient checkpointing)
    frozen reference: bf16 1.4, fp32 2.9, or 0 when its log-probs are precomputed (what this module does)
    -> fixed part: 10.1 GiB with RMSprop, 13.0 GiB with AdamW (+ the reference if kept on the GPU)
    per PAIR of the micro-batch (chosen + rejected = 2 sequences of 512 tokens):
        no checkpointing: activations 2.6 + logits 0.5 = 3.2 GiB;  gradient checkpointing: 0.2 + 0.5 = 0.7 GiB
    -> the paper's batch 64 on one 80 GB GPU, RMSprop, no checkpointing: micro-batch 16 x accumulation 4
       (~61 GiB; 32 x 2 needs ~111); with gradient checkpointing 64 x 1 fits (~59 GiB), 32 x 2 ~34 GiB.
       AdamW adds 2.9 GiB, a resident bf16 reference 1.4 GiB: 16 x 4 still fits.

ACTIVATION_BYTES, LOGIT_BYTES and AUTOCAST_WEIGHT_BYTES were measured on CPU by counting what autograd saves
for backward under bf16 autocast (see their comments); CUDA autocast casts the same ops to bf16, but the
numbers are not GPU measurements, and the estimate ignores allocator fragmentation and CUDA/NCCL workspaces.
Rough check: a 64-pair DPO step of randomly initialised gpt2-large on an H200 was seen to peak at 31 GiB
(details unknown). IMDb pairs are ~70 tokens long (2-8 prompt tokens + 64 new ones): the estimate for 64
pairs of 64-72 tokens in one micro-batch is 35-39 GiB, the right size; at 512 tokens that step would not
fit in 80 GB without checkpointing.

Every row of :func:`cost_table` carries its token arithmetic as text, so a notebook shows how it was made.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import pandas as pd
from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, PretrainedConfig, RobertaConfig

from dpo_lab.dpo_trainer import accumulation_steps
from dpo_lab.presets import PRESETS, Preset

# NVIDIA H100 SXM5 datasheet: 989 TFLOP/s BF16 tensor-core throughput, dense (the 1,979 figure assumes 2:4
# sparsity, which training does not use).
H100_BF16_DENSE_FLOPS = 989e12
A100_BF16_DENSE_FLOPS = 312e12  # NVIDIA A100 datasheet, BF16 tensor core, dense: the paper's era of GPU
# Model-FLOPs utilisation of well-tuned bf16 training of 1-10 B models on one node is commonly 35-50%
# (e.g. PaLM reports 46% at 540 B; small models with short sequences and HF eager kernels do worse). 40% is
# an assumption, not a measurement: pass your own.
DEFAULT_MFU = 0.40
# Token-by-token sampling with HF ``generate`` re-reads all weights for every new token and pays Python and
# kernel-launch overhead per step; for sub-10 B models at batch 128-1,024 that, not arithmetic, sets the
# pace. 5% is an assumption for that regime, kept separate from DEFAULT_MFU so either can be changed.
DEFAULT_DECODE_MFU = 0.05

Pass = Literal["train", "forward", "decode"]
PASSES: tuple[str, ...] = get_args(Pass)
FLOPS_PER_PARAM_TOKEN: dict[str, int] = {"train": 6, "forward": 2, "decode": 2}


# ------------------------------------------------------------------------------------------ model sizes
def _known_configs() -> dict[str, PretrainedConfig]:
    """Configs of the paper's models, written out from their published shapes (no hub access)."""
    return {
        # gpt2-large: 36 layers, width 1280, 20 heads, GPT-2's 50,257-token vocabulary, 1,024 positions.
        "gpt2-large": GPT2Config(n_layer=36, n_embd=1280, n_head=20),
        # RoBERTa-large shapes with a 2-label head (siebert predicts negative/positive).
        "siebert/sentiment-roberta-large-english": RobertaConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
            max_position_embeddings=514, type_vocab_size=1, num_labels=2),
        # GPTJConfig's defaults are GPT-J 6B's shapes; the TL;DR SFT policy is a fine-tuned GPT-J.
        "CarperAI/openai_summarize_tldr_sft": GPTJConfig(),
        "EleutherAI/pythia-2.8b": GPTNeoXConfig(
            vocab_size=50304, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
            intermediate_size=10240, rotary_pct=0.25, max_position_embeddings=2048),
    }


KNOWN_MODELS: tuple[str, ...] = tuple(_known_configs())


def model_config(name: str) -> PretrainedConfig:
    """The config of one of :data:`KNOWN_MODELS` (a fresh object each call)."""
    configs = _known_configs()
    if name not in configs:
        raise KeyError(f"no config for model {name!r}; known: {list(configs)} (or pass a config)")
    return configs[name]


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one model, split by what they do per token.

    ``total``: every trainable parameter (tied matrices once), as ``sum(p.numel())`` of the HF model.
    ``lookup``: embedding tables that are indexed, not multiplied (input, position, token-type).
    ``output``: the projection to the vocabulary (or the classifier head), multiplied at every token.
    """

    total: int
    lookup: int
    output: int
    tied: bool

    @property
    def matmul(self) -> int:
        """N of the 6N rule: parameters a token's forward pass multiplies by (a tied output matrix counts
        once as a lookup it is not, and once as a projection it is)."""
        return self.total - self.lookup + (self.output if self.tied else 0)


def _layer_norm(d: int) -> int:
    return 2 * d  # weight and bias


def _linear(d_in: int, d_out: int, bias: bool = True) -> int:
    return d_in * d_out + (d_out if bias else 0)


def count_parameters(config: PretrainedConfig) -> ParamCount:
    """Parameter count of a GPT-2, GPT-J, GPT-NeoX (Pythia) causal LM or a RoBERTa sequence classifier,
    from the config's shapes alone. Raises for any other architecture rather than guess."""
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"expected a transformers config, got {type(config).__name__}")
    kind = config.model_type
    if kind == "gpt2":
        d, v, n_layer = config.n_embd, config.vocab_size, config.n_layer
        inner = config.n_inner or 4 * d
        block = (_layer_norm(d) + _linear(d, 3 * d) + _linear(d, d)  # ln_1, fused qkv, attention out
                 + _layer_norm(d) + _linear(d, inner) + _linear(inner, d))  # ln_2, MLP
        lookup = v * d + config.n_positions * d  # wte, wpe
        tied = bool(config.tie_word_embeddings)
        output = v * d  # lm_head (no bias); tied to wte by default
        total = lookup + n_layer * block + _layer_norm(d) + (0 if tied else output)
    elif kind == "gptj":
        d, v, n_layer = config.n_embd, config.vocab_size, config.n_layer
        inner = config.n_inner or 4 * d
        # One layer norm per block (attention and MLP run in parallel on its output); q, k, v, out: no bias.
        block = _layer_norm(d) + 4 * _linear(d, d, bias=False) + _linear(d, inner) + _linear(inner, d)
        lookup = v * d  # rotary positions have no parameters
        tied = bool(config.tie_word_embeddings)
        output = _linear(d, v)  # GPT-J's lm_head has a bias
        total = lookup + n_layer * block + _layer_norm(d) + (0 if tied else output)
    elif kind == "gpt_neox":
        d, v, n_layer = config.hidden_size, config.vocab_size, config.num_hidden_layers
        inner, bias = config.intermediate_size, bool(config.attention_bias)
        block = (2 * _layer_norm(d) + _linear(d, 3 * d, bias) + _linear(d, d, bias)
                 + _linear(d, inner) + _linear(inner, d))
        lookup = v * d  # embed_in
        tied = bool(config.tie_word_embeddings)
        output = v * d  # embed_out, no bias
        total = lookup + n_layer * block + _layer_norm(d) + (0 if tied else output)
    elif kind == "roberta":
        d, n_layer, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
        lookup = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * d
        block = (4 * _linear(d, d) + _layer_norm(d)  # self-attention q, k, v, out + its layer norm
                 + _linear(d, inner) + _linear(inner, d) + _layer_norm(d))  # feed-forward + layer norm
        # RobertaForSequenceClassification: no pooler; head = dense d x d + out_proj d x labels, on <s> only.
        output = _linear(d, d) + _linear(d, config.num_labels)
        total = lookup + _layer_norm(d) + n_layer * block + output
        # The head runs once per sequence, not per token: leave it out of the per-token N.
        return ParamCount(total=total, lookup=lookup + output, output=0, tied=False)
    else:
        raise ValueError(f"count_parameters knows gpt2, gptj, gpt_neox and roberta, not {kind!r}")
    return ParamCount(total=total, lookup=lookup, output=output, tied=tied)


def matmul_params(model: str | PretrainedConfig, *, lm_head: bool = True) -> int:
    """N for the 6N rule of ``model`` (a name in :data:`KNOWN_MODELS` or a config). ``lm_head=False``: the
    transformer alone, as under a scalar reward head."""
    count = count_parameters(model_config(model) if isinstance(model, str) else model)
    return count.matmul - (0 if lm_head else count.output)


def attention_share(config: PretrainedConfig, context: int) -> float:
    """The attention-score FLOPs Kaplan et al. add per token, 2·n_layer·context·d, as a share of 2N."""
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive int, got {context!r}")
    d = getattr(config, "n_embd", None) or config.hidden_size
    n_layer = getattr(config, "n_layer", None) or config.num_hidden_layers
    return (2 * n_layer * context * d) / (2 * matmul_params(config))


# ------------------------------------------------------------------------------------------ arithmetic
def _check_count(name: str, value: float, *, integer: bool = False, allow_zero: bool = True) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value < 0 or (
            not allow_zero and value == 0):
        kind = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite {kind} {bound}, got {value!r}")


def gpu_hours(flops: float, *, mfu: float = DEFAULT_MFU, peak_flops: float = H100_BF16_DENSE_FLOPS) -> float:
    """Hours one GPU of ``peak_flops`` FLOP/s needs for ``flops`` at model-FLOPs utilisation ``mfu``."""
    _check_count("flops", flops)
    _check_count("peak_flops", peak_flops, allow_zero=False)
    if isinstance(mfu, bool) or not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        raise ValueError(f"mfu must be a fraction in (0, 1], got {mfu!r}")
    return flops / (peak_flops * mfu) / 3600.0


@dataclass(frozen=True)
class Tokens:
    """A token count and the product that made it, e.g. ``4 runs × 2,400 steps × 64 pairs``."""

    count: float
    formula: str

    @classmethod
    def product(cls, *factors: tuple[float, str]) -> Tokens:
        """Multiply ``(value, unit)`` factors, keeping each one in the formula."""
        if not factors:
            raise ValueError("Tokens.product needs at least one factor")
        count = 1.0
        for value, unit in factors:
            _check_count(f"factor {unit!r}", value)
            count *= value
        text = " × ".join(f"{value:,.4g} {unit}".strip() if not float(value).is_integer()
                          else f"{int(value):,} {unit}".strip() for value, unit in factors)
        return cls(count=count, formula=text)


@dataclass(frozen=True)
class Stage:
    """One line of the bill: ``tokens`` tokens through ``model`` (N = ``params``) in ``kind`` passes."""

    task: str
    stage: str
    model: str
    params: int
    kind: Pass
    tokens: Tokens

    def __post_init__(self) -> None:
        if self.kind not in PASSES:
            raise ValueError(f"stage {self.stage!r}: kind must be one of {list(PASSES)}, got {self.kind!r}")
        _check_count(f"stage {self.stage!r} params", self.params, integer=True, allow_zero=False)

    @property
    def flops(self) -> float:
        factor = FLOPS_PER_PARAM_TOKEN[self.kind]
        return factor * float(self.params) * self.tokens.count

    @property
    def arithmetic(self) -> str:
        factor = FLOPS_PER_PARAM_TOKEN[self.kind]
        return f"{factor} × {self.params / 1e6:,.1f}M × ({self.tokens.formula})"


# ------------------------------------------------------------------------------- the paper's experiments
def _steps(max_steps: int, every: int) -> int:
    """Evaluation points of a run: step 0, every ``every`` steps, and the last step (runs.is_due)."""
    return 1 + math.ceil(max_steps / every)


def imdb_stages(
    preset: Preset | None = None,
    *,
    n_train_reviews: int = 25_000,
    review_tokens: float = 280.0,
    prompt_tokens: float = 5.0,
) -> list[Stage]:
    """Every stage of the IMDb reproduction at ``preset`` (default: the ``paper`` preset).

    Assumptions (arguments): ``n_train_reviews`` = IMDb's train split; ``review_tokens`` = mean GPT-2
    tokens of a train review cut at the context (512): 280 is min(chars / 4, 512) averaged over the
    22,411 offline train reviews (1,304 characters mean), with 4 characters per BPE token a rule of thumb;
    ``prompt_tokens`` = mean prefix length (the paper's 2-8 tokens). Completions are taken at full length
    (``max_new_tokens``). The r* classifier is assumed to see as many tokens as the policy. A policy trained
    here (``policy.source == "scratch"``: the ``gpu`` preset) is billed at the preset's own shape and
    vocabulary; an offline r* (TF-IDF + logistic regression) runs on the CPU and gets no GPU rows.
    """
    p = preset or PRESETS["paper"]
    _check_count("n_train_reviews", n_train_reviews, integer=True, allow_zero=False)
    _check_count("review_tokens", review_tokens, allow_zero=False)
    _check_count("prompt_tokens", prompt_tokens)
    review_tokens = min(review_tokens, p.policy.n_positions)
    task = f"IMDb ({p.name} preset)"
    if p.policy.source == "scratch":  # a GPT-2 of the preset's shape, trained here (the gpu preset)
        policy_config: str | PretrainedConfig = GPT2Config(
            n_layer=p.policy.n_layer, n_head=p.policy.n_head, n_embd=p.policy.n_embd,
            n_positions=p.policy.n_positions, vocab_size=p.tokenizer.vocab_size,
            bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is outside this vocabulary
        policy_name = f"GPT-2 {p.policy.n_layer}x{p.policy.n_embd} (trained here)"
    else:
        policy_config = policy_name = p.policy.hub_name
    n_policy = matmul_params(policy_config)
    n_backbone = matmul_params(policy_config, lm_head=False)  # r_phi: transformer + scalar head
    # An offline r* (TF-IDF + logistic regression) runs on the CPU: no GPU rows for it.
    rstar_name = p.reward.hub_name if p.reward.source != "offline" else None
    n_rstar = matmul_params(rstar_name) if rstar_name else 0

    pref = p.preferences
    seq = prompt_tokens + pref.max_new_tokens  # one prompt + completion
    n_samples = pref.n_prompts * pref.samples_per_prompt
    n_pairs = pref.n_prompts * math.comb(pref.samples_per_prompt, 2)  # all pairs per prompt, ties ignored

    stages: list[Stage] = []

    def add(stage: str, model: str | None, params: int, kind: Pass, *factors: tuple[float, str]) -> None:
        if model is not None:
            stages.append(Stage(task, stage, model, params, kind, Tokens.product(*factors)))

    sft_texts = (p.policy.sft_steps * p.policy.sft_batch_size, "reviews") if p.policy.sft_steps > 0 \
        else (n_train_reviews, "reviews (1 epoch)")
    add("SFT of π_ref", policy_name, n_policy, "train", sft_texts, (review_tokens, "tok"))
    add("preference data: sampling", policy_name, n_policy, "decode",
        (pref.n_prompts, "prompts"), (pref.samples_per_prompt, "samples"), (seq, "tok"))
    add("preference data: r* scoring", rstar_name, n_rstar, "forward", (n_samples, "samples"), (seq, "tok"))
    add("reference log-probs (cached, shared by every run)", policy_name, n_policy, "forward",
        (n_pairs, "pairs"), (2, "seqs"), (seq, "tok"))

    dpo = p.dpo
    baseline_steps = p.baselines.max_steps or dpo.max_steps
    pairwise = [("DPO (β sweep)", len(dpo.betas), dpo.max_steps),
                ("Unlikelihood (α sweep)", len(p.baselines.unlikelihood_alphas), baseline_steps),
                ("Preferred-FT (seeds)", len(p.baselines.preferred_ft_seeds), baseline_steps)]
    for name, runs, steps in pairwise:
        # The trainer runs chosen and rejected through one forward/backward, Preferred-FT included.
        add(name, policy_name, n_policy, "train", (runs, "runs"), (steps, "steps"),
            (dpo.batch_size, "pairs"), (2, "seqs"), (seq, "tok"))

    rm = p.reward_model
    n_train_pairs = round(n_pairs * (1 - 2 * rm.val_fraction))  # val_fraction to validation, as many to test
    n_val_pairs = round(n_pairs * rm.val_fraction)
    n_val_pairs = n_val_pairs if rm.max_val_pairs is None else min(rm.max_val_pairs, n_val_pairs)
    rm_steps = rm.max_steps or rm.epochs * math.ceil(n_train_pairs / rm.batch_size)
    rm_evals = rm_steps // rm.eval_every + rm.epochs  # every eval_every steps + once per epoch end
    rm_seq = min(seq, rm.max_length)
    add("reward model r_φ: training", policy_name, n_backbone, "train",
        (rm_steps, "steps"), (rm.batch_size, "pairs"), (2, "seqs"), (rm_seq, "tok"))
    add("reward model r_φ: validation", policy_name, n_backbone, "forward",
        (rm_evals, "evals"), (n_val_pairs, "pairs"), (2, "seqs"), (rm_seq, "tok"))

    ppo = p.ppo
    ppo_runs = len(ppo.target_kls)  # per reward: PPO (learned r_phi) and PPO-GT (r*)
    ppo_seq = prompt_tokens + ppo.max_new_tokens
    rollouts = ((2 * ppo_runs, "runs"), (ppo.max_steps, "steps"), (ppo.rollout_batch_size, "rollouts"))
    add("PPO + PPO-GT: rollouts", policy_name, n_policy, "decode", *rollouts, (ppo_seq, "tok"))
    # Old log-probs + values (policy with value head) and the reference's log-probs: two forwards.
    add("PPO + PPO-GT: old and reference log-probs", policy_name, n_policy, "forward", *rollouts,
        (2, "models"), (ppo_seq, "tok"))
    add("PPO: r_φ scoring", policy_name, n_backbone, "forward", (ppo_runs, "runs"), (ppo.max_steps, "steps"),
        (ppo.rollout_batch_size, "rollouts"), (ppo_seq, "tok"))
    add("PPO-GT: r* scoring", rstar_name, n_rstar, "forward", (ppo_runs, "runs"), (ppo.max_steps, "steps"),
        (ppo.rollout_batch_size, "rollouts"), (ppo_seq, "tok"))
    add("PPO + PPO-GT: clipped updates", policy_name, n_policy, "train", *rollouts,
        (ppo.ppo_epochs, "epochs"), (ppo_seq, "tok"))

    ev = p.eval
    eval_seq = prompt_tokens + ev.max_new_tokens
    points = (sum(runs * _steps(steps, dpo.eval_every) for _, runs, steps in pairwise)
              + 2 * ppo_runs * _steps(ppo.max_steps, ppo.eval_every))
    per_point = ((points, "points"), (ev.n_prompts, "prompts"), (ev.samples_per_prompt, "samples"))
    add("evaluation: sampling", policy_name, n_policy, "decode", *per_point, (eval_seq, "tok"))
    add("evaluation: KL (policy + reference)", policy_name, n_policy, "forward", *per_point,
        (2, "models"), (eval_seq, "tok"))
    add("evaluation: r* scoring", rstar_name, n_rstar, "forward", *per_point, (eval_seq, "tok"))
    return stages


def hub_task_stages(
    *,
    tldr_pairs: int = 92_000,
    tldr_prompt_tokens: float = 330.0,
    tldr_summary_tokens: float = 30.0,
    hh_pairs: int = 160_000,
    hh_prompt_tokens: float = 160.0,
    hh_response_tokens: float = 70.0,
    epochs: int = 1,
    batch_size: int = 64,
) -> list[Stage]:
    """The paper's TL;DR (GPT-J 6B, β 0.5) and Anthropic-HH (Pythia-2.8B, β 0.1) DPO runs, one each.

    Pair counts are the issue's round figures for the hub train splits; the token lengths are assumptions
    (not measured here: the data is on the hub) and are arguments. HH has no SFT model, so its π_ref is
    Preferred-FT (SFT on the chosen responses, one epoch) and that run is billed too. GPT-4 judging and
    sampling for win rates are not included. One epoch of DPO, as the official code's default.

    A cross-check: the official repository's README gives ~2 h 45 min on 4 A100s (11 A100-hours) for its
    Pythia-2.8B HH DPO run, which computes reference log-probs online as this bill's "reference log-probs"
    line does once. Those two lines come to ~1.6e18 FLOPs, 3.5 A100-hours at 40% MFU: that run's batches
    are padded to 512 tokens and sharded with FSDP, so its utilisation of real tokens was nearer 13%.
    """
    for name, value in (("tldr_pairs", tldr_pairs), ("hh_pairs", hh_pairs), ("epochs", epochs),
                        ("batch_size", batch_size)):
        _check_count(name, value, integer=True, allow_zero=False)
    for name, value in (("tldr_prompt_tokens", tldr_prompt_tokens), ("tldr_summary_tokens",
                        tldr_summary_tokens), ("hh_prompt_tokens", hh_prompt_tokens),
                        ("hh_response_tokens", hh_response_tokens)):
        _check_count(name, value, allow_zero=False)
    stages: list[Stage] = []
    tasks = (("TL;DR (GPT-J 6B, β 0.5)", "CarperAI/openai_summarize_tldr_sft", tldr_pairs,
              tldr_prompt_tokens + tldr_summary_tokens),
             ("Anthropic-HH (Pythia-2.8B, β 0.1)", "EleutherAI/pythia-2.8b", hh_pairs,
              hh_prompt_tokens + hh_response_tokens))
    for task, model, pairs, seq in tasks:
        n = matmul_params(model)
        steps = epochs * math.ceil(pairs / batch_size)
        if model == "EleutherAI/pythia-2.8b":
            # As this project runs it (sweeps/hh_paper.yaml): the pairwise trainer with
            # objective="preferred_ft", which passes the rejected response through the same forward for its
            # logs, so two sequences per pair (a plain SFT on the chosen responses would cost half).
            stages.append(Stage(task, "π_ref: Preferred-FT on chosen", model, n, "train", Tokens.product(
                (steps, "steps"), (batch_size, "pairs"), (2, "seqs"), (seq, "tok"))))
        stages.append(Stage(task, "reference log-probs", model, n, "forward", Tokens.product(
            (pairs, "pairs"), (2, "seqs"), (seq, "tok"))))
        stages.append(Stage(task, "DPO", model, n, "train", Tokens.product(
            (steps, "steps"), (batch_size, "pairs"), (2, "seqs"), (seq, "tok"))))
    return stages


def cost_table(
    stages: Sequence[Stage] | Iterable[Stage],
    *,
    mfu: float = DEFAULT_MFU,
    decode_mfu: float = DEFAULT_DECODE_MFU,
    peak_flops: float = H100_BF16_DENSE_FLOPS,
    total: bool = True,
) -> pd.DataFrame:
    """One row per stage: task, stage, model, pass, params (N), tokens, FLOPs, utilisation, GPU hours and
    the arithmetic; ``total`` appends one total row per task. ``mfu`` applies to training and forward
    passes, ``decode_mfu`` to token-by-token sampling."""
    stages = list(stages)
    if not stages:
        raise ValueError("cost_table needs at least one stage")
    for name, value in (("mfu", mfu), ("decode_mfu", decode_mfu)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    rows = []
    for s in stages:
        util = decode_mfu if s.kind == "decode" else mfu
        rows.append({"task": s.task, "stage": s.stage, "model": s.model, "pass": s.kind, "params": s.params,
                     "tokens": s.tokens.count, "flops": s.flops, "utilisation": util,
                     "gpu_hours": gpu_hours(s.flops, mfu=util, peak_flops=peak_flops),
                     "arithmetic": s.arithmetic})
    table = pd.DataFrame(rows)
    if total:
        # Tokens of different models do not add up to anything meaningful: the total row sums FLOPs and hours.
        sums = table.groupby("task", sort=False)[["flops", "gpu_hours"]].sum().reset_index()
        sums["stage"] = "total"
        table = pd.concat([table, sums], ignore_index=True)
        order = {t: i for i, t in enumerate(dict.fromkeys(table["task"]))}
        table = table.sort_values(["task", "stage"], key=lambda c: c.map(order) if c.name == "task"
                                  else (c == "total").astype(int), kind="stable").reset_index(drop=True)
    return table


def paper_cost_table(
    *,
    mfu: float = DEFAULT_MFU,
    decode_mfu: float = DEFAULT_DECODE_MFU,
    peak_flops: float = H100_BF16_DENSE_FLOPS,
    preset: Preset | None = None,
) -> pd.DataFrame:
    """The `paper` preset's IMDb reproduction plus the TL;DR and HH DPO runs, with default assumptions."""
    return cost_table([*imdb_stages(preset), *hub_task_stages()], mfu=mfu, decode_mfu=decode_mfu,
                      peak_flops=peak_flops)


# ----------------------------------------------------------------------------------------- memory estimate
GiB = 2**30
# Bytes autograd keeps for backward per token, per layer, in units of the width h, for a GPT-2 block under
# bf16 autocast (fp32 residual stream and LayerNorms, bf16 matmuls), MEASURED on CPU (torch 2.13 autocast)
# by summing the unique non-parameter storages that torch.autograd.graph.saved_tensors_hooks sees in one
# forward pass, 3 blocks minus 1 block (h = 256..1280, 128..512 tokens; the test
# test_activation_coefficients_match_autograd re-measures them). SDPA: 60 h; eager attention adds 6 bytes per
# head per key (the s x s scores); with gradient checkpointing a block keeps only its fp32 input, 4 h.
# (Korthikanti et al. 2022 count 34 h for an all-16-bit block: autocast keeps several tensors in fp32.)
ACTIVATION_BYTES = {"block": 60, "eager_attention_per_head_key": 6, "checkpointed_block_input": 4}
# Per logit (token x vocabulary entry): 5 bytes saved for backward (measured as above: the fp32 copy that
# log-softmax reads, plus change) + 6 bytes of its gradient in backward (fp32, then the bf16 cast).
LOGIT_BYTES = 11
# Autocast keeps a bf16 copy of every weight it casts until backward has used it: 2 bytes per parameter
# (measured: the 24 h^2 bytes per block that the saved-tensor count above also finds, i.e. 2 x 12 h^2).
AUTOCAST_WEIGHT_BYTES = 2


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB of GPU memory for one DPO training step (see :func:`dpo_memory_estimate`)."""

    n_params: int
    micro_batch_pairs: int
    seq_len: int
    optimizer: str
    gradient_checkpointing: bool
    weights: float
    gradients: float
    optimizer_state: float
    reference: float
    autocast_weights: float
    activations: float
    logits: float
    total: float
    gpu_gib: float

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_gib

    def describe(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k):.1f}" for k in
                          ("weights", "gradients", "optimizer_state", "reference", "autocast_weights",
                           "activations", "logits"))
        return (f"micro-batch {self.micro_batch_pairs} pairs x {self.seq_len} tokens, {self.optimizer}, "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}: {parts} -> "
                f"{self.total:.1f} GiB of {self.gpu_gib:g}")


def gpt2_param_count(n_layer: int, n_embd: int, vocab_size: int, n_positions: int) -> int:
    """Parameters of a GPT-2 with tied embeddings (gpt2-large: 36, 1280, 50257, 1024 -> 774,030,080), counted
    by ``estimate.count_parameters`` from the config's shapes."""
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, n_positions=n_positions)
    return count_parameters(config).total


def dpo_memory_estimate(
    *,
    micro_batch_pairs: int = 1,
    seq_len: int = 512,
    n_layer: int = 36,
    n_embd: int = 1280,
    n_head: int = 20,
    vocab_size: int = 50257,
    n_positions: int = 1024,
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop",
    reference: Literal["cached", "bf16", "fp32"] = "cached",
    gradient_checkpointing: bool = False,
    attention: Literal["sdpa", "eager"] = "sdpa",
    gpu_gib: float = 80.0,
) -> MemoryEstimate:
    """Estimated peak GPU memory (GiB) of one DPO micro-batch step; defaults are gpt2-large at 512 tokens.

    Fixed: fp32 policy weights, fp32 gradients, optimizer state (RMSprop 1 buffer, AdamW 2), the reference
    (``"cached"``: log-probs precomputed, nothing resident, as this project's trainers do). Activations:
    ``2 x micro_batch_pairs`` sequences (chosen and rejected in one forward pass) of ``seq_len`` tokens,
    ACTIVATION_BYTES per token per layer (plus the s^2 attention scores with eager attention), or with
    gradient checkpointing only every block's input plus one block recomputed at a time; the LM-head logits
    (LOGIT_BYTES per logit) are not checkpointed; autocast's bf16 weight copies (AUTOCAST_WEIGHT_BYTES).
    Not counted: allocator fragmentation, CUDA context and NCCL buffers (budget 1-3 GiB).
    """
    for name, value in (("micro_batch_pairs", micro_batch_pairs), ("seq_len", seq_len), ("n_layer", n_layer),
                        ("n_embd", n_embd), ("n_head", n_head), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if seq_len > n_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context n_positions {n_positions}")
    buffers = {"rmsprop": 1, "adamw": 2}
    if optimizer not in buffers:
        raise ValueError(f"optimizer must be 'rmsprop' or 'adamw', got {optimizer!r}")
    ref_bytes = {"cached": 0, "bf16": 2, "fp32": 4}
    if reference not in ref_bytes:
        raise ValueError(f"reference must be 'cached', 'bf16' or 'fp32', got {reference!r}")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
    n = gpt2_param_count(n_layer, n_embd, vocab_size, n_positions)
    tokens = 2 * micro_batch_pairs * seq_len  # chosen + rejected
    per_block = ACTIVATION_BYTES["block"] * n_embd
    if attention == "eager":  # the (heads x s x s) scores and softmax are kept
        per_block += ACTIVATION_BYTES["eager_attention_per_head_key"] * n_head * seq_len
    block_params = 12 * n_embd**2 + 13 * n_embd
    if gradient_checkpointing:  # every block's input, plus one block recomputed (activations and weights)
        activations = tokens * (n_layer * ACTIVATION_BYTES["checkpointed_block_input"] * n_embd + per_block)
        cast_params = vocab_size * n_embd + block_params
    else:
        activations = tokens * n_layer * per_block
        cast_params = vocab_size * n_embd + n_layer * block_params
    logits = tokens * vocab_size * LOGIT_BYTES
    fixed = {"weights": 4 * n, "gradients": 4 * n, "optimizer_state": 4 * n * buffers[optimizer],
             "reference": ref_bytes[reference] * n, "autocast_weights": AUTOCAST_WEIGHT_BYTES * cast_params}
    total = sum(fixed.values()) + activations + logits
    return MemoryEstimate(n_params=n, micro_batch_pairs=micro_batch_pairs, seq_len=seq_len,
                          optimizer=optimizer, gradient_checkpointing=gradient_checkpointing,
                          **{k: v / GiB for k, v in fixed.items()}, activations=activations / GiB,
                          logits=logits / GiB, total=total / GiB, gpu_gib=gpu_gib)


def dpo_batch_plan(global_batch: int = 64, num_processes: int = 1, **estimate_kwargs: Any) -> str:
    """A table: for each micro-batch that divides ``global_batch`` over ``num_processes`` GPUs, the
    accumulation that reaches it and the estimated memory per GPU, with and without checkpointing."""
    lines = [f"global batch {global_batch} on {num_processes} GPU(s):",
             "micro x accumulation | GiB per GPU (no checkpointing) | GiB (gradient checkpointing)"]
    for micro in range(1, global_batch + 1):
        if global_batch % (micro * num_processes):
            continue
        accum = accumulation_steps(global_batch, micro, num_processes)
        plain = dpo_memory_estimate(micro_batch_pairs=micro, **estimate_kwargs)
        ckpt = dpo_memory_estimate(micro_batch_pairs=micro, gradient_checkpointing=True, **estimate_kwargs)
        lines.append(f"{micro:>5} x {accum:<13} | {plain.total:7.1f}{'' if plain.fits else ' (too big)':11}"
                     f"            | {ckpt.total:7.1f}{'' if ckpt.fits else ' (too big)'}")
    return "\n".join(lines)



__all__ = ["ACTIVATION_BYTES", "AUTOCAST_WEIGHT_BYTES", "LOGIT_BYTES", "MemoryEstimate", "dpo_batch_plan",
           "dpo_memory_estimate", "gpt2_param_count", "A100_BF16_DENSE_FLOPS", "DEFAULT_DECODE_MFU",
           "DEFAULT_MFU", "FLOPS_PER_PARAM_TOKEN",
           "H100_BF16_DENSE_FLOPS", "KNOWN_MODELS", "ParamCount", "Stage", "Tokens", "attention_share",
           "cost_table", "count_parameters", "gpu_hours", "hub_task_stages", "imdb_stages",
           "matmul_params", "model_config", "paper_cost_table"]
