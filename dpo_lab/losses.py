"""Preference losses as pure functions of log-probabilities (no models in here).

The DPO family takes four ``(B,)`` tensors of *summed* completion log-probs (paper Eq. 7),
``log π(y_w|x), log π(y_l|x), log π_ref(y_w|x), log π_ref(y_l|x)``, and works with

    h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)),

the difference of the two log-ratios. ``β h = r̂(x, y_w) − r̂(x, y_l)`` is the margin between the implicit
rewards ``r̂(x, y) = β log π(y|x)/π_ref(y|x)`` (Eq. 5 without the β log Z(x) term, which cancels in the
Bradley-Terry model, Eqs. 1 and 6). The baselines (Unlikelihood, Preferred-FT) take per-token log-probs.
:func:`plackett_luce_loss` generalises Eq. 7 from pairs to rankings of K completions (App. A.3, Eq. 18).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lab.logprobs import sequence_logprobs

__all__ = ["LOSS_TYPES", "bradley_terry_loss", "preference_loss", "plackett_luce_loss", "mean_token_nll",
           "dpo_loss_gradient_weight", "unlikelihood_loss", "preferred_ft_loss", "preference_metrics"]

LossType = Literal["sigmoid", "ipo", "hinge"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


def _check_scalar(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_logps(*, ranked: bool = False, **tensors: Tensor) -> None:
    """Same shape, floating dtype, finite values: ``(B,)`` sequence log-probs, or ``(B, K)`` with K >= 2
    ranked completions when ``ranked``."""
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
    """Per-pair Bradley-Terry negative log-likelihood ``−log σ(r(x, y_w) − r(x, y_l))``: paper Eq. 2.

    The reward-model loss of RLHF (Eq. 2 is its expectation over the preference data); DPO's Eq. 7 is the
    same loss with the implicit rewards ``β log π/π_ref``. Any shape, as long as both match; ``logsigmoid``
    is the stable ``log σ``, finite for any reward gap.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen {tuple(chosen_rewards.shape)} and rejected {tuple(rejected_rewards.shape)} "
                         "rewards must have the same shape")
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def preference_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                    ref_rejected_logps: Tensor, *, beta: float, loss_type: LossType = "sigmoid",
                    label_smoothing: float = 0.0, reference_free: bool = False, rpo_alpha: float = 0.0,
                    chosen_nll: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example preference losses and the implicit rewards of both completions.

    With ``h`` the log-ratio difference (module docstring):

    * ``"sigmoid"``: DPO, paper Eq. 7, ``−log σ(β h)``. ``label_smoothing = ε > 0`` gives conservative DPO
      (cDPO, Mitchell 2023, Eq. 3), which assumes each label is flipped with probability ε:
      ``−(1 − ε) log σ(β h) − ε log σ(−β h)``; ε must be in [0, 0.5).
    * ``"ipo"``: IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17), ``(h − 1/(2β))²``: h is pulled to the
      target 1/(2β), not pushed up without end, so β sets a target margin, not a temperature. The official
      DPO repo uses *summed* log-ratios; TRL averages log-probs over completion tokens for IPO (the trainer's
      ``DPOConfig.average_logprobs``), which makes the target a per-token margin and its β another scale.
    * ``"hinge"``: SLiC (Zhao et al. 2023), ``relu(1 − β h)``.

    ``rpo_alpha = α > 0`` adds ``α · chosen_nll`` to any of them: the NLL-regularised DPO of Pang et al. 2024
    ("Iterative Reasoning Preference Optimization", arXiv 2404.19733, their DPO+NLL loss; TRL's ``rpo_alpha``)
    and Liu et al. 2024 (RPO, arXiv 2405.16436). ``chosen_nll`` is ``(B,)``, the chosen completion's NLL
    normalised per token as Pang et al. do, ``−log π(y_w|x) / |y_w|`` (:func:`mean_token_nll`); it is required
    when α > 0 and not read when α = 0, which leaves the loss exactly as without it.

    ``reference_free=True`` takes the reference log-ratio as 0 in ``h`` (an implicit uniform reference).
    The returned rewards are always ``β (log π − log π_ref)`` of the given tensors, detached (Eq. 5 up to
    β log Z(x)); pass zeros as reference log-probs to get ``β log π``.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``.
    """
    _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    beta = _check_scalar("beta", beta, positive=True)
    label_smoothing = _check_scalar("label_smoothing", label_smoothing, positive=False)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {list(LOSS_TYPES)}")
    if label_smoothing >= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing} "
                         "(at 0.5 the labels carry no information; above it they are inverted)")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing (cDPO) only applies to loss_type='sigmoid', not {loss_type!r}")
    rpo_alpha = _check_scalar("rpo_alpha", rpo_alpha, positive=False)
    if rpo_alpha > 0:
        if chosen_nll is None:
            raise ValueError("rpo_alpha > 0 needs chosen_nll, the per-token NLL of each chosen completion "
                             "(losses.mean_token_nll)")
        _check_logps(policy_chosen_logps=policy_chosen_logps, chosen_nll=chosen_nll)

    policy_logratios = policy_chosen_logps - policy_rejected_logps
    if reference_free:
        ref_logratios = torch.zeros_like(policy_logratios)
    else:
        ref_logratios = ref_chosen_logps - ref_rejected_logps
    h = policy_logratios - ref_logratios

    if loss_type == "sigmoid":
        # logsigmoid is the stable log σ; Eq. 7 when label_smoothing = 0.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * h)
    if rpo_alpha > 0:  # skipped at 0, so plain DPO stays bit-for-bit what it was
        losses = losses + rpo_alpha * chosen_nll

    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def plackett_luce_loss(policy_logps: Tensor, ref_logps: Tensor, *, beta: float) -> tuple[Tensor, Tensor]:
    """DPO on rankings: the Plackett-Luce negative log-likelihood of each ranking (paper App. A.3, Eq. 18).

    ``policy_logps`` and ``ref_logps`` are ``(B, K)`` summed completion log-probs, column k holding the
    completion ranked k-th, best first. With ``h_k = log π(y_k|x) − log π_ref(y_k|x)``,

        L = −Σ_{k=1}^{K} log( exp(β h_k) / Σ_{j=k}^{K} exp(β h_j) ),

    the probability under the Plackett-Luce model with the implicit rewards ``β h`` that the ranking comes out
    in this order (the partition function β log Z(x) cancels, as in Eq. 7). The k = K factor is 1. For K = 2
    this is Eq. 7, ``−log σ(β (h_1 − h_2))``; adding the same constant to every ``h_k`` of a row leaves it
    unchanged (Lemma 1). Returns ``(losses (B,), rewards (B, K))``, the rewards ``β h`` detached.
    """
    _check_logps(ranked=True, policy_logps=policy_logps, ref_logps=ref_logps)
    beta = _check_scalar("beta", beta, positive=True)
    z = beta * (policy_logps - ref_logps)
    # log Σ_{j≥k} exp(z_j) for every k at once: a cumulative logsumexp from the worst-ranked end.
    tail = torch.logcumsumexp(z.flip(-1), dim=-1).flip(-1)
    return (tail - z).sum(-1), z.detach()


def dpo_loss_gradient_weight(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """``σ(r̂_l − r̂_w)``: how strongly each pair pushes in the DPO gradient (paper §4).

    ``∇L = −β E[σ(r̂(x, y_l) − r̂(x, y_w)) (∇ log π(y_w|x) − ∇ log π(y_l|x))]``: large when the implicit
    reward ranks the pair wrongly, near 0 once it ranks it confidently right.
    """
    _check_logps(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return torch.sigmoid(rejected_rewards - chosen_rewards)


def _check_token_logps(name: str, logps: Tensor, mask_name: str, mask: Tensor) -> Tensor:
    """Validate a ``(B, T)`` token log-prob tensor and its 0/1 mask; return the mask as bool."""
    if not isinstance(logps, Tensor) or not isinstance(mask, Tensor):
        raise TypeError(f"{name} and {mask_name} must be torch.Tensors")
    if not logps.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {logps.dtype}")
    if logps.ndim != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(logps.shape)}")
    if mask.shape != logps.shape:
        raise ValueError(f"{mask_name} has shape {tuple(mask.shape)} but {name} has {tuple(logps.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{mask_name} must contain only 0 and 1")
    mask = mask.bool()
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
    """``−log π(y|x) / |y|``: each row's NLL per completion token, ``(B,)`` (the NLL term of RPO, as Pang et
    al. 2024 normalise it: the length of each sequence, not the batch's token count as TRL does)."""
    bool_mask = _check_token_logps("token_logps", token_logps, "mask", mask)
    return -sequence_logprobs(token_logps, bool_mask, average=True)


def _log1mexp(logp: Tensor) -> Tensor:
    """``log(1 − exp(logp))`` for ``logp <= 0``, stable at both ends (Mächler 2012).

    ``log(−expm1(x))`` is accurate near 0, ``log1p(−exp(x))`` for very negative x. ``logp`` is clamped to
    ``<= −1e-6`` first so a token with probability ~1 gives a large but finite penalty and gradient.
    """
    logp = logp.float().clamp(max=-1e-6)
    return torch.where(logp > -math.log(2), torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def unlikelihood_loss(chosen_token_logps: Tensor, chosen_mask: Tensor, rejected_token_logps: Tensor,
                      rejected_mask: Tensor, *, alpha: float) -> Tensor:
    """Unlikelihood baseline (Welleck et al. 2019, as used in the DPO paper's §6), ``(B,)``.

    ``−log π(y_w|x) − α Σ_t log(1 − π(y_l,t | x, y_l,<t))``: raise the likelihood of the preferred
    completion and push every token of the dispreferred one towards probability 0. Inputs are per-token
    log-probs ``(B, T)`` with 0/1 masks selecting completion tokens (``completion_token_logprobs``).
    """
    alpha = _check_scalar("alpha", alpha, positive=False)
    mask_l = _check_token_logps("rejected_token_logps", rejected_token_logps, "rejected_mask", rejected_mask)
    nll = preferred_ft_loss(chosen_token_logps, chosen_mask)
    if chosen_token_logps.shape[0] != rejected_token_logps.shape[0]:
        raise ValueError(f"chosen has {chosen_token_logps.shape[0]} rows but rejected has "
                         f"{rejected_token_logps.shape[0]}")
    unlikely = torch.where(mask_l, _log1mexp(rejected_token_logps), 0.0).sum(-1)
    return nll - alpha * unlikely.to(nll.dtype)


def preference_metrics(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
                       policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> dict[str, float]:
    """Batch means under TRL's metric names.

    ``rewards/accuracies`` counts pairs with ``r̂_w > r̂_l`` strictly, so it is 0 (not 0.5) at the start of
    training, when policy == reference and every implicit reward is 0.
    """
    tensors = {"losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
               "policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps}
    _check_logps(**tensors)
    with torch.no_grad():
        c, r = chosen_rewards.float(), rejected_rewards.float()
        return {
            "loss": losses.float().mean().item(),
            "rewards/chosen": c.mean().item(),
            "rewards/rejected": r.mean().item(),
            "rewards/margins": (c - r).mean().item(),
            "rewards/accuracies": (c > r).float().mean().item(),
            "logps/chosen": policy_chosen_logps.float().mean().item(),
            "logps/rejected": policy_rejected_logps.float().mean().item(),
        }
