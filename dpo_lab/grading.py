"""Graders for the notebooks' exercises: run a student's function on a few inputs and compare it with the
exact answer (the bandit's closed forms, the library, or a brute-force reference defined here).

    grade(bt_by_hand, bd.bt_probs, bandit_cases("reward", numpy=True))
    grade(logp_sum, sequence_logprobs, lm_cases("logits", "input_ids", "completion_mask"), rtol=1e-5)

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
# inputs: small random batches of token sequences, every tensor an exercise of notebooks 05-06 takes


# Two batches of different shapes, (seed, vocabulary size, (prompt, completion) length of each row): every row
# starts with a prompt, most end in right padding, one fills the width. Token 0 is the padding token.
_BATCHES = ((0, 11, ((2, 4), (3, 2), (1, 3))), (1, 7, ((1, 4), (2, 1), (3, 2), (1, 2))))


def _sequences(gen: torch.Generator, vocab: int, lengths: Sequence[tuple[int, int]]) -> tuple:
    """input_ids, attention_mask and completion_mask ``(B, T)`` of rows laid out as ``lengths`` says."""
    ids = torch.zeros(len(lengths), max(p + c for p, c in lengths), dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(lengths):
        ids[i, :p + c] = torch.randint(1, vocab, (p + c,), generator=gen)
        attention[i, :p + c] = 1
        completion[i, p:p + c] = 1
    return ids, attention, completion


def _token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log π(y_t | x, y_<t) at every step, ``(B, T-1)``, in float64 (``logprobs.token_logprobs``)."""
    return logits[:, :-1].double().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _lm_fields(seed: int, vocab: int, lengths: Sequence[tuple[int, int]]) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed + 200)
    ids, attention, completion = _sequences(gen, vocab, lengths)
    b, width = ids.shape
    logits = 2 * torch.randn(b, width, vocab, generator=gen)
    ref_logits = logits + torch.randn(b, width, vocab, generator=gen)  # a reference near the policy
    # the rejected completions: same prompts, each row with the next row's completion length
    ids_l, _, completion_l = _sequences(gen, vocab, [(p, c) for (p, _), (_, c) in
                                                     zip(lengths, [*lengths[1:], lengths[0]], strict=True)])
    logits_l = 2 * torch.randn(*ids_l.shape, vocab, generator=gen)
    ref_logits_l = logits_l + torch.randn(*ids_l.shape, vocab, generator=gen)
    mask, mask_l = completion[:, 1:], completion_l[:, 1:]  # the steps that predict a completion token
    logps, ref_logps = _token_logps(logits, ids), _token_logps(ref_logits, ids)
    # as logprobs.completion_token_logprobs gives them: 0 off the completion
    logps_w, ref_logps_w = torch.where(mask.bool(), logps, 0.0), torch.where(mask.bool(), ref_logps, 0.0)
    logps_l = torch.where(mask_l.bool(), _token_logps(logits_l, ids_l), 0.0)
    ref_logps_l = torch.where(mask_l.bool(), _token_logps(ref_logits_l, ids_l), 0.0)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=gen)

    chosen_rewards = 0.1 * (logps_w - ref_logps_w).sum(-1)  # β (log π − log π_ref) at β = 0.1
    rejected_rewards = 0.1 * (logps_l - ref_logps_l).sum(-1)
    chosen_rewards[0] = rejected_rewards[0] = 0.0  # a tie, as at π = π_ref
    heldout_scores = noise(b + 2, b + 1).round(decimals=1)
    heldout_rstar = (2 * noise(b + 2, b + 1)).round() / 2
    heldout_scores[0, 1], heldout_rstar[1, 2] = heldout_scores[0, 0], heldout_rstar[1, 0]  # a tie in each
    return {
        # a batch of prompt + completion rows, as batching.pad_rows makes them; logits as a model gives them
        "input_ids": ids, "attention_mask": attention, "completion_mask": completion,
        "logits": logits, "ref_logits": ref_logits,
        # per step (B, T-1), as a PPO rollout holds them: step t predicts token t + 1; mask: completion steps
        "mask": mask, "logps": logps, "ref_logps": ref_logps, "old_logps": logps + 0.3 * noise(b, width - 1),
        "values": noise(b, width - 1), "advantages": noise(b, width - 1), "rewards": noise(b, width - 1),
        "scores": noise(b),
        # the same per chosen (w) and rejected (l) completion of each pair
        "token_logps_w": logps_w, "mask_w": mask, "token_logps_l": logps_l, "mask_l": mask_l,
        # per pair (B,): log π(y|x) and log π_ref(y|x) summed over the completion, and implicit rewards
        "logp_w": logps_w.sum(-1), "logp_l": logps_l.sum(-1),
        "ref_w": ref_logps_w.sum(-1), "ref_l": ref_logps_l.sum(-1),
        "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
        # K samples of each of P held-out prompts: a score and r* per sample, with ties in both
        "heldout_scores": heldout_scores, "heldout_rstar": heldout_rstar,
    }


def lm_cases(*fields: str, numpy: bool = False, **choices: Sequence[Any]) -> dict[str, tuple]:
    """Cases for :func:`grade`: the arguments named by ``fields``, in that order, on two small random batches
    of token sequences (B, T, V = 3, 6, 11 and 4, 5, 7), each row a prompt, a completion and padding.

    Fields: input_ids, attention_mask, completion_mask (B, T); logits, ref_logits (B, T, V) float32. Per
    step (B, T-1), step t predicting token t + 1, as a PPO rollout holds them: mask
    (``completion_mask[:, 1:]``), logps, ref_logps, old_logps, values, advantages, rewards (every step
    filled in); scores (B,). For pairs: token_logps_w, mask_w, token_logps_l, mask_l (B, T-1; the log-probs
    0 off the mask); logp_w, logp_l, ref_w, ref_l (B,), their sums; chosen_rewards, rejected_rewards (B,;
    the first pair tied). heldout_scores, heldout_rstar (P, K), with ties in both. Ids and masks are long
    tensors, every float but the logits float64. ``choices`` give scalar arguments and the values to try, e.g.
    ``gamma=(1.0, 0.9)``; β is tried at 0.1 and 1 unless given. ``numpy=True`` passes tensors as numpy arrays.
    """
    choices = {"beta": (0.1, 1.0), **choices}
    used = {c: v for c, v in choices.items() if c in fields}
    cases = {}
    for seed, vocab, lengths in _BATCHES:
        base = _lm_fields(seed, vocab, lengths)
        b, width = base["input_ids"].shape
        for values in itertools.product(*used.values()):
            chosen = dict(zip(used, values, strict=True))
            known = base | chosen
            unknown = [f for f in fields if f not in known]
            if unknown:
                raise ValueError(f"lm_cases: unknown field(s) {unknown}; known: {sorted(known)} "
                                 "(a scalar needs its values as a keyword)")
            args = tuple(known[f].numpy() if numpy and isinstance(known[f], torch.Tensor) else known[f]
                         for f in fields)
            shown = [f"{f}={chosen[f]}" if f in chosen else f for f in fields]
            cases[f"batch(seed={seed}, B={b}, T={width}, V={vocab}): {', '.join(shown)}"] = args
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


__all__ = ["bandit_cases", "grade", "lm_cases", "plackett_luce_nll"]
