"""Graders for the notebooks' exercises: run a student's function on a few inputs and compare it with the
exact answer (the bandit's closed forms, the library, or a brute-force reference defined here).

    grade(bt_by_hand, bd.bt_probs, bandit_cases("reward", numpy=True))

A wrong answer raises an AssertionError naming the exercise, the input, what was expected and what came
back; a stub that still raises NotImplementedError (see :mod:`dpo_lab.student`) reads "not implemented yet".
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dpo_lab import bandit as bd

# The message dpo_lab.student puts in every stub; a stub called from another exercise names itself here.
_STUB = re.compile(r"Exercise: (\w+)")


def grade(fn: Callable[..., Any], reference: Callable[..., Any], cases: Mapping[str, Sequence[Any]], *,
          hint: str = "", rtol: float = 1e-10, atol: float = 1e-10) -> None:
    """Check ``fn(*args)`` against ``reference(*args)`` for every ``label -> args`` of ``cases``.

    The reference gets numpy arrays as float64 tensors (the library works in torch); ``fn`` gets the case
    as written. Prints one line on success; raises AssertionError at the first case that does not match.
    """
    name = getattr(fn, "__name__", repr(fn))
    if not cases:
        raise ValueError(f"grade({name}) needs at least one case")
    for label, args in cases.items():
        expected = _as_array(reference(*(_to_torch(a) for a in args)))
        try:
            # a copy, so that an in-place edit by the student cannot change a later case's inputs
            got = fn(*copy.deepcopy(tuple(args)))
        except NotImplementedError as err:
            found = _STUB.search(str(err))
            todo = found.group(1) if found else name
            called = "" if todo == name else f" (which {name} calls)"
            # from None: the stub's own traceback says nothing the message does not
            raise AssertionError(f"not implemented yet: fill in {todo}{called}") from None
        except Exception as err:
            raise AssertionError(f"{name} raised {type(err).__name__} on input {label}: {err}") from err
        got = _as_array(got)
        problem = _mismatch(got, expected, rtol, atol)
        if problem:
            lines = [f"{name} is wrong on input {label}: {problem}",
                     f"  expected: {_short(expected)}", f"  got:      {_short(got)}"]
            if hint:
                lines.append(f"  hint: {hint}")
            raise AssertionError("\n".join(lines))
    print(f"✓ {name}: {len(cases)} cases match")


def _to_torch(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return torch.tensor(value, dtype=torch.float64)  # a copy, never a view of the student's array
    return value


def _as_array(value: Any) -> Any:
    """Tensors, scalars and arrays as numpy; tuples and lists element by element; anything else as is."""
    if isinstance(value, (tuple, list)):
        return tuple(_as_array(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (int, float, np.ndarray, np.number)):
        return np.asarray(value)
    return value


def _mismatch(got: Any, expected: Any, rtol: float, atol: float) -> str | None:
    """What is wrong with ``got`` (a short phrase), or None when it matches ``expected``."""
    if isinstance(expected, tuple):
        if not isinstance(got, tuple) or len(got) != len(expected):
            return f"expected a tuple of {len(expected)} values, got {type(got).__name__}"
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            problem = _mismatch(g, e, rtol, atol)
            if problem:
                return f"value {i} of the tuple: {problem}"
        return None
    if got is None:
        return "it returned None (a missing return?)"
    if not isinstance(got, np.ndarray) or got.dtype.kind not in "biuf":
        return f"expected numbers, got {type(got).__name__}"
    if got.shape != expected.shape:
        return f"shape {got.shape} instead of {expected.shape}"
    if not np.isfinite(got).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(got))[0])
        return f"at index {index} expected {expected[index]:.6g}, got {got[index]}"
    if np.allclose(got.astype(np.float64), expected, rtol=rtol, atol=atol):
        return None
    diff = np.abs(got - expected)
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    return f"at index {index} expected {expected[index]:.6g}, got {got[index]:.6g} (the largest difference)"


def _short(value: Any) -> str:
    """A one-line repr: a few numbers each end of an array, and its shape."""
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    if not isinstance(value, np.ndarray):
        return repr(value)[:200]
    text = " ".join(np.array2string(value, precision=5, threshold=12, edgeitems=2, separator=", ",
                                    max_line_width=10**6).split())
    if len(text) > 160:  # a 3-d table is summarised per dimension: still too long for one line
        text = text[:150] + " …"
    return f"{text}  (shape {value.shape})"


# ----------------------------------------------------------------------------------------------------------
# inputs: a few small bandits, every quantity an exercise of notebooks 01-02 takes


# Two bandits of different shapes, so a solution that hard-codes the notebook's sizes fails.
_BANDITS = ((0, 3, 5), (1, 2, 4))
# Fields that are defined only for a given β: asking for any of them adds a β choice.
_NEEDS_BETA = {"beta", "optimal_policy", "log_z"}


def _fields(toy: bd.Bandit, seed: int, beta: float | None) -> dict[str, Any]:
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
        fields |= {"beta": beta, "optimal_policy": toy.optimal_policy(beta),
                   "log_z": bd.log_partition(toy.reward, toy.pi_ref, beta)}
    return fields


def bandit_cases(*fields: str, numpy: bool = False, **choices: Sequence[Any]) -> dict[str, tuple]:
    """Cases for :func:`grade`: the arguments named by ``fields``, in that order, on two small bandits.

    Fields: reward, pi_ref, bandit, logits, policy (a random full-support policy, softmax(logits)),
    greedy_policy (one-hot), optimal_policy (π* of Eq. 4), log_z, beta, data (every comparison, weighted:
    ``population_preferences``), ranked_rewards (each prompt's rewards in a random order, for rankings),
    logp_w, logp_l, ref_w, ref_l (the policy's and π_ref's log-probs on each comparison of ``data``).
    ``choices`` name further arguments and the values to try, e.g. ``normalise=(False, True)``; β is tried at
    0.1 and 1 unless given. ``numpy=True`` passes tensors as numpy arrays.
    """
    choices = {"beta": (0.1, 1.0), **choices}
    used = {c: v for c, v in choices.items() if c in fields or (c == "beta" and _NEEDS_BETA & set(fields))}
    cases = {}
    for seed, n_x, n_y in _BANDITS:
        toy = bd.Bandit.random(n_x=n_x, n_y=n_y, seed=seed)
        for values in itertools.product(*used.values()):
            chosen = dict(zip(used, values, strict=True))
            known = _fields(toy, seed, chosen.get("beta")) | chosen
            unknown = [f for f in fields if f not in known]
            if unknown:
                raise ValueError(f"bandit_cases: unknown field(s) {unknown}; known: {sorted(known)}")
            args = tuple(known[f].numpy() if numpy and isinstance(known[f], torch.Tensor) else known[f]
                         for f in fields)
            shown = [f"{f}={chosen[f]}" if f in chosen else f for f in fields]
            shown += [f"[{c}={v}]" for c, v in chosen.items() if c not in fields]
            cases[f"bandit(seed={seed}, {n_x}x{n_y}): {', '.join(shown)}"] = args
    return cases


# ----------------------------------------------------------------------------------------------------------
# references the library does not have


def plackett_luce_nll(ranked_rewards: torch.Tensor) -> torch.Tensor:
    """−log p(τ) of the Plackett–Luce model (App. A.3) for rewards listed best first, (..., K) -> (...):
    the product over positions k of exp r_k / Σ_{j≥k} exp r_j, one position at a time."""
    nll = torch.zeros(ranked_rewards.shape[:-1], dtype=ranked_rewards.dtype)
    for k in range(ranked_rewards.shape[-1]):
        nll = nll + torch.logsumexp(ranked_rewards[..., k:], -1) - ranked_rewards[..., k]
    return nll


__all__ = ["bandit_cases", "grade", "plackett_luce_nll"]
