"""An exact toy: a contextual bandit where every quantity of the DPO derivation has a closed form.

A few prompts x, a handful of responses y, a reference policy π_ref(y|x) and a reward r(x, y), all as
(n_x, n_y) float64 tables. Because the response set is finite, the partition function Z(x), the optimal
policy π* (Eq. 4), KL(π‖π_ref) and the expected reward are exact sums, so every step of the paper's
argument (Eqs. 1-10, Def. 1, Lemmas 1-2, Theorem 1) can be checked to machine precision, and the DPO and
RLHF solvers can be compared with the policy they should both reach.

Conventions: tables are indexed ``[x, y]``; pairwise tables ``[x, y1, y2]``; β > 0 is the KL strength.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lab.losses import LossType, bradley_terry_loss, dpo_loss_gradient_weight, preference_loss

DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------------------
# input checks


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a positive float, got {type(beta).__name__} ({beta!r})")
    if not beta > 0 or beta == float("inf"):
        raise ValueError(f"beta must be a positive finite float (the KL strength β), got {beta}")
    return float(beta)


def _check_table(name: str, table: Tensor, ndim: int = 2) -> Tensor:
    if not isinstance(table, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(table).__name__}")
    if table.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(table.shape)}")
    if not torch.isfinite(table).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    return table.to(DTYPE)


def _check_policy(name: str, policy: Tensor, *, strictly_positive: bool = False) -> Tensor:
    """A (n_x, n_y) table of probabilities whose rows sum to one."""
    policy = _check_table(name, policy)
    if (policy < 0).any():
        raise ValueError(f"{name} has negative probabilities")
    if strictly_positive and (policy <= 0).any():
        raise ValueError(f"{name} must give every response positive probability (log-ratios need it)")
    sums = policy.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-8):
        raise ValueError(f"{name} rows must sum to 1, got sums {sums.tolist()}")
    return policy


def _check_same_shape(**tables: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tables.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


# ----------------------------------------------------------------------------------------------------------
# the bandit


@dataclass(frozen=True)
class Bandit:
    """A contextual bandit: π_ref(y|x) and r(x, y) as (n_x, n_y) tables; prompts x ~ ``prompt_probs``."""

    pi_ref: Tensor
    reward: Tensor
    prompt_probs: Tensor | None = None  # p(x); None means uniform. Always a tensor after __init__.

    def __post_init__(self) -> None:
        pi_ref = _check_policy("pi_ref", self.pi_ref, strictly_positive=True)
        reward = _check_table("reward", self.reward)
        _check_same_shape(pi_ref=pi_ref, reward=reward)
        n_x = pi_ref.shape[0]
        if self.prompt_probs is None:
            prompt_probs = torch.full((n_x,), 1.0 / n_x, dtype=DTYPE)
        else:
            prompt_probs = _check_policy("prompt_probs", self.prompt_probs[None], strictly_positive=True)[0]
            if prompt_probs.shape != (n_x,):
                raise ValueError(f"prompt_probs must have shape ({n_x},), got {tuple(prompt_probs.shape)}")
        # frozen dataclass: normalise dtypes once, here
        object.__setattr__(self, "pi_ref", pi_ref)
        object.__setattr__(self, "reward", reward)
        object.__setattr__(self, "prompt_probs", prompt_probs)

    @property
    def n_x(self) -> int:
        return self.pi_ref.shape[0]

    @property
    def n_y(self) -> int:
        return self.pi_ref.shape[1]

    @classmethod
    def random(cls, n_x: int = 3, n_y: int = 5, seed: int = 0, *, ref_scale: float = 1.0,
               reward_scale: float = 1.0) -> Bandit:
        """A random bandit: π_ref = softmax(ref_scale·N(0,1)), r = reward_scale·N(0,1), uniform prompts."""
        if n_x < 1 or n_y < 2:
            raise ValueError(f"need n_x >= 1 prompts and n_y >= 2 responses, got n_x={n_x}, n_y={n_y}")
        gen = torch.Generator().manual_seed(seed)
        logits = ref_scale * torch.randn(n_x, n_y, generator=gen, dtype=DTYPE)
        reward = reward_scale * torch.randn(n_x, n_y, generator=gen, dtype=DTYPE)
        return cls(pi_ref=torch.softmax(logits, -1), reward=reward)

    def optimal_policy(self, beta: float) -> Tensor:
        """π* for this bandit's reward (Eq. 4)."""
        return optimal_policy(self.reward, self.pi_ref, beta)

    def evaluate(self, policy: Tensor) -> tuple[float, float]:
        """(mean KL(π‖π_ref), mean expected reward) over prompts: one point of a reward–KL plot."""
        return (mean_over_prompts(kl_divergence(policy, self.pi_ref), self.prompt_probs),
                mean_over_prompts(expected_reward(policy, self.reward), self.prompt_probs))


def mean_over_prompts(per_prompt: Tensor, prompt_probs: Tensor) -> float:
    """E_x[v(x)] for a per-prompt vector v."""
    return float((per_prompt * prompt_probs).sum())


# ----------------------------------------------------------------------------------------------------------
# closed forms: Eqs. 1, 4, 5, 6, 8, 9


def log_partition(reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """log Z(x) = log Σ_y π_ref(y|x) exp(r(x,y)/β) (Eq. 4), in log space so small β does not overflow."""
    beta = _check_beta(beta)
    reward, pi_ref = _check_table("reward", reward), _check_policy("pi_ref", pi_ref, strictly_positive=True)
    _check_same_shape(reward=reward, pi_ref=pi_ref)
    return torch.logsumexp(pi_ref.log() + reward / beta, dim=-1)


def optimal_policy(reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """π_r(y|x) = π_ref(y|x) exp(r(x,y)/β) / Z(x) (Eq. 4): the maximiser of the KL-constrained Eq. 3."""
    beta = _check_beta(beta)
    reward, pi_ref = _check_table("reward", reward), _check_policy("pi_ref", pi_ref, strictly_positive=True)
    _check_same_shape(reward=reward, pi_ref=pi_ref)
    # softmax(log π_ref + r/β) is exactly Eq. 4 with the division by Z(x) done stably
    return torch.softmax(pi_ref.log() + reward / beta, dim=-1)


def implicit_reward(policy: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """r̂(x,y) = β log π(y|x)/π_ref(y|x): DPO's implicit reward, and the Eq. 8 projection of r (Theorem 1)."""
    beta = _check_beta(beta)
    policy = _check_policy("policy", policy, strictly_positive=True)
    pi_ref = _check_policy("pi_ref", pi_ref, strictly_positive=True)
    _check_same_shape(policy=policy, pi_ref=pi_ref)
    return beta * (policy.log() - pi_ref.log())


def reparameterised_reward(policy: Tensor, pi_ref: Tensor, beta: float, log_z: Tensor) -> Tensor:
    """r(x,y) = β log π_r(y|x)/π_ref(y|x) + β log Z(x) (Eq. 5): recovers r exactly from π_r and Z."""
    log_z = _check_table("log_z", log_z, ndim=1)
    return implicit_reward(policy, pi_ref, beta) + beta * log_z[:, None]


def bt_probs(reward: Tensor) -> Tensor:
    """p*(y1 ≻ y2 | x) = exp r1 / (exp r1 + exp r2) = σ(r1 − r2) (Eq. 1), as an (n_x, n_y, n_y) table."""
    reward = _check_table("reward", reward)
    return torch.sigmoid(reward[:, :, None] - reward[:, None, :])


def bt_probs_from_policy(policy: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """p*(y1 ≻ y2 | x) written with π* only (Eq. 6): Z(x) cancels because BT sees reward differences."""
    r_hat = implicit_reward(policy, pi_ref, beta)
    return 1.0 / (1.0 + torch.exp(r_hat[:, None, :] - r_hat[:, :, None]))


def shift_reward(reward: Tensor, shift: Tensor) -> Tensor:
    """r'(x,y) = r(x,y) + f(x): a member of r's equivalence class (Def. 1)."""
    reward, shift = _check_table("reward", reward), _check_table("shift", shift, ndim=1)
    if shift.shape[0] != reward.shape[0]:
        raise ValueError(f"shift f(x) needs one value per prompt ({reward.shape[0]}), got {shift.shape[0]}")
    return reward + shift[:, None]


def are_equivalent(reward_a: Tensor, reward_b: Tensor, atol: float = 1e-9) -> bool:
    """Def. 1: r ~ r' iff r(x,y) − r'(x,y) = f(x) for some f, i.e. the difference is constant in y."""
    reward_a, reward_b = _check_table("reward_a", reward_a), _check_table("reward_b", reward_b)
    _check_same_shape(reward_a=reward_a, reward_b=reward_b)
    diff = reward_a - reward_b
    return bool(torch.allclose(diff, diff[:, :1].expand_as(diff), atol=atol, rtol=0))


def project_reward(reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """f(r; π_ref, β)(x,y) = r(x,y) − β log Σ_y π_ref(y|x) exp(r(x,y)/β) (Eq. 8)."""
    return _check_table("reward", reward) - beta * log_partition(reward, pi_ref, beta)[:, None]


def normaliser(reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """Σ_y π_ref(y|x) exp(r(x,y)/β) per prompt: the left side of Eq. 9 (= 1 for a projected reward)."""
    return log_partition(reward, pi_ref, beta).exp()


# ----------------------------------------------------------------------------------------------------------
# exact evaluation: KL, expected reward, the objective of Eq. 3, the reward–KL curve


def kl_divergence(policy: Tensor, pi_ref: Tensor) -> Tensor:
    """Exact KL(π(·|x) ‖ π_ref(·|x)) per prompt, shape (n_x,); 0·log 0 counts as 0."""
    policy = _check_policy("policy", policy)
    pi_ref = _check_policy("pi_ref", pi_ref, strictly_positive=True)
    _check_same_shape(policy=policy, pi_ref=pi_ref)
    # ≥ 0 by Gibbs' inequality; the clamp only removes round-off like -1e-17 at π = π_ref
    return (torch.xlogy(policy, policy) - policy * pi_ref.log()).sum(-1).clamp_min(0.0)


def expected_reward(policy: Tensor, reward: Tensor) -> Tensor:
    """E_{y~π(·|x)}[r(x,y)] per prompt, shape (n_x,)."""
    policy, reward = _check_policy("policy", policy), _check_table("reward", reward)
    _check_same_shape(policy=policy, reward=reward)
    return (policy * reward).sum(-1)


def rlhf_objective(policy: Tensor, reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """E_π[r] − β KL(π‖π_ref) per prompt (Eq. 3); its maximum β log Z(x) is reached at π* (App. A.1)."""
    return expected_reward(policy, reward) - _check_beta(beta) * kl_divergence(policy, pi_ref)


def reward_kl_curve(bandit: Bandit, betas: Iterable[float]) -> list[tuple[float, float, float]]:
    """(β, mean KL(π*_β‖π_ref), mean E_{π*_β}[r]) for each β: the exact frontier of Eq. 3."""
    curve = []
    for beta in betas:
        kl, reward = bandit.evaluate(bandit.optimal_policy(beta))
        curve.append((float(beta), kl, reward))
    return curve


# ----------------------------------------------------------------------------------------------------------
# preference data


@dataclass(frozen=True)
class PreferenceData:
    """Triples (x, y_w, y_l) with a weight each (weights sum to 1): sampled data or the whole population."""

    x: Tensor
    y_w: Tensor
    y_l: Tensor
    weight: Tensor

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        for name in ("x", "y_w", "y_l"):
            t = getattr(self, name)
            if t.dtype != torch.long or t.shape != (n,):
                raise ValueError(f"PreferenceData.{name} must be a long tensor of shape ({n},), "
                                 f"got {t.dtype} {tuple(t.shape)}")
        if self.weight.shape != (n,) or (self.weight < 0).any():
            raise ValueError("PreferenceData.weight must be a non-negative tensor with one weight per triple")
        if n == 0:
            raise ValueError("PreferenceData is empty")

    def __len__(self) -> int:
        return self.x.shape[0]

    def aggregated(self) -> PreferenceData:
        """Merge repeated triples, summing their weights: the same weighted loss, far fewer terms."""
        keys = torch.stack([self.x, self.y_w, self.y_l], dim=1)
        unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
        weight = torch.zeros(unique.shape[0], dtype=DTYPE).index_add_(0, inverse, self.weight.to(DTYPE))
        return PreferenceData(x=unique[:, 0], y_w=unique[:, 1], y_l=unique[:, 2], weight=weight)

    def check_fits(self, n_x: int, n_y: int) -> None:
        if int(self.x.max()) >= n_x or int(self.x.min()) < 0:
            raise ValueError(f"prompt index out of range for n_x={n_x}")
        for t in (self.y_w, self.y_l):
            if int(t.max()) >= n_y or int(t.min()) < 0:
                raise ValueError(f"response index out of range for n_y={n_y}")


def sample_preferences(bandit: Bandit, n_pairs: int, seed: int = 0) -> PreferenceData:
    """Paper §4 outline: x ~ p(x), y1, y2 ~ π_ref(·|x), labelled y1 ≻ y2 with BT probability (Eq. 1).

    Draws with y1 = y2 are redrawn (rejection sampling): such a pair says nothing, and a language model
    practically never samples the same completion twice. So (y1, y2) ~ π_ref(y1|x) π_ref(y2|x) given
    y1 ≠ y2, the distribution :func:`population_preferences` weights exactly.
    """
    x, y1, y2, gen = _draw_pairs(bandit.prompt_probs, bandit.pi_ref, n_pairs, seed)
    p_first = bt_probs(bandit.reward)[x, y1, y2]
    return _label_pairs(x, y1, y2, p_first, gen)


def _draw_pairs(prompt_probs: Tensor, response_probs: Tensor, n_pairs: int,
                seed: int) -> tuple[Tensor, Tensor, Tensor, torch.Generator]:
    """x ~ p(x), then y1 ≠ y2 ~ response_probs(·|x) by rejection; returns the generator to label with."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.multinomial(prompt_probs, n_pairs, replacement=True, generator=gen)
    y1 = torch.empty(n_pairs, dtype=torch.long)
    y2 = torch.empty(n_pairs, dtype=torch.long)
    todo = torch.arange(n_pairs)
    while len(todo):  # each round redraws only the tied rows; ties have probability Σ_y π_ref(y|x)² < 1
        y1[todo] = torch.multinomial(response_probs[x[todo]], 1, generator=gen)[:, 0]
        y2[todo] = torch.multinomial(response_probs[x[todo]], 1, generator=gen)[:, 0]
        todo = todo[y1[todo] == y2[todo]]
    return x, y1, y2, gen


def _label_pairs(x: Tensor, y1: Tensor, y2: Tensor, p_first: Tensor, gen: torch.Generator) -> PreferenceData:
    first_wins = torch.rand(len(x), generator=gen, dtype=DTYPE) < p_first
    y_w, y_l = torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1)
    return PreferenceData(x=x, y_w=y_w, y_l=y_l, weight=torch.full((len(x),), 1.0 / len(x), dtype=DTYPE))


def sample_annotated_preferences(bandit: Bandit, n_pairs: int, *, noise: float = 0.0,
                                 never_shown: Sequence[int] = (), seed: int = 0) -> PreferenceData:
    """Finite data from a deterministic annotator with label noise: Azar et al.'s setting.

    x ~ p(x); y1 ≠ y2 ~ π_ref(·|x) restricted to the responses not in ``never_shown`` (they are never
    compared, as completions the data collection happened not to sample); the response with the higher
    r(x, y) wins, except that each label is flipped with probability ``noise`` ∈ [0, 0.5]. At noise 0 the
    preferences are deterministic, p(y1 ≻ y2) ∈ {0, 1}: the case where the BT reward gap is infinite.
    """
    if not 0.0 <= noise <= 0.5:
        raise ValueError(f"noise must be a flip probability in [0, 0.5], got {noise}")
    shown = torch.ones(bandit.n_y, dtype=torch.bool)
    for y in never_shown:
        if not 0 <= y < bandit.n_y:
            raise ValueError(f"never_shown has response {y}, but responses are 0..{bandit.n_y - 1}")
        shown[y] = False
    if int(shown.sum()) < 2:
        raise ValueError("at least two responses must be shown to form a pair")
    probs = bandit.pi_ref * shown
    x, y1, y2, gen = _draw_pairs(bandit.prompt_probs, probs / probs.sum(-1, keepdim=True), n_pairs, seed)
    r1, r2 = bandit.reward[x, y1], bandit.reward[x, y2]
    p_first = torch.where(r1 > r2, 1.0 - noise, torch.where(r1 < r2, noise, 0.5)).to(DTYPE)
    return _label_pairs(x, y1, y2, p_first, gen)


def population_preferences(bandit: Bandit) -> PreferenceData:
    """Every (x, a, b), a ≠ b, weighted by its probability under :func:`sample_preferences`: infinite data.

    weight = p(x) · 2 π_ref(a|x) π_ref(b|x) p*(a ≻ b|x) / (1 − Σ_y π_ref(y|x)²): (y_w, y_l) = (a, b) comes
    from the draw (a, b) with y1 winning or (b, a) with y2 winning (the 2), conditioned on a ≠ b. The weighted
    DPO loss over these triples is the expected DPO loss, whose minimiser is π* itself.
    """
    n_x, n_y = bandit.n_x, bandit.n_y
    x, a, b = torch.meshgrid(torch.arange(n_x), torch.arange(n_y), torch.arange(n_y), indexing="ij")
    distinct = 1.0 - (bandit.pi_ref**2).sum(-1)
    weight = (2 * bandit.pi_ref[:, :, None] * bandit.pi_ref[:, None, :] * bt_probs(bandit.reward)
              * (bandit.prompt_probs / distinct)[:, None, None])
    keep = (a != b).flatten()
    return PreferenceData(x=x.flatten()[keep], y_w=a.flatten()[keep], y_l=b.flatten()[keep],
                          weight=weight.flatten()[keep])


# ----------------------------------------------------------------------------------------------------------
# solvers: DPO (Eq. 7) on a tabular policy, RLHF = reward model (Eq. 2) + Eq. 3 maximised


@dataclass
class FitResult:
    """Outcome of a tabular fit: the final table, and per-step metrics (TRL's names for DPO)."""

    table: Tensor  # policy logits (DPO) or reward (RM)
    history: list[dict[str, float]]

    @property
    def policy(self) -> Tensor:
        """softmax(table): the fitted policy of a DPO fit (meaningless for a reward-model fit)."""
        return torch.softmax(self.table, -1)


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run tiny-tensor loops on one intra-op thread: on a busy 2-core machine, thread hand-offs made
    each 75-element op ~10x slower than the op itself. The caller's setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _minimise(loss_fn: Callable[[Tensor], tuple[Tensor, dict[str, float]]], init: Tensor, *,
              optimizer: Literal["lbfgs", "adam"], steps: int, lr: float | None,
              grad_tol: float) -> FitResult:
    """Minimise a smooth loss over one table; L-BFGS for exact optima, Adam for training curves.

    Stops at ``steps``, when the gradient falls below ``grad_tol``, or when a step no longer moves the table.
    That certifies the optimum only for a convex loss, as the DPO loss (Eq. 7) on logits and the BT loss
    (Eq. 2) on a reward table are. The negated Eq. 3 objective is not convex in the logits: its caller,
    :func:`maximise_rlhf_objective`, checks stationarity itself.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    param = init.detach().clone().to(DTYPE).requires_grad_(True)
    if optimizer == "lbfgs":
        opt: torch.optim.Optimizer = torch.optim.LBFGS([param], lr=lr or 1.0, max_iter=1, max_eval=25,
                                                       history_size=50,
                                                       tolerance_grad=0.0, tolerance_change=0.0,
                                                       line_search_fn="strong_wolfe")
    elif optimizer == "adam":
        opt = torch.optim.Adam([param], lr=lr or 0.05)
    else:
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    history: list[dict[str, float]] = []

    def closure() -> Tensor:
        opt.zero_grad()
        loss, _ = loss_fn(param)
        loss.backward()
        return loss

    with _single_thread():
        for step in range(steps + 1):
            with torch.no_grad():
                _, metrics = loss_fn(param)
            history.append({"step": float(step), **metrics})
            if step == steps:
                break
            before = param.detach().clone()
            opt.step(closure)
            # For the convex losses (Eqs. 2 and 7 on their tables) a vanishing gradient means the optimum. A
            # step that no longer moves the table means L-BFGS's line search gave up: float64 round-off for
            # those losses, but possibly a stall far from the optimum on a non-convex one (Eq. 3 in logits).
            if float(param.grad.abs().max()) < grad_tol or torch.equal(before, param.detach()):
                break
    return FitResult(table=param.detach(), history=history)


def dpo_loss_on_table(logits: Tensor, pi_ref: Tensor, data: PreferenceData, beta: float, *,
                      loss_type: LossType = "sigmoid",
                      label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Weighted DPO loss (Eq. 7) of the tabular policy softmax(logits) and TRL-style metrics.

    ``loss_type`` and ``label_smoothing`` go to :func:`~dpo_lab.losses.preference_loss`: "ipo" is IPO,
    ε > 0 is cDPO. A response is a single action here, so its summed log-ratio is also the per-token one.
    Convex in the logits: y_w and y_l share the prompt x, so log π(y_w|x) − log π(y_l|x) = θ[x,y_w] − θ[x,y_l]
    (the softmax normaliser cancels) and each term is a convex function of a linear function of θ.
    """
    logp = torch.log_softmax(logits, -1)
    # the same op on the reference, so that at θ = log π_ref every implicit reward is exactly 0
    ref_logp = torch.log_softmax(pi_ref.log(), -1)
    chosen, rejected = logp[data.x, data.y_w], logp[data.x, data.y_l]
    losses, r_chosen, r_rejected = preference_loss(chosen, rejected, ref_logp[data.x, data.y_w],
                                                   ref_logp[data.x, data.y_l], beta=beta,
                                                   loss_type=loss_type, label_smoothing=label_smoothing)
    w = data.weight / data.weight.sum()
    loss = (w * losses).sum()
    metrics = {
        "loss": float(loss.detach()),
        "rewards/chosen": float((w * r_chosen).sum()),
        "rewards/rejected": float((w * r_rejected).sum()),
        "rewards/margins": float((w * (r_chosen - r_rejected)).sum()),
        "rewards/accuracies": float((w * (r_chosen > r_rejected).to(DTYPE)).sum()),
        "logps/chosen": float((w * chosen.detach()).sum()),
        "logps/rejected": float((w * rejected.detach()).sum()),
    }
    return loss, metrics


def solve_dpo(pi_ref: Tensor, data: PreferenceData, beta: float, *,
              optimizer: Literal["lbfgs", "adam"] = "lbfgs", steps: int = 500, lr: float | None = None,
              grad_tol: float = 1e-10, loss_type: LossType = "sigmoid",
              label_smoothing: float = 0.0) -> FitResult:
    """Minimise the DPO loss (Eq. 7) over a tabular policy π_θ = softmax(θ), starting from π_θ = π_ref.

    On :func:`population_preferences` the minimiser is π* (Eq. 4); on sampled data it is the policy whose
    implicit reward is the maximum-likelihood BT reward of that data, so it tends to π* as data grows.
    ``loss_type="ipo"`` fits IPO, ``label_smoothing=ε`` cDPO (see :func:`dpo_loss_on_table`).

    Every gradient of a pairwise loss lies in span{e_{y_w} − e_{y_l}}, and so does every L-BFGS step: a
    response no pair mentions keeps its logit, and each connected group of compared responses keeps the
    sum of its logits. When the loss has no minimiser (DPO when some response is dominated, e.g. only ever
    loses: see :func:`dominated_responses`), margins grow without bound and the result is simply where
    ``steps`` iterations (or ``grad_tol``) stopped: finite, never NaN, but not an optimum.
    """
    beta = _check_beta(beta)
    pi_ref = _check_policy("pi_ref", pi_ref, strictly_positive=True)
    data.check_fits(*pi_ref.shape)
    data = data.aggregated()
    return _minimise(lambda theta: dpo_loss_on_table(theta, pi_ref, data, beta, loss_type=loss_type,
                                                     label_smoothing=label_smoothing),
                     pi_ref.log(), optimizer=optimizer, steps=steps, lr=lr, grad_tol=grad_tol)


def reward_model_loss(reward: Tensor, data: PreferenceData) -> tuple[Tensor, dict[str, float]]:
    """Weighted BT negative log-likelihood −E[log σ(r(x,y_w) − r(x,y_l))] (Eq. 2) of a reward table.

    Convex in the table: each term is −log σ of a difference of two of its entries (a linear function).
    """
    chosen, rejected = reward[data.x, data.y_w], reward[data.x, data.y_l]
    margin = chosen - rejected
    w = data.weight / data.weight.sum()
    loss = (w * bradley_terry_loss(chosen, rejected)).sum()
    return loss, {"loss": float(loss.detach()), "accuracy": float((w * (margin > 0).to(DTYPE)).sum())}


def fit_reward_model(data: PreferenceData, n_x: int, n_y: int, *,
                     optimizer: Literal["lbfgs", "adam"] = "lbfgs", steps: int = 500, lr: float | None = None,
                     grad_tol: float = 1e-10) -> FitResult:
    """Fit a tabular BT reward model r_φ(x, y) by Eq. 2, starting from r_φ = 0.

    r_φ is identified only up to a per-prompt shift f(x) (Lemma 1); every shift gives the same π (Lemma 2).
    """
    data.check_fits(n_x, n_y)
    data = data.aggregated()
    return _minimise(lambda r: reward_model_loss(r, data), torch.zeros(n_x, n_y, dtype=DTYPE),
                     optimizer=optimizer, steps=steps, lr=lr, grad_tol=grad_tol)


@dataclass(frozen=True)
class RLHFSolution:
    reward_model: Tensor  # r_φ fitted by Eq. 2
    policy: Tensor  # argmax of Eq. 3 under r_φ


def solve_rlhf(pi_ref: Tensor, data: PreferenceData, beta: float, **fit_kwargs) -> RLHFSolution:
    """The two-stage pipeline: fit r_φ by Eq. 2, then maximise Eq. 3 exactly (closed form, Eq. 4)."""
    pi_ref = _check_policy("pi_ref", pi_ref, strictly_positive=True)
    reward_model = fit_reward_model(data, *pi_ref.shape, **fit_kwargs).table
    return RLHFSolution(reward_model=reward_model, policy=optimal_policy(reward_model, pi_ref, beta))


def maximise_rlhf_objective(reward: Tensor, pi_ref: Tensor, beta: float, *,
                            optimizer: Literal["lbfgs", "adam"] = "lbfgs", steps: int = 500,
                            lr: float | None = None) -> Tensor:
    """Maximise Eq. 3 by exact policy-gradient ascent on tabular logits, from π_ref; returns the policy.

    A check that the closed form of Eq. 4 really is the argmax, reached without ever computing Z(x).

    For each x the objective E_π[r] − β KL(π‖π_ref) is strictly concave in π over the simplex, but NOT
    concave in the logits θ (π = softmax θ): its θ-gradient π ⊙ (g − E_π g), with g = ∂/∂π of Eq. 3, carries
    a factor π(y|x), so it vanishes wherever the softmax saturates, also far from the optimum. At small β,
    L-BFGS (and Adam) can stall there and a small logit gradient proves nothing. So the result of the
    ``optimizer`` run (``steps`` iterations at most) is certified by :func:`rlhf_stationarity_gap`, i.e. by
    the stationarity condition itself: r(x,y) − β log π(y|x)/π_ref(y|x) equal for every y. If it fails,
    natural-gradient steps finish the job: θ ← θ + η g, the natural policy gradient of a softmax table
    (= mirror ascent / exponentiated gradient on π; Kakade 2001, Cen et al. 2022). In log space this is a
    contraction by 1 − ηβ = 1/2 per step from any start, so it reaches π* whatever the conditioning.

    The returned policy satisfies |log π(y|x)/π*(y|x)| ≤ 1e-8 for every (x, y), however small π*(y|x) is
    (the bound is looser only where |r|/β is so large, ~1e6, that float64 cannot resolve 1e-8 in log space).
    A policy that cannot be certified raises ``RuntimeError`` instead of being returned.
    """
    beta = _check_beta(beta)
    reward = _check_table("reward", reward)
    pi_ref = _check_policy("pi_ref", pi_ref, strictly_positive=True)
    _check_same_shape(reward=reward, pi_ref=pi_ref)
    result = _minimise(
        lambda theta: _neg_objective(theta, reward, pi_ref, beta), pi_ref.log(),
        optimizer=optimizer, steps=steps, lr=lr, grad_tol=1e-12)
    tol = _stationarity_tol(reward, pi_ref, beta)
    logits = result.table
    if bool((rlhf_stationarity_gap(logits, reward, pi_ref, beta) > tol).any()):
        logits = _natural_gradient_ascent(logits, reward, pi_ref, beta, tol)
    _require_stationary(logits, reward, pi_ref, beta, tol)
    return torch.softmax(logits, -1)


def _neg_objective(logits: Tensor, reward: Tensor, pi_ref: Tensor, beta: float) -> tuple[Tensor, dict]:
    logp = torch.log_softmax(logits, -1)
    policy = logp.exp()
    value = (policy * (reward - beta * (logp - pi_ref.log()))).sum(-1).mean()
    return -value, {"objective": float(value.detach())}


def rlhf_stationarity_gap(logits: Tensor, reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """How far softmax(logits) is from stationary for Eq. 3, per prompt, shape (n_x,); 0 exactly at π*.

    With g(y) = r(x,y) − β (log π(y|x)/π_ref(y|x) + 1), the gradient of Eq. 3 with respect to π(·|x),
    π is stationary on the simplex iff g is constant over the support; a softmax policy has full support,
    and so has π*, so g must be constant over every y. The gap is (max_y g − min_y g) / β. No Z(x) is
    needed, yet since g(y) = β log π*(y|x)/π(y|x) + β log Z(x) − β the gap equals
    max_y log π*/π − min_y log π*/π, and both policies sum to 1, so |log π(y|x)/π*(y|x)| ≤ gap for
    every y: a bound on the relative error of every probability, however small. Unlike the logit
    gradient π ⊙ (g − E_π g), it does not vanish where the softmax saturates.
    """
    beta = _check_beta(beta)
    logits, reward = _check_table("logits", logits), _check_table("reward", reward)
    pi_ref = _check_policy("pi_ref", pi_ref, strictly_positive=True)
    _check_same_shape(logits=logits, reward=reward, pi_ref=pi_ref)
    return _gap(torch.log_softmax(logits, -1), reward / beta + pi_ref.log())


def _gap(logp: Tensor, log_target: Tensor) -> Tensor:
    """Per-row spread of log_target − logp, with log_target = r/β + log π_ref (= log π* + log Z).

    g/β up to a constant, kept in log space so that a probability that underflows to 0 still counts.
    """
    g = log_target - logp
    return g.max(-1).values - g.min(-1).values


def _stationarity_tol(reward: Tensor, pi_ref: Tensor, beta: float) -> float:
    """1e-8, or what float64 can resolve in log space when |r/β| or |log π_ref| is huge."""
    scale = float((reward.abs() / beta + pi_ref.log().abs()).max())
    return max(1e-8, 64 * torch.finfo(DTYPE).eps * scale)


def _require_stationary(logits: Tensor, reward: Tensor, pi_ref: Tensor, beta: float, tol: float) -> None:
    """Raise unless softmax(logits) is a certified stationary point (hence the maximiser) of Eq. 3."""
    gap = rlhf_stationarity_gap(logits, reward, pi_ref, beta)
    if not bool((gap <= tol).all()):  # NaN fails too
        worst = int(gap.argmax())
        raise RuntimeError(
            f"the Eq. 3 solver stopped at a policy that is not stationary: for prompt x={worst}, "
            f"r(x,y) − β log π(y|x)/π_ref(y|x) still varies by {float(gap[worst]) * beta:.3g} across y "
            f"(β·tolerance {tol * beta:.3g}), so some probability is off from π* by a factor up to "
            f"exp({float(gap[worst]):.3g}); refusing to return a wrong policy")


_NATURAL_GRADIENT_STEPS = 200  # the error halves each step: 200 covers any float64 start


def _natural_gradient_ascent(logits: Tensor, reward: Tensor, pi_ref: Tensor, beta: float,
                             tol: float) -> Tensor:
    """Natural-gradient ascent on Eq. 3 from ``logits``, to float64 round-off; returns log π.

    θ ← θ + η g with g = r − β log π/π_ref (the constant −β drops out of a softmax), η = 1/(2β). As
    log π = θ − logsumexp θ, every step maps the error θ − log π* (up to a constant per row) to half of
    itself: linear convergence from any start, however saturated. It stops once the gap is below
    ``tol`` and has stopped shrinking (round-off), or after ``_NATURAL_GRADIENT_STEPS`` steps.
    """
    eta = 0.5 / beta
    log_ref = pi_ref.log()
    log_target = reward / beta + log_ref
    logp = torch.log_softmax(logits.to(DTYPE), -1)
    gap = _gap(logp, log_target).max()
    with _single_thread():
        for _ in range(_NATURAL_GRADIENT_STEPS):
            step = torch.log_softmax(logp + eta * (reward - beta * (logp - log_ref)), -1)
            new_gap = _gap(step, log_target).max()
            if gap <= tol and not new_gap < gap / 1.5:  # certified, and round-off stops the halving
                break
            logp, gap = step, new_gap
    return logp


# ----------------------------------------------------------------------------------------------------------
# finite data: where each loss's optimum is, exactly (DPO's failure and the IPO / cDPO fix, Azar et al. 2023)


def comparison_weights(data: PreferenceData, n_x: int, n_y: int) -> Tensor:
    """Total weight of each labelled comparison, W[x, y_w, y_l], shape (n_x, n_y, n_y)."""
    data.check_fits(n_x, n_y)
    weights = torch.zeros(n_x, n_y, n_y, dtype=DTYPE)
    return weights.index_put_((data.x, data.y_w, data.y_l), data.weight.to(DTYPE), accumulate=True)


def _closure(adjacency: Tensor) -> Tensor:
    """Reflexive-transitive closure of a batch of boolean (n, n) adjacency matrices: who reaches whom."""
    n = adjacency.shape[-1]
    reach = adjacency | torch.eye(n, dtype=torch.bool)
    for _ in range(max(1, math.ceil(math.log2(n)))):  # each squaring doubles the path length covered
        reach = reach | ((reach.to(DTYPE) @ reach.to(DTYPE)) > 0)
    return reach


def _strong_components(beats: Tensor) -> Tensor:
    """[x, i, j]: i and j are in the same strongly connected component of the "beats" graph."""
    reach = _closure(beats)
    return reach & reach.transpose(-1, -2)


def dominated_responses(data: PreferenceData, n_x: int, n_y: int) -> Tensor:
    """(n_x, n_y) bool: responses that DPO's loss (Eq. 7) drives to probability 0 on this data.

    Group the responses into strongly connected components of the "y_w beat y_l" graph (within one, every
    response beats every other through a chain of wins). A component that loses to a response outside it
    is dominated: no finite margin makes that cross edge's −log σ(β h) zero, its infimum needs h → ∞. For
    deterministic data every component is a single response, and the dominated ones are exactly those that
    lose at least once (not only those never chosen: in y0 ≻ y1 ≻ y2, y1 goes to 0 too).
    """
    beats = comparison_weights(data, n_x, n_y) > 0
    same = _strong_components(beats)
    loses_to_outsider = (beats & ~same).any(-2)  # [x, l]: some w outside l's component beat l
    return ((same.to(DTYPE) @ loses_to_outsider[..., None].to(DTYPE))[..., 0] > 0)


def compared_responses(data: PreferenceData, n_x: int, n_y: int) -> Tensor:
    """(n_x, n_y) bool: responses that appear in at least one pair of the data."""
    weights = comparison_weights(data, n_x, n_y)
    return (weights.sum(-1) + weights.sum(-2)) > 0


def ipo_closed_form(pi_ref: Tensor, data: PreferenceData, beta: float) -> Tensor:
    """IPO's optimal log-ratios u = log π/π_ref, exactly: a weighted least-squares problem on the graph.

    Σ_p w_p (u_w − u_l − 1/(2β))² is minimised by L u = (wins − losses)/(2β), with the weighted graph
    Laplacian L = Σ_p w_p (e_w − e_l)(e_w − e_l)ᵀ. Its minimum-norm solution (pseudo-inverse) is 0 on
    responses no pair mentions and sums to 0 over each connected group: the one gradient descent from π_ref
    reaches (see :func:`solve_dpo`), so ``solve_dpo(..., loss_type="ipo").table − log π_ref`` equals it. When
    the data is consistent (a tree of comparisons, each pair always won by the same response), every margin
    is 1/(2β); on a transitive tournament it is not: y0 ≻ y1 ≻ y2 and y0 ≻ y2 cannot all be 1/(2β) apart.
    """
    beta = _check_beta(beta)
    pi_ref = _check_policy("pi_ref", pi_ref, strictly_positive=True)
    weights = comparison_weights(data, *pi_ref.shape)
    weights = weights / weights.sum()  # the loss's normalisation; the minimiser does not depend on it
    sym = weights + weights.transpose(-1, -2)
    laplacian = torch.diag_embed(sym.sum(-1)) - sym
    net_wins = weights.sum(-1) - weights.sum(-2)
    return (torch.linalg.pinv(laplacian, hermitian=True) @ net_wins[..., None])[..., 0] / (2 * beta)


def preference_optimum(pi_ref: Tensor, data: PreferenceData, beta: float, *, loss_type: LossType = "sigmoid",
                       label_smoothing: float = 0.0, steps: int = 500) -> Tensor:
    """The exact policy a preference loss asks for on finite data: lim_{λ→0} argmin loss + λ KL(π‖π_ref).

    A pairwise loss on a finite data set never mentions the responses outside it, and sees only differences
    of log-ratios u = log π/π_ref within each connected group of compared responses, so its minimisers form
    a whole set: each group's total probability, and that of each never-compared response, is free. (DPO on
    deterministic data has no minimiser at all, only minimising sequences, whose limits form such a set.)
    The loss cannot choose; this function returns the member closest to π_ref in KL, which is what any
    vanishing KL penalty selects, the regulariser the DPO derivation starts from (Eq. 3):

    * the responses :func:`dominated_responses` finds get 0 (DPO, ε = 0, only);
    * within each group, u is the loss's own optimum there (L-BFGS to a certified stationary point);
    * each group B keeps u shifted so that E_{q_B}[u] = 0, q_B ∝ π_ref e^u its policy restricted to B, and a
      never-compared response keeps u = 0, i.e. π(y) ∝ π_ref(y): the KL-optimal split of mass between groups.

    So for deterministic data, DPO's limit is π_ref conditioned on the responses that never lose, the
    never-compared ones included, for every β: the rejected responses' mass goes to them in proportion to
    π_ref. IPO and cDPO have finite optima, set by β. (Gradient descent from π_ref, :func:`solve_dpo`,
    reaches another member of the same set: there each group keeps its sum of logits instead.)
    """
    beta = _check_beta(beta)
    pi_ref = _check_policy("pi_ref", pi_ref, strictly_positive=True)
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be 'sigmoid' (DPO, cDPO) or 'ipo', got {loss_type!r}: "
                         "the hinge's optimal margins are a range, not a point")
    data = data.aggregated()
    n_x, n_y = pi_ref.shape
    if loss_type == "sigmoid" and label_smoothing == 0.0:
        # only edges inside an undominated component have finite optimal margins; the rest go to infinity
        dominated = dominated_responses(data, n_x, n_y)
        same = _strong_components(comparison_weights(data, n_x, n_y) > 0)
        keep = (same[data.x, data.y_w, data.y_l] & ~dominated[data.x, data.y_w]).nonzero()[:, 0]
    else:
        dominated = torch.zeros(n_x, n_y, dtype=torch.bool)
        keep = torch.arange(len(data))
    log_ratio = torch.zeros(n_x, n_y, dtype=DTYPE)
    edges = torch.zeros(n_x, n_y, n_y, dtype=torch.bool)
    if len(keep):
        kept = PreferenceData(x=data.x[keep], y_w=data.y_w[keep], y_l=data.y_l[keep],
                              weight=data.weight[keep])
        fit = solve_dpo(pi_ref, kept, beta, steps=steps, loss_type=loss_type, label_smoothing=label_smoothing)
        _require_optimum(fit.table, pi_ref, kept, beta, loss_type, label_smoothing)
        log_ratio = torch.log_softmax(fit.table, -1) - pi_ref.log()
        edges[kept.x, kept.y_w, kept.y_l] = True
    group = _closure(edges | edges.transpose(-1, -2))  # [x, i, j]: i and j in the same group
    # E_{q_B}[u] for the group B of each response, q_B ∝ π_ref e^u on B
    log_q = torch.where(group, (pi_ref.log() + log_ratio)[:, None, :], -math.inf)
    group_mean = (torch.softmax(log_q, -1) * log_ratio[:, None, :]).sum(-1)
    logits = torch.where(dominated, -math.inf, pi_ref.log() + log_ratio - group_mean)
    return torch.softmax(logits, -1)


def _require_optimum(logits: Tensor, pi_ref: Tensor, data: PreferenceData, beta: float, loss_type: LossType,
                     label_smoothing: float) -> None:
    """Raise unless the gradient of the (strictly convex on each group) loss vanishes at ``logits``."""
    theta = logits.clone().requires_grad_(True)
    loss, _ = dpo_loss_on_table(theta, pi_ref, data, beta, loss_type=loss_type,
                                label_smoothing=label_smoothing)
    loss.backward()
    # The gradient in the logits carries Eq. 7's factor β, and so does its float64 round-off floor where
    # L-BFGS's line search stops: at β = 32 that floor was 1.8e-8 on one CPU. Hence 1e-8 per unit of β.
    worst, tol = float(theta.grad.abs().max()), 1e-8 * max(1.0, beta)
    if not worst < tol:  # NaN fails too
        raise RuntimeError(f"the {loss_type} solver stopped with gradient {worst:.3g} (> {tol:.3g}): no "
                           "certified optimum; raise `steps`")


# ----------------------------------------------------------------------------------------------------------
# the DPO gradient, by hand


def dpo_gradient(logits: Tensor, pi_ref: Tensor, data: PreferenceData, beta: float) -> Tensor:
    """∇_θ of the weighted DPO loss for π_θ = softmax(θ), from the paper's §4 formula.

    ∇L = −β E[σ(r̂_l − r̂_w) (∇ log π(y_w|x) − ∇ log π(y_l|x))]; for a softmax table ∇_θ log π(y|x) is
    e_y − π(·|x) at row x, so the difference is simply e_{y_w} − e_{y_l}.
    """
    beta = _check_beta(beta)
    logits = _check_table("logits", logits)
    r_hat = beta * (torch.log_softmax(logits, -1) - torch.log_softmax(pi_ref.log(), -1))
    weight = dpo_loss_gradient_weight(r_hat[data.x, data.y_w], r_hat[data.x, data.y_l])  # σ(r̂_l − r̂_w)
    coef = -beta * weight * data.weight / data.weight.sum()
    grad = torch.zeros_like(logits)
    grad.index_put_((data.x, data.y_w), coef, accumulate=True)
    grad.index_put_((data.x, data.y_l), -coef, accumulate=True)
    return grad


# ----------------------------------------------------------------------------------------------------------
# Eq. 10: REINFORCE with and without the normaliser β log Z(x)


def reinforce_returns(logits: Tensor, bandit: Bandit, beta: float, *, normalise: bool) -> Tensor:
    """Per-response return of the score-function estimator, shape (n_x, n_y).

    Eq. 3:  G = r(x,y) − β log π_θ/π_ref.   Eq. 10: G = f(r)(x,y) − β log π_θ/π_ref with
    f(r) = r − β log Z(x) (Eq. 8), i.e. the soft value of π_ref subtracted as a baseline. Both give the
    same expected gradient, since E_{y~π_θ}[∇ log π_θ(y|x)] = 0.
    """
    reward = project_reward(bandit.reward, bandit.pi_ref, beta) if normalise else bandit.reward
    return reward - beta * (torch.log_softmax(logits, -1) - bandit.pi_ref.log())


def reinforce_gradient_moments(logits: Tensor, bandit: Bandit, beta: float, *,
                               normalise: bool) -> tuple[Tensor, Tensor]:
    """Exact mean (n_x, n_y) and total variance (n_x,) of the one-sample estimator (e_y − π) G(y), y ~ π_θ."""
    policy = torch.softmax(logits, -1)
    g = reinforce_returns(logits, bandit, beta, normalise=normalise)
    eye = torch.eye(bandit.n_y, dtype=DTYPE)
    per_y = (eye[None] - policy[:, None, :]) * g[:, :, None]  # [x, y, :] = estimate when y is drawn
    mean = (policy[:, :, None] * per_y).sum(1)
    second = (policy * (per_y**2).sum(-1)).sum(-1)
    return mean, (second - (mean**2).sum(-1)).clamp_min(0.0)  # clamp: round-off only


def reinforce_gradient_samples(logits: Tensor, bandit: Bandit, beta: float, n_samples: int, *,
                               normalise: bool, seed: int = 0) -> Tensor:
    """Monte-Carlo one-sample gradient estimates, shape (n_samples, n_x, n_y): to measure the variance."""
    gen = torch.Generator().manual_seed(seed)
    policy = torch.softmax(logits, -1)
    g = reinforce_returns(logits, bandit, beta, normalise=normalise)
    y = torch.multinomial(policy, n_samples, replacement=True, generator=gen).T  # (n_samples, n_x)
    onehot = F.one_hot(y, bandit.n_y).to(DTYPE)
    return (onehot - policy[None]) * g.gather(1, y.T).T[:, :, None]


def train_reinforce(bandit: Bandit, beta: float, *, normalise: bool, steps: int = 300, batch_size: int = 4,
                    lr: float = 0.05, seed: int = 0) -> list[float]:
    """Plain SGD with the one-sample estimator; returns mean KL(π_θ‖π*) per step (lower is better)."""
    gen = torch.Generator().manual_seed(seed)
    logits = bandit.pi_ref.log().clone()
    target = bandit.optimal_policy(beta)
    trace = []
    with _single_thread():
        for _ in range(steps):
            trace.append(mean_over_prompts(kl_divergence(torch.softmax(logits, -1), target),
                                           bandit.prompt_probs))
            samples = reinforce_gradient_samples(logits, bandit, beta, batch_size, normalise=normalise,
                                                 seed=int(torch.randint(2**31 - 1, (1,), generator=gen)))
            logits = logits + lr * samples.mean(0)  # ascent on Eq. 3 / Eq. 10
    trace.append(mean_over_prompts(kl_divergence(torch.softmax(logits, -1), target), bandit.prompt_probs))
    return trace


def max_abs_error(a: Tensor, b: Tensor) -> float:
    """max |a − b|: how tests and notebooks compare two tables."""
    return float((a - b).abs().max())


__all__: Sequence[str] = [
    "Bandit", "PreferenceData", "FitResult", "RLHFSolution",
    "log_partition", "optimal_policy", "implicit_reward", "reparameterised_reward", "bt_probs",
    "bt_probs_from_policy", "shift_reward", "are_equivalent", "project_reward", "normaliser",
    "kl_divergence", "expected_reward", "rlhf_objective", "reward_kl_curve", "mean_over_prompts",
    "sample_preferences", "sample_annotated_preferences", "population_preferences", "dpo_loss_on_table",
    "solve_dpo", "reward_model_loss",
    "fit_reward_model", "solve_rlhf", "maximise_rlhf_objective", "rlhf_stationarity_gap", "dpo_gradient",
    "reinforce_returns", "reinforce_gradient_moments", "reinforce_gradient_samples", "train_reinforce",
    "max_abs_error", "comparison_weights", "dominated_responses", "compared_responses",
    "ipo_closed_form", "preference_optimum",
]
