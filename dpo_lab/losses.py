"""Preference losses as pure functions of log-probabilities: the DPO family of ``(B,)`` summed completion
log-probs (Eq. 7), whose ``β h`` is the margin of the implicit rewards ``r̂ = β log π/π_ref`` (Eq. 5), and the
baselines of per-token log-probs ``(B, T)`` with 0/1 masks."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lab.logprobs import check_mask, check_tensor, sequence_logprobs

LossType = Literal["sigmoid", "ipo", "hinge"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


def check_scalar(name: str, value: object, *, positive: bool) -> float:
    """``value`` as a float, refused unless a finite real number > 0 (``positive``) or >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _check_logps(*, ranked: bool = False, **tensors: Tensor) -> None:
    """Same shape, floating, finite: ``(B,)``, or ``(B, K)`` with K >= 2 when ``ranked``."""
    shapes = {}
    for name, x in tensors.items():
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if ranked and (x.ndim != 2 or x.shape[0] == 0 or x.shape[1] < 2):
            raise ValueError(f"{name} must have shape (B, K) with B >= 1 and K >= 2 ranked completions, "
                             f"got {tuple(x.shape)}")
        if not ranked and (x.ndim != 1 or x.numel() == 0):
            raise ValueError(f"{name} must have shape (B,) with B >= 1, got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf")
        shapes[name] = tuple(x.shape)
    if len(set(shapes.values())) > 1:
        raise ValueError(f"tensors must all have the same shape, got {shapes}")


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Per-pair ``−log σ(r(x, y_w) − r(x, y_l))``, paper Eq. 2 (Eq. 7 with r = β log π/π_ref); any shape."""
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen {tuple(chosen_rewards.shape)} and rejected {tuple(rejected_rewards.shape)} "
                         "rewards must have the same shape")
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def preference_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                    ref_rejected_logps: Tensor, *, beta: float, loss_type: LossType = "sigmoid",
                    label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example losses and the detached implicit rewards ``β (log π − log π_ref)`` of y_w, y_l, ``(B,)``,
    with ``h`` the log-ratio difference: "sigmoid" is DPO, Eq. 7 (cDPO, Mitchell 2023 Eq. 3, with
    ``label_smoothing``), "ipo" Azar et al. 2023 Eq. 17 (β sets a target margin), "hinge" SLiC."""
    _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    beta = check_scalar("beta", beta, positive=True)
    label_smoothing = check_scalar("label_smoothing", label_smoothing, positive=False)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {list(LOSS_TYPES)}")
    if label_smoothing >= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing} "
                         "(at 0.5 the labels carry no information; above it they are inverted)")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing (cDPO) only applies to loss_type='sigmoid', not {loss_type!r}")

    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)

    if loss_type == "sigmoid":
        # logsigmoid is the stable log σ; Eq. 7 when label_smoothing = 0.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * h)

    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def plackett_luce_loss(policy_logps: Tensor, ref_logps: Tensor, *, beta: float) -> tuple[Tensor, Tensor]:
    """DPO on rankings, App. A.3 Eq. 18: ``(B, K)`` log-probs (best first), ``z = β (log π − log π_ref)``,
    ``L = −Σ_k log(exp z_k / Σ_{j≥k} exp z_j)`` (K = 2 is Eq. 7). Returns ``(losses (B,), z detached)``."""
    _check_logps(ranked=True, policy_logps=policy_logps, ref_logps=ref_logps)
    beta = check_scalar("beta", beta, positive=True)
    z = beta * (policy_logps - ref_logps)
    # log Σ_{j≥k} exp(z_j) for every k at once: a cumulative logsumexp from the worst-ranked end.
    tail = torch.logcumsumexp(z.flip(-1), dim=-1).flip(-1)
    return (tail - z).sum(-1), z.detach()


def _check_token_logps(name: str, logps: Tensor, mask_name: str, mask: Tensor) -> Tensor:
    """A ``(B, T)`` token log-prob tensor, finite and <= 0 where its 0/1 mask is set; the mask as bool."""
    if not check_tensor(name, logps, 2).is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {logps.dtype}")
    mask = check_mask(mask_name, mask, logps.shape)
    selected = logps[mask]
    if not bool(torch.isfinite(selected).all()):
        raise ValueError(f"{name} contains NaN or inf at unmasked positions")
    if bool((selected > 1e-6).any()):
        raise ValueError(f"{name} has positive values: log-probabilities must be <= 0")
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError(f"{mask_name} has a row with no tokens (an empty completion)")
    return mask


def preferred_ft_loss(chosen_token_logps: Tensor, chosen_mask: Tensor) -> Tensor:
    """Preferred-FT (SFT on y_w): ``−log π(y_w|x) = −Σ_t log π(y_w,t | x, y_w,<t)``, ``(B,)``."""
    mask = _check_token_logps("chosen_token_logps", chosen_token_logps, "chosen_mask", chosen_mask)
    return -sequence_logprobs(chosen_token_logps, mask)


def mean_token_nll(token_logps: Tensor, mask: Tensor) -> Tensor:
    """``−log π(y|x) / |y|`` per row, ``(B,)``: RPO's NLL term, per sequence as Pang et al. 2024 have it."""
    bool_mask = _check_token_logps("token_logps", token_logps, "mask", mask)
    return -sequence_logprobs(token_logps, bool_mask, average=True)


def _log1mexp(logp: Tensor) -> Tensor:
    """``log(1 − exp(logp))``, stable at both ends (Mächler 2012); clamped so p ≈ 1 stays finite."""
    logp = logp.float().clamp(max=-1e-6)
    return torch.where(logp > -math.log(2), torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def unlikelihood_loss(chosen_token_logps: Tensor, chosen_mask: Tensor, rejected_token_logps: Tensor,
                      rejected_mask: Tensor, *, alpha: float) -> Tensor:
    """Unlikelihood (Welleck et al. 2019; the paper's §6 baseline), ``(B,)``:
    ``−log π(y_w|x) − α Σ_t log(1 − π(y_l,t | x, y_l,<t))``."""
    alpha = check_scalar("alpha", alpha, positive=False)
    mask_l = _check_token_logps("rejected_token_logps", rejected_token_logps, "rejected_mask", rejected_mask)
    nll = preferred_ft_loss(chosen_token_logps, chosen_mask)
    if chosen_token_logps.shape[0] != rejected_token_logps.shape[0]:
        raise ValueError(f"chosen has {chosen_token_logps.shape[0]} rows but rejected has "
                         f"{rejected_token_logps.shape[0]}")
    unlikely = torch.where(mask_l, _log1mexp(rejected_token_logps), 0.0).sum(-1)
    return nll - alpha * unlikely.to(nll.dtype)


def preference_metrics(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
                       policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> dict[str, float]:
    """Batch means under TRL's names; ``rewards/accuracies`` counts ``r̂_w > r̂_l`` strictly (0 at step 0)."""
    _check_logps(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                 policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "loss": losses.detach().float().mean().item(),
        "rewards/chosen": c.mean().item(),
        "rewards/rejected": r.mean().item(),
        "rewards/margins": (c - r).mean().item(),
        "rewards/accuracies": (c > r).float().mean().item(),
        "logps/chosen": policy_chosen_logps.detach().float().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().float().mean().item(),
    }
