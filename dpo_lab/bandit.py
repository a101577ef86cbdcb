"""An exact toy: a contextual bandit with π_ref(y|x) and r(x, y) as (n_x, n_y) float64 tables, so that Z(x),
π* and KL are exact sums and every step of the paper's argument checks to machine precision."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dpo_lab.losses import LossType, bradley_terry_loss, preference_loss

DTYPE = torch.float64


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < math.inf:
        raise ValueError(f"beta must be a positive finite float (the KL strength β), got {beta!r}")
    return float(beta)


class Bandit:
    """A contextual bandit: π_ref(y|x) and r(x, y) as (n_x, n_y) tables, prompts x uniform."""

    def __init__(self, pi_ref: Tensor, reward: Tensor) -> None:
        self.pi_ref, self.reward = pi_ref.to(DTYPE), reward.to(DTYPE)
        if self.pi_ref.ndim != 2 or self.pi_ref.shape != self.reward.shape:
            raise ValueError(f"shape mismatch: pi_ref {tuple(pi_ref.shape)}, reward {tuple(reward.shape)}")
        if not torch.isfinite(self.reward).all() or not (self.pi_ref > 0).all():
            raise ValueError("reward must be finite and pi_ref give every response positive probability")
        if not torch.allclose(self.pi_ref.sum(-1), torch.ones(len(pi_ref), dtype=DTYPE), atol=1e-8):
            raise ValueError(f"pi_ref rows must sum to 1, got sums {self.pi_ref.sum(-1).tolist()}")
        self.n_x, self.n_y = self.pi_ref.shape
        self.prompt_probs = torch.full((self.n_x,), 1.0 / self.n_x, dtype=DTYPE)

    @classmethod
    def random(cls, n_x: int = 3, n_y: int = 5, seed: int = 0, *, ref_scale: float = 1.0,
               reward_scale: float = 1.0) -> Bandit:
        if n_x < 1 or n_y < 2:
            raise ValueError(f"need n_x >= 1 prompts and n_y >= 2 responses, got n_x={n_x}, n_y={n_y}")
        gen = torch.Generator().manual_seed(seed)
        logits = ref_scale * torch.randn(n_x, n_y, generator=gen, dtype=DTYPE)
        reward = reward_scale * torch.randn(n_x, n_y, generator=gen, dtype=DTYPE)
        return cls(pi_ref=torch.softmax(logits, -1), reward=reward)

    def optimal_policy(self, beta: float) -> Tensor:
        return optimal_policy(self.reward, self.pi_ref, beta)

    def evaluate(self, policy: Tensor) -> tuple[float, float]:
        """(mean KL(π‖π_ref), mean expected reward): one point of a reward–KL plot."""
        return (mean_over_prompts(kl_divergence(policy, self.pi_ref), self.prompt_probs),
                mean_over_prompts(expected_reward(policy, self.reward), self.prompt_probs))


def mean_over_prompts(per_prompt: Tensor, prompt_probs: Tensor) -> float:
    return float((per_prompt * prompt_probs).sum())


# --- closed forms: Eqs. 1, 3, 4, 5, 6, 8, 9 and Def. 1
def log_partition(reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """log Z(x) = log Σ_y π_ref(y|x) exp(r(x,y)/β) (Eq. 4), in log space so small β does not overflow."""
    return torch.logsumexp(pi_ref.log() + reward / _check_beta(beta), dim=-1)


def optimal_policy(reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """π_r(y|x) = π_ref(y|x) exp(r(x,y)/β) / Z(x) (Eq. 4), the maximiser of Eq. 3."""
    return torch.softmax(pi_ref.log() + reward / _check_beta(beta), dim=-1)


def implicit_reward(policy: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """r̂(x,y) = β log π(y|x)/π_ref(y|x): DPO's implicit reward, and the Eq. 8 projection of r (Theorem 1)."""
    return _check_beta(beta) * (policy.log() - pi_ref.log())


def reparameterised_reward(policy: Tensor, pi_ref: Tensor, beta: float, log_z: Tensor) -> Tensor:
    """r(x,y) = β log π_r(y|x)/π_ref(y|x) + β log Z(x) (Eq. 5)."""
    return implicit_reward(policy, pi_ref, beta) + beta * log_z[:, None]


def bt_probs(reward: Tensor) -> Tensor:
    """p*(y1 ≻ y2 | x) = σ(r(x,y1) − r(x,y2)) (Eq. 1)."""
    return torch.sigmoid(reward[:, :, None] - reward[:, None, :])


def bt_probs_from_policy(policy: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """p*(y1 ≻ y2 | x) with π* only (Eq. 6): Z(x) cancels because BT sees reward differences."""
    return bt_probs(implicit_reward(policy, pi_ref, beta))


def shift_reward(reward: Tensor, shift: Tensor) -> Tensor:
    """r'(x,y) = r(x,y) + f(x): a member of r's equivalence class (Def. 1)."""
    if shift.shape != reward.shape[:1]:
        raise ValueError(f"shift f(x) needs one value per prompt: shape {tuple(shift.shape)}")
    return reward + shift[:, None]


def are_equivalent(reward_a: Tensor, reward_b: Tensor, atol: float = 1e-9) -> bool:
    """Def. 1: r ~ r' iff r − r' = f(x) for some f, i.e. the difference is constant in y."""
    diff = reward_a - reward_b
    return bool(torch.allclose(diff, diff[:, :1].expand_as(diff), atol=atol, rtol=0))


def project_reward(reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """f(r; π_ref, β)(x,y) = r(x,y) − β log Σ_y π_ref(y|x) exp(r(x,y)/β) (Eq. 8)."""
    return reward - beta * log_partition(reward, pi_ref, beta)[:, None]


def normaliser(reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """Σ_y π_ref(y|x) exp(r(x,y)/β): the left side of Eq. 9 (= 1 for a projected reward)."""
    return log_partition(reward, pi_ref, beta).exp()


def kl_divergence(policy: Tensor, pi_ref: Tensor) -> Tensor:
    """Exact KL(π(·|x) ‖ π_ref(·|x)) per prompt; 0·log 0 counts as 0 (the clamp only removes round-off)."""
    return (torch.xlogy(policy, policy) - policy * pi_ref.log()).sum(-1).clamp_min(0.0)


def expected_reward(policy: Tensor, reward: Tensor) -> Tensor:
    return (policy * reward).sum(-1)


def rlhf_objective(policy: Tensor, reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """E_π[r] − β KL(π‖π_ref) per prompt (Eq. 3); its maximum β log Z(x) is reached at π* (App. A.1)."""
    return expected_reward(policy, reward) - _check_beta(beta) * kl_divergence(policy, pi_ref)


def reward_kl_curve(bandit: Bandit, betas: Iterable[float]) -> list[tuple[float, float, float]]:
    """(β, mean KL(π*_β‖π_ref), mean E_{π*_β}[r]) for each β: the exact frontier of Eq. 3."""
    return [(float(beta), *bandit.evaluate(bandit.optimal_policy(beta))) for beta in betas]


# --- preference data
@dataclass(frozen=True)
class PreferenceData:
    """Triples (x, y_w, y_l) with a weight each: sampled data, or the whole population."""

    x: Tensor
    y_w: Tensor
    y_l: Tensor
    weight: Tensor

    def __post_init__(self) -> None:
        if not len(self.x) or any(t.dtype != torch.long or t.shape != self.x.shape
                                  for t in (self.x, self.y_w, self.y_l)) or self.weight.shape != self.x.shape:
            raise ValueError("PreferenceData needs x, y_w, y_l as long tensors and weights, shape (n,)")

    def __len__(self) -> int:
        return self.x.shape[0]

    def aggregated(self) -> PreferenceData:
        """Repeated triples merged, their weights summed: the same weighted loss, far fewer terms."""
        keys = torch.stack([self.x, self.y_w, self.y_l], dim=1)
        unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
        weight = torch.zeros(unique.shape[0], dtype=DTYPE).index_add_(0, inverse, self.weight.to(DTYPE))
        return PreferenceData(x=unique[:, 0], y_w=unique[:, 1], y_l=unique[:, 2], weight=weight)


def _sample_pairs(bandit: Bandit, response_probs: Tensor, p_first: Tensor, n_pairs: int,
                  seed: int) -> PreferenceData:
    """x ~ p(x), y1 ≠ y2 ~ response_probs(·|x) (ties redrawn); y1 wins w.p. p_first[x, y1, y2]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.multinomial(bandit.prompt_probs, n_pairs, replacement=True, generator=gen)
    y1, y2 = torch.empty(n_pairs, dtype=torch.long), torch.empty(n_pairs, dtype=torch.long)
    todo = torch.arange(n_pairs)
    while len(todo):  # each round redraws only the tied rows
        y1[todo] = torch.multinomial(response_probs[x[todo]], 1, generator=gen)[:, 0]
        y2[todo] = torch.multinomial(response_probs[x[todo]], 1, generator=gen)[:, 0]
        todo = todo[y1[todo] == y2[todo]]
    first_wins = torch.rand(n_pairs, generator=gen, dtype=DTYPE) < p_first[x, y1, y2]
    y_w, y_l = torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1)
    return PreferenceData(x=x, y_w=y_w, y_l=y_l, weight=torch.full((n_pairs,), 1.0 / n_pairs, dtype=DTYPE))


def sample_preferences(bandit: Bandit, n_pairs: int, seed: int = 0) -> PreferenceData:
    """Paper §4: x ~ p(x), y1 ≠ y2 ~ π_ref(·|x), labelled y1 ≻ y2 with BT probability (Eq. 1)."""
    return _sample_pairs(bandit, bandit.pi_ref, bt_probs(bandit.reward), n_pairs, seed)


def sample_annotated_preferences(bandit: Bandit, n_pairs: int, *, noise: float = 0.0,
                                 never_shown: Sequence[int] = (), seed: int = 0) -> PreferenceData:
    """Azar et al.'s setting: y1 ≠ y2 ~ π_ref(·|x) over the responses not ``never_shown``; the one with the
    higher r(x, y) wins, each label flipped with probability ``noise`` (at 0: an infinite BT reward gap)."""
    if not 0.0 <= noise <= 0.5:
        raise ValueError(f"noise must be a flip probability in [0, 0.5], got {noise}")
    shown = torch.ones(bandit.n_y, dtype=torch.bool)
    shown[list(never_shown)] = False
    if int(shown.sum()) < 2:
        raise ValueError("at least two responses must be shown to form a pair")
    probs = bandit.pi_ref * shown
    r1, r2 = bandit.reward[:, :, None], bandit.reward[:, None, :]
    p_first = torch.where(r1 > r2, 1.0 - noise, torch.where(r1 < r2, noise, 0.5)).to(DTYPE)
    return _sample_pairs(bandit, probs / probs.sum(-1, keepdim=True), p_first, n_pairs, seed)


def population_preferences(bandit: Bandit) -> PreferenceData:
    """Every (x, a, b), a ≠ b, weighted by its probability under :func:`sample_preferences`: infinite data,
    p(x) · 2 π_ref(a|x) π_ref(b|x) p*(a ≻ b|x) / (1 − Σ_y π_ref(y|x)²). Its DPO loss is minimised by π*."""
    n_x, n_y = bandit.n_x, bandit.n_y
    x, a, b = torch.meshgrid(torch.arange(n_x), torch.arange(n_y), torch.arange(n_y), indexing="ij")
    distinct = 1.0 - (bandit.pi_ref**2).sum(-1)
    weight = (2 * bandit.pi_ref[:, :, None] * bandit.pi_ref[:, None, :] * bt_probs(bandit.reward)
              * (bandit.prompt_probs / distinct)[:, None, None])
    keep = (a != b).flatten()
    return PreferenceData(x=x.flatten()[keep], y_w=a.flatten()[keep], y_l=b.flatten()[keep],
                          weight=weight.flatten()[keep])


# --- solvers: DPO (Eq. 7) on a tabular policy; RLHF = a reward model (Eq. 2), then Eq. 3 maximised
@dataclass
class FitResult:
    table: Tensor  # policy logits (DPO) or reward (reward model)
    history: list[dict[str, float]]  # per-step metrics (TRL's names for DPO)

    @property
    def policy(self) -> Tensor:
        return torch.softmax(self.table, -1)


def _minimise(loss_fn: Callable[[Tensor], tuple[Tensor, dict[str, float]]], init: Tensor, *, steps: int,
              adam_lr: float | None, grad_tol: float) -> FitResult:
    """L-BFGS (exact optima) or, given ``adam_lr``, Adam (training curves) until ``steps`` or convergence."""
    param = init.detach().clone().to(DTYPE).requires_grad_(True)
    if adam_lr is None:
        opt: torch.optim.Optimizer = torch.optim.LBFGS([param], lr=1.0, max_iter=1, max_eval=25,
                                                       history_size=50, tolerance_grad=0.0,
                                                       tolerance_change=0.0, line_search_fn="strong_wolfe")
    elif adam_lr > 0:
        opt = torch.optim.Adam([param], lr=adam_lr)
    else:
        raise ValueError(f"adam_lr must be a positive learning rate, or None for L-BFGS; got {adam_lr!r}")
    history: list[dict[str, float]] = []

    def closure() -> Tensor:
        opt.zero_grad()
        loss, _ = loss_fn(param)
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs made each op ~10x slower on a busy 2-core CPU
    try:
        for step in range(steps + 1):
            with torch.no_grad():
                history.append({"step": float(step), **loss_fn(param)[1]})
            if step == steps:
                break
            before = param.detach().clone()
            opt.step(closure)
            if float(param.grad.abs().max()) < grad_tol or torch.equal(before, param.detach()):
                break  # a table that no longer moves: L-BFGS's line search gave up (round-off)
    finally:
        torch.set_num_threads(threads)
    return FitResult(table=param.detach(), history=history)


def dpo_loss_on_table(logits: Tensor, pi_ref: Tensor, data: PreferenceData, beta: float, *,
                      loss_type: LossType = "sigmoid",
                      label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Weighted DPO loss (Eq. 7; IPO, cDPO via ``loss_type``) of softmax(logits), and TRL's metrics. Convex
    in the logits, as log π(y_w|x) − log π(y_l|x) = θ[x,y_w] − θ[x,y_l]."""
    logp = torch.log_softmax(logits, -1)
    # the same op on the reference, so that at θ = log π_ref every implicit reward is exactly 0
    ref_logp = torch.log_softmax(pi_ref.log(), -1)
    chosen, rejected = logp[data.x, data.y_w], logp[data.x, data.y_l]
    losses, r_chosen, r_rejected = preference_loss(chosen, rejected, ref_logp[data.x, data.y_w],
                                                   ref_logp[data.x, data.y_l], beta=beta,
                                                   loss_type=loss_type, label_smoothing=label_smoothing)
    w = data.weight / data.weight.sum()
    loss = (w * losses).sum()
    right = (r_chosen > r_rejected).double()
    metrics = {"loss": losses, "rewards/chosen": r_chosen, "rewards/rejected": r_rejected,
               "rewards/margins": r_chosen - r_rejected, "rewards/accuracies": right,
               "logps/chosen": chosen, "logps/rejected": rejected}
    return loss, {k: float((w * v.detach()).sum()) for k, v in metrics.items()}


def solve_dpo(pi_ref: Tensor, data: PreferenceData, beta: float, *, steps: int = 500,
              adam_lr: float | None = None, grad_tol: float = 1e-10, loss_type: LossType = "sigmoid",
              label_smoothing: float = 0.0) -> FitResult:
    """Minimise Eq. 7 over π_θ = softmax(θ) from π_ref (reaching π* on the population); an unmentioned
    response keeps its logit. Without a minimiser (:func:`dominated_responses`) it stops at ``steps``."""
    beta, data = _check_beta(beta), data.aggregated()
    return _minimise(lambda theta: dpo_loss_on_table(theta, pi_ref, data, beta, loss_type=loss_type,
                                                     label_smoothing=label_smoothing),
                     pi_ref.log(), steps=steps, adam_lr=adam_lr, grad_tol=grad_tol)


def reward_model_loss(reward: Tensor, data: PreferenceData) -> tuple[Tensor, dict[str, float]]:
    """Weighted BT negative log-likelihood −E[log σ(r(x,y_w) − r(x,y_l))] (Eq. 2) of a reward table."""
    chosen, rejected = reward[data.x, data.y_w], reward[data.x, data.y_l]
    w = data.weight / data.weight.sum()
    loss = (w * bradley_terry_loss(chosen, rejected)).sum()
    return loss, {"loss": float(loss.detach()), "accuracy": float((w * (chosen > rejected).to(DTYPE)).sum())}


@dataclass(frozen=True)
class RLHFSolution:
    reward_model: Tensor  # r_φ fitted by Eq. 2 from r_φ = 0: r* up to f(x) on the population (Lemma 1)
    policy: Tensor  # argmax of Eq. 3 under r_φ


def solve_rlhf(pi_ref: Tensor, data: PreferenceData, beta: float) -> RLHFSolution:
    """Two-stage RLHF: fit a tabular r_φ by Eq. 2, then maximise Eq. 3 exactly (closed form, Eq. 4)."""
    data = data.aggregated()
    reward_model = _minimise(lambda r: reward_model_loss(r, data), torch.zeros(pi_ref.shape, dtype=DTYPE),
                             steps=500, adam_lr=None, grad_tol=1e-10).table
    return RLHFSolution(reward_model=reward_model, policy=optimal_policy(reward_model, pi_ref, beta))


def maximise_rlhf_objective(reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    """Maximise Eq. 3 by natural-gradient ascent on the logits from π_ref (Kakade 2001), never computing Z(x):
    log π += (r − β log π/π_ref)/(2β) halves log π/π* (up to a constant in y) at every step."""
    beta = _check_beta(beta)
    logp = pi_ref.log()
    for _ in range(200):  # 200 halvings bring any float64 start to round-off
        logp = torch.log_softmax(logp + 0.5 / beta * (reward - beta * (logp - pi_ref.log())), -1)
    return logp.exp()


# --- finite data: where each loss's optimum is, exactly (DPO's failure and the IPO / cDPO fix, Azar et al.)
def comparison_weights(data: PreferenceData, n_x: int, n_y: int) -> Tensor:
    """Total weight of each labelled comparison, W[x, y_w, y_l]."""
    weights = torch.zeros(n_x, n_y, n_y, dtype=DTYPE)
    return weights.index_put_((data.x, data.y_w, data.y_l), data.weight.to(DTYPE), accumulate=True)


def _closure(adjacency: Tensor) -> Tensor:
    """Reflexive-transitive closure of a batch of boolean (n, n) adjacency matrices: who reaches whom."""
    n = adjacency.shape[-1]
    reach = adjacency | torch.eye(n, dtype=torch.bool)
    for _ in range(max(1, math.ceil(math.log2(n)))):  # each squaring doubles the path length covered
        reach = reach | ((reach.to(DTYPE) @ reach.to(DTYPE)) > 0)
    return reach


def _components(data: PreferenceData, n_x: int, n_y: int) -> tuple[Tensor, Tensor]:
    """[x, i, j]: i and j in one strongly connected component of the "y_w beat y_l" graph; and the dominated
    responses, (n_x, n_y) bool: those whose component loses to an outsider."""
    beats = comparison_weights(data, n_x, n_y) > 0
    reach = _closure(beats)
    same = reach & reach.transpose(-1, -2)
    loses_to_outsider = (beats & ~same).any(-2)  # [x, l]: some w outside l's component beat l
    return same, (same.to(DTYPE) @ loses_to_outsider[..., None].to(DTYPE))[..., 0] > 0


def dominated_responses(data: PreferenceData, n_x: int, n_y: int) -> Tensor:
    """(n_x, n_y) bool: the responses DPO drives to 0; on deterministic data, those that ever lose."""
    return _components(data, n_x, n_y)[1]


def compared_responses(data: PreferenceData, n_x: int, n_y: int) -> Tensor:
    """(n_x, n_y) bool: responses that appear in at least one pair of the data."""
    weights = comparison_weights(data, n_x, n_y)
    return (weights.sum(-1) + weights.sum(-2)) > 0


def ipo_closed_form(pi_ref: Tensor, data: PreferenceData, beta: float) -> Tensor:
    """IPO's optimal u = log π/π_ref: Σ_p w_p (u_w − u_l − 1/(2β))² is least at L u = (wins − losses)/(2β),
    L the graph Laplacian; the minimum-norm solution is the one :func:`solve_dpo` reaches from π_ref."""
    weights = comparison_weights(data, *pi_ref.shape)
    weights = weights / weights.sum()  # the loss's normalisation; the minimiser does not depend on it
    sym = weights + weights.transpose(-1, -2)
    laplacian = torch.diag_embed(sym.sum(-1)) - sym
    net_wins = weights.sum(-1) - weights.sum(-2)
    u = (torch.linalg.pinv(laplacian, hermitian=True) @ net_wins[..., None])[..., 0]
    return u / (2 * _check_beta(beta))


def preference_optimum(pi_ref: Tensor, data: PreferenceData, beta: float, *, loss_type: LossType = "sigmoid",
                       label_smoothing: float = 0.0, steps: int = 500) -> Tensor:
    """The policy a preference loss asks for on finite data, lim_{λ→0} argmin loss + λ KL(π‖π_ref):
    :func:`dominated_responses` get 0 (DPO only); on each group of compared responses u = log π/π_ref is the
    certified optimum shifted to E_{q_B}[u] = 0, q_B ∝ π_ref e^u; an unmentioned response keeps u = 0."""
    beta = _check_beta(beta)
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be 'sigmoid' (DPO, cDPO) or 'ipo', got {loss_type!r}: "
                         "the hinge's optimal margins are a range, not a point")
    data = data.aggregated()
    n_x, n_y = pi_ref.shape
    dominated, keep = torch.zeros(n_x, n_y, dtype=torch.bool), torch.ones(len(data), dtype=torch.bool)
    if loss_type == "sigmoid" and label_smoothing == 0.0:
        # only edges inside an undominated component have finite optimal margins; the rest go to infinity
        same, dominated = _components(data, n_x, n_y)
        keep = same[data.x, data.y_w, data.y_l] & ~dominated[data.x, data.y_w]
    log_ratio = torch.zeros(n_x, n_y, dtype=DTYPE)
    edges = torch.zeros(n_x, n_y, n_y, dtype=torch.bool)
    if keep.any():
        kept = PreferenceData(data.x[keep], data.y_w[keep], data.y_l[keep], data.weight[keep])
        kwargs = {"loss_type": loss_type, "label_smoothing": label_smoothing}
        fit = solve_dpo(pi_ref, kept, beta, steps=steps, **kwargs)
        theta = fit.table.clone().requires_grad_(True)
        dpo_loss_on_table(theta, pi_ref, kept, beta, **kwargs)[0].backward()
        # the gradient carries Eq. 7's factor β, and so does its float64 floor where L-BFGS stops (1.8e-8 at
        # β = 32 on one CPU): hence 1e-8 per unit of β
        worst, tol = float(theta.grad.abs().max()), 1e-8 * max(1.0, beta)
        if not worst < tol:  # NaN fails too
            raise RuntimeError(f"the {loss_type} solver stopped with gradient {worst:.3g} (> {tol:.3g}): no "
                               "certified optimum; raise `steps`")
        log_ratio = torch.log_softmax(fit.table, -1) - pi_ref.log()
        edges[kept.x, kept.y_w, kept.y_l] = True
    group = _closure(edges | edges.transpose(-1, -2))  # [x, i, j]: i and j in the same group
    log_q = torch.where(group, (pi_ref.log() + log_ratio)[:, None, :], -math.inf)  # q_B ∝ π_ref e^u on B
    group_mean = (torch.softmax(log_q, -1) * log_ratio[:, None, :]).sum(-1)
    return torch.softmax(torch.where(dominated, -math.inf, pi_ref.log() + log_ratio - group_mean), -1)


# --- Eq. 10: REINFORCE with and without the normaliser β log Z(x)
def reinforce_returns(logits: Tensor, bandit: Bandit, beta: float, *, normalise: bool) -> Tensor:
    """The score-function estimator's return per response: r − β log π_θ/π_ref (Eq. 3), or with r replaced by
    f(r) = r − β log Z(x) (Eq. 10, Eq. 8): the same expected gradient, as E_{π_θ}[∇ log π_θ] = 0."""
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


def max_abs_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())
