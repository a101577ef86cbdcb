"""Graders for the notebooks' exercises, e.g. ``grade(bt_by_hand, bd.bt_probs, bandit_cases("reward"))``. A
wrong or unwritten answer is reported with its input, and the library's version takes its place, so that one
stuck exercise does not stop the notebook."""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dpo_lab import bandit as bd
from dpo_lab.losses import plackett_luce_loss

_STUB = re.compile(r"Exercise: (\w+)")  # every stub's message (scripts/student_copies.py) names its function


def grade(fn: Callable[..., Any], reference: Callable[..., Any], cases: Mapping[str, Sequence[Any]], *,
          hint: str = "", rtol: float = 1e-10, atol: float = 1e-10) -> None:
    """Check ``fn(*args)`` against ``reference(*args)`` (its numpy float arrays as float64 tensors) for every
    ``label -> args`` of ``cases``. Prints ✓, or prints what is wrong and puts the reference, called as ``fn``
    is, in ``fn``'s place in the calling cell's namespace. Returns nothing: a cell shows only the verdict."""
    name = getattr(fn, "__name__", repr(fn))
    if not cases:
        raise ValueError(f"grade({name}) needs at least one case")
    try:
        for label, args in cases.items():
            expected = _as_array(reference(*map(_float64, args)))
            got = _call(fn, args, name, label)
            problem = _mismatch(got, expected, rtol, atol)
            if problem:
                raise AssertionError(f"{name} is wrong on input {label}: {problem}\n"
                                     f"  expected: {_short(expected)}\n  got:      {_short(got)}"
                                     + (f"\n  hint: {hint}" if hint else ""))
    except AssertionError as err:
        stand_in = _stand_in(reference, fn, name)
        caller = inspect.currentframe().f_back.f_globals  # a notebook cell's globals: later cells look there
        replaced = caller.get(name) is fn
        if replaced:
            caller[name] = stand_in
        going_on = "\n  → using the library's version so the notebook can go on" if replaced else ""
        print(f"✗ {err}{going_on}")
        return
    print(f"✓ {name}: {len(cases)} cases match")


def _call(fn: Callable[..., Any], args: Sequence[Any], name: str, label: str) -> Any:
    try:  # on a copy, so that an in-place edit cannot change a later case's inputs
        return _as_array(fn(*copy.deepcopy(tuple(args))))
    except NotImplementedError as err:
        found = _STUB.search(str(err))
        todo = found.group(1) if found else name
        called = "" if todo == name else f" (which {name} calls)"
        raise AssertionError(f"not implemented yet: fill in {todo}{called}") from None
    except Exception as err:
        raise AssertionError(f"{name} raised {type(err).__name__} on input {label}: {err}") from err


def _float64(arg: Any) -> Any:
    floats = isinstance(arg, np.ndarray) and arg.dtype.kind == "f"
    return torch.tensor(arg, dtype=torch.float64) if floats else arg


def _stand_in(reference: Callable[..., Any], fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``reference`` with arguments bound by ``fn``'s signature (a later cell may pass them by keyword), its
    tensors given back as numpy arrays where ``fn`` was given numpy arrays."""
    signature = inspect.signature(fn)

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out = reference(*map(_float64, bound.args))
        return _as_array(out) if any(isinstance(a, np.ndarray) for a in bound.args) else out

    stand_in.__name__ = stand_in.__qualname__ = name
    return stand_in


def _as_array(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(_as_array(v) for v in value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value) if isinstance(value, (int, float, np.ndarray, np.number)) else value


def _mismatch(got: Any, expected: Any, rtol: float, atol: float) -> str | None:
    if isinstance(expected, tuple):
        if not isinstance(got, tuple) or len(got) != len(expected):
            return f"expected a tuple of {len(expected)} values, got {type(got).__name__}"
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            if problem := _mismatch(g, e, rtol, atol):
                return f"value {i} of the tuple: {problem}"
        return None
    if got is None:
        return "it returned None (a missing return?)"
    if not isinstance(got, np.ndarray) or got.dtype.kind not in "biuf":
        return f"expected numbers, got {type(got).__name__}"
    if got.shape != expected.shape:
        return f"shape {got.shape} instead of {expected.shape}"
    finite = np.isfinite(got)
    if finite.all() and np.allclose(got.astype(np.float64), expected, rtol=rtol, atol=atol):
        return None
    diff = np.where(finite, np.abs(got - expected), np.inf)  # the first non-finite value, else the worst
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    return f"at index {index} expected {expected[index]:.6g}, got {got[index]:.6g}" + (
        " (the largest difference)" if finite.all() else "")


def _short(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    if not isinstance(value, np.ndarray):
        return repr(value)[:200]
    text = " ".join(np.array2string(value, precision=5, threshold=12, edgeitems=2, separator=", ",
                                    max_line_width=10**6).split())
    return f"{text if len(text) <= 160 else text[:150] + ' …'}  (shape {value.shape})"


def _cases(inputs: dict[str, Callable[[Any], dict[str, Any]]], fields: Sequence[str], numpy: bool,
           choices: Mapping[str, Sequence[Any]]) -> dict[str, tuple]:
    """Each input's ``fields`` (from its builder, given β) for every combination of the ``choices`` (β at 0.1
    and 1 unless given, where a field needs it); ``numpy``: tensors as numpy arrays."""
    if {"beta", "optimal_policy", "log_z"} & set(fields):
        choices = {"beta": (0.1, 1.0)} | dict(choices)
    cases = {}
    for (label, build), values in itertools.product(inputs.items(), itertools.product(*choices.values())):
        chosen = dict(zip(choices, values, strict=True))
        known = build(chosen.get("beta")) | chosen
        unknown = [f for f in fields if f not in known]
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; known: {sorted(known)} "
                             "(a scalar needs its values as a keyword)")
        shown = [f"{f}={chosen[f]}" if f in chosen else f for f in fields]
        shown += [f"[{c}={v}]" for c, v in chosen.items() if c not in fields]
        cases[f"{label}: {', '.join(shown)}"] = tuple(
            known[f].numpy() if numpy and isinstance(known[f], torch.Tensor) else known[f] for f in fields)
    return cases


# --- inputs: two small bandits, every quantity an exercise of notebooks 01-02 takes
def _bandit_fields(toy: bd.Bandit, seed: int, beta: float | None) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed + 100)
    logits = 2 * torch.randn(toy.n_x, toy.n_y, dtype=torch.float64, generator=gen)
    policy = torch.softmax(logits, -1)
    order = torch.argsort(torch.rand(toy.n_x, toy.n_y, generator=gen), -1)  # one random ranking per prompt
    data = bd.population_preferences(toy)
    logp, ref = policy.log(), toy.pi_ref.log()
    fields = {
        "reward": toy.reward, "pi_ref": toy.pi_ref, "bandit": toy, "logits": logits, "policy": policy,
        # all mass on one response per prompt: KL and friends must count 0·log 0 as 0
        "greedy_policy": torch.nn.functional.one_hot(toy.reward.argmax(-1), toy.n_y).to(torch.float64),
        "ranked_rewards": toy.reward.gather(1, order), "data": data,
        "logp_w": logp[data.x, data.y_w], "logp_l": logp[data.x, data.y_l],
        "ref_w": ref[data.x, data.y_w], "ref_l": ref[data.x, data.y_l],
    }
    if beta is not None:
        fields |= {"optimal_policy": toy.optimal_policy(beta),
                   "log_z": bd.log_partition(toy.reward, toy.pi_ref, beta)}
    return fields


def bandit_cases(*fields: str, numpy: bool = False, **choices: Sequence[Any]) -> dict[str, tuple]:
    """Cases for :func:`grade`: ``fields`` (keys of ``_bandit_fields``) on two bandits of different shapes,
    for each value of ``choices`` (e.g. ``normalise=(False, True)``)."""
    inputs = {}
    for seed, n_x, n_y in ((0, 3, 5), (1, 2, 4)):
        toy = bd.Bandit.random(n_x=n_x, n_y=n_y, seed=seed)
        inputs[f"bandit(seed={seed}, {n_x}x{n_y})"] = functools.partial(_bandit_fields, toy, seed)
    return _cases(inputs, fields, numpy, choices)


# --- inputs: two random batches of token sequences, every tensor an exercise of notebooks 03-06 takes
def _lm_fields(seed: int, vocab: int, lengths: Sequence[tuple[int, int]]) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed + 200)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=gen)

    ids = torch.zeros(len(lengths), max(p + c for p, c in lengths), dtype=torch.long)  # padded by 0
    completion = torch.zeros_like(ids)
    for i, (p, c) in enumerate(lengths):
        ids[i, :p + c] = torch.randint(1, vocab, (p + c,), generator=gen)
        completion[i, p:p + c] = 1
    b, width = ids.shape
    logits = 2 * torch.randn(b, width, vocab, generator=gen)
    ref_logits = logits + torch.randn(b, width, vocab, generator=gen)  # a nearby reference model's
    logps, ref_logps = (x[:, :-1].double().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                        for x in (logits, ref_logits))
    # the steps that predict a completion token: the chosen (w) one's, and the next row's as the rejected (l)
    mask, mask_l = completion[:, 1:], completion[:, 1:].roll(-1, 0)
    logps_w, ref_logps_w = torch.where(mask.bool(), logps, 0.0), torch.where(mask.bool(), ref_logps, 0.0)
    logps_l, ref_logps_l = torch.where(mask_l.bool(), logps, 0.0), torch.where(mask_l.bool(), ref_logps, 0.0)
    chosen_rewards = 0.1 * (logps_w - ref_logps_w).sum(-1)  # β (log π − log π_ref) at β = 0.1
    rejected_rewards = 0.1 * (logps_l - ref_logps_l).sum(-1)
    chosen_rewards[0] = rejected_rewards[0] = 0.0  # a tie, as at π = π_ref
    heldout_scores = noise(b + 2, b + 1).round(decimals=1)
    heldout_rstar = (2 * noise(b + 2, b + 1)).round() / 2
    heldout_scores[0, 1], heldout_rstar[1, 2] = heldout_scores[0, 0], heldout_rstar[1, 0]  # a tie in each
    return {  # a batch as batching.pad_rows makes it, and logits as a model gives them
        "input_ids": ids, "attention_mask": (ids != 0).long(),  # real tokens are 1..V-1, padding 0
        "completion_mask": completion, "logits": logits, "ref_logits": ref_logits,
        # per step (B, T-1), as a PPO rollout holds them: step t predicts token t + 1; mask: completion steps
        "mask": mask, "logps": logps, "ref_logps": ref_logps, "old_logps": logps + 0.3 * noise(b, width - 1),
        "values": noise(b, width - 1), "advantages": noise(b, width - 1), "rewards": noise(b, width - 1),
        "scores": noise(b),
        # per chosen (w) and rejected (l) completion; then per pair (B,): summed log-probs, implicit rewards
        "token_logps_w": logps_w, "mask_w": mask, "token_logps_l": logps_l, "mask_l": mask_l,
        "logp_w": logps_w.sum(-1), "logp_l": logps_l.sum(-1),
        "ref_w": ref_logps_w.sum(-1), "ref_l": ref_logps_l.sum(-1),
        "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
        # K samples of each of P held-out prompts: a score and r* per sample, with ties in both
        "heldout_scores": heldout_scores, "heldout_rstar": heldout_rstar,
    }


def lm_cases(*fields: str, numpy: bool = False, **choices: Sequence[Any]) -> dict[str, tuple]:
    """Cases for :func:`grade`: ``fields`` (keys of ``_lm_fields``) on two batches (B, T, V = 3, 6, 11 and 4,
    5, 7), for each value of ``choices`` (e.g. ``gamma=(1.0, 0.9)``)."""
    inputs = {}
    for seed, vocab, lengths in ((0, 11, ((2, 4), (3, 2), (1, 3))), (1, 7, ((1, 4), (2, 1), (3, 2), (1, 2)))):
        base = _lm_fields(seed, vocab, lengths)
        b, width = base["input_ids"].shape
        inputs[f"batch(seed={seed}, B={b}, T={width}, V={vocab})"] = lambda beta, base=base: base
    return _cases(inputs, fields, numpy, choices)


def plackett_luce_nll(ranked_rewards: torch.Tensor) -> torch.Tensor:
    """−log p(τ) of the Plackett–Luce model (App. A.3) for rewards listed best first, (..., K) -> (...):
    Eq. 18's loss with β = 1 and log π_ref = 0, so that z is the reward itself."""
    flat = ranked_rewards.reshape(-1, ranked_rewards.shape[-1])
    return plackett_luce_loss(flat, torch.zeros_like(flat), beta=1.0)[0].reshape(ranked_rewards.shape[:-1])
