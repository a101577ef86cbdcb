"""Preference losses against independent formulas, the paper's gradient, and the reward invariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_lab.losses import (
    bradley_terry_loss,
    mean_token_nll,
    plackett_luce_loss,
    preference_loss,
    preference_metrics,
    preferred_ft_loss,
    unlikelihood_loss,
)

finite = st.floats(min_value=-60.0, max_value=0.0, allow_nan=False)
betas = st.floats(min_value=0.01, max_value=5.0)


def _random_logps(seed: int, b: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(b, generator=g, dtype=torch.float64) * 40) for _ in range(4)]


def _log_sigmoid(z: float) -> float:
    # Written out by hand (not torch): log σ(z) = −log(1 + e^{−z}), stable for either sign.
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def _direct(pw: float, pl: float, rw: float, rl: float, beta: float, loss_type: str, eps: float) -> float:
    h = (pw - pl) - (rw - rl)
    if loss_type == "sigmoid":
        return -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return max(0.0, 1 - beta * h)


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("beta", [0.05, 0.5, 5.0])
def test_loss_matches_direct_formula(loss_type: str, eps: float, beta: float) -> None:
    pw, pl, rw, rl = _random_logps(seed=int(beta * 100))
    losses, chosen, rejected = preference_loss(pw, pl, rw, rl, beta=beta, loss_type=loss_type,
                                               label_smoothing=eps)
    expected = [_direct(*map(float, row), beta, loss_type, eps)
                for row in zip(pw, pl, rw, rl, strict=True)]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(chosen.numpy(), beta * (pw - rw).numpy(), rtol=1e-12)
    np.testing.assert_allclose(rejected.numpy(), beta * (pl - rl).numpy(), rtol=1e-12)


def test_bradley_terry_loss_hand_values() -> None:
    chosen, rejected = torch.tensor([0.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, 2.0])
    expected = [math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))]
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(expected))
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


def test_dpo_loss_is_bradley_terry_on_implicit_rewards() -> None:
    pw, pl, rw, rl = _random_logps(3)
    losses, chosen, rejected = preference_loss(pw, pl, rw, rl, beta=0.4)
    torch.testing.assert_close(losses, bradley_terry_loss(chosen, rejected), rtol=1e-12, atol=1e-12)


def test_rewards_are_detached_and_loss_is_not() -> None:
    pw, pl, rw, rl = _random_logps(seed=1)
    pw.requires_grad_(True)
    losses, chosen, _ = preference_loss(pw, pl, rw, rl, beta=0.1)
    assert losses.requires_grad and not chosen.requires_grad


def test_loss_is_log2_when_policy_equals_reference() -> None:
    pw, pl, _, _ = _random_logps(seed=2)
    losses, chosen, rejected = preference_loss(pw, pl, pw.clone(), pl.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))
    assert float(chosen.abs().max()) == 0 and float(rejected.abs().max()) == 0
    metrics = preference_metrics(losses, chosen, rejected, pw, pl)
    assert metrics["loss"] == pytest.approx(math.log(2))
    assert metrics["rewards/accuracies"] == 0.0  # strict '>' with all rewards 0


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_autograd_gradient_matches_paper_closed_form(beta: float) -> None:
    """§4: ∂L/∂log π(y_w) = −β σ(r̂_l − r̂_w), ∂L/∂log π(y_l) = +β σ(r̂_l − r̂_w)."""
    pw, pl, rw, rl = _random_logps(seed=3)
    pw.requires_grad_(True)
    pl.requires_grad_(True)
    losses, chosen, rejected = preference_loss(pw, pl, rw, rl, beta=beta)
    losses.sum().backward()
    weight = 1 / (1 + torch.exp(-(rejected - chosen)))  # σ(r̂_l − r̂_w), written out
    torch.testing.assert_close(pw.grad, -beta * weight)
    torch.testing.assert_close(pl.grad, beta * weight)


@settings(max_examples=60, deadline=None)
@given(pw=finite, pl=finite, rw=finite, rl=finite, beta=betas,
       shift=st.floats(min_value=-50.0, max_value=50.0),
       loss_type=st.sampled_from(["sigmoid", "ipo", "hinge"]))
def test_loss_invariant_to_per_prompt_reward_shift(pw: float, pl: float, rw: float, rl: float, beta: float,
                                                   shift: float, loss_type: str) -> None:
    """Lemma 1: r and r + f(x) induce the same preferences, so shifting both implicit rewards of a pair by
    the same constant (here by moving both policy log-probs by f(x)/β) leaves the loss unchanged."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    base, r_w, r_l = preference_loss(t(pw), t(pl), t(rw), t(rl), beta=beta, loss_type=loss_type)
    shifted, s_w, s_l = preference_loss(t(pw + shift / beta), t(pl + shift / beta), t(rw), t(rl),
                                        beta=beta, loss_type=loss_type)
    torch.testing.assert_close(s_w - r_w, t(shift), rtol=0, atol=1e-9)  # both rewards really moved
    torch.testing.assert_close(s_l - r_l, t(shift), rtol=0, atol=1e-9)
    torch.testing.assert_close(shifted, base, rtol=1e-7, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(margin=st.floats(min_value=-20, max_value=20), beta=betas)
def test_sigmoid_loss_decreases_with_margin(margin: float, beta: float) -> None:
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    zero = t(0.0)
    lo, _, _ = preference_loss(t(margin), zero, zero, zero, beta=beta)
    hi, _, _ = preference_loss(t(margin + 1.0), zero, zero, zero, beta=beta)
    assert float(hi) < float(lo)


def test_preference_metrics_values() -> None:
    losses = torch.tensor([1.0, 3.0])
    chosen, rejected = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 1.0])
    m = preference_metrics(losses, chosen, rejected, torch.tensor([-2.0, -4.0]), torch.tensor([-6.0, -8.0]))
    assert m == pytest.approx({"loss": 2.0, "rewards/chosen": -0.25, "rewards/rejected": 0.5,
                               "rewards/margins": -0.75, "rewards/accuracies": 0.5,
                               "logps/chosen": -3.0, "logps/rejected": -7.0})


def _token_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logps = torch.log(torch.rand(3, 7, generator=g, dtype=torch.float64) * 0.98 + 0.01)
    mask = (torch.rand(3, 7, generator=g) > 0.3).long()
    mask[:, 0] = 1  # every row non-empty
    return logps, mask


def test_preferred_ft_and_unlikelihood_match_direct_formulas() -> None:
    lw, mw = _token_batch(0)
    ll, ml = _token_batch(1)
    alpha = 0.7
    ul = unlikelihood_loss(lw, mw, ll, ml, alpha=alpha)
    ft = preferred_ft_loss(lw, mw)
    for i in range(3):
        nll = -sum(float(lw[i, t]) for t in range(7) if mw[i, t])
        penalty = sum(math.log(1 - math.exp(float(ll[i, t]))) for t in range(7) if ml[i, t])
        assert float(ft[i]) == pytest.approx(nll, rel=1e-12)
        assert float(ul[i]) == pytest.approx(nll - alpha * penalty, rel=1e-6)


def test_unlikelihood_is_stable_near_certain_and_impossible_tokens() -> None:
    chosen, mask = torch.full((1, 3), -0.5), torch.ones(1, 3, dtype=torch.long)
    rejected = torch.tensor([[0.0, -1e-12, -200.0]], requires_grad=True)
    loss = unlikelihood_loss(chosen, mask, rejected, mask, alpha=1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(rejected.grad).all()
    # log(1 − e^{−200}) ≈ 0: an impossible token costs nothing; a certain one costs a lot.
    assert float(loss.detach()) > 1.5 + 2 * 13.0


def test_unlikelihood_alpha_zero_is_preferred_ft_and_ignores_masked_positions() -> None:
    lw, mw = _token_batch(2)
    ll, ml = _token_batch(3)
    torch.testing.assert_close(unlikelihood_loss(lw, mw, ll, ml, alpha=0.0), preferred_ft_loss(lw, mw))
    garbage = torch.where(ml.bool(), ll, torch.tensor(float("nan"), dtype=ll.dtype))
    torch.testing.assert_close(unlikelihood_loss(lw, mw, garbage, ml, alpha=0.5),
                               unlikelihood_loss(lw, mw, ll, ml, alpha=0.5))


# --- bad input -----------------------------------------------------------------------------------------

def _ok() -> list[torch.Tensor]:
    return _random_logps(seed=9, b=4)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"beta": 0.0}, ValueError, "beta must be > 0"),
    ({"beta": -1.0}, ValueError, "beta must be > 0"),
    ({"beta": float("nan")}, ValueError, "beta must be finite"),
    ({"beta": float("inf")}, ValueError, "beta must be finite"),
    ({"beta": "0.1"}, TypeError, "beta must be a real number"),
    ({"beta": 0.1, "loss_type": "kto"}, ValueError, "unknown loss_type 'kto'"),
    ({"beta": 0.1, "label_smoothing": 0.5}, ValueError, "[0, 0.5)"),
    ({"beta": 0.1, "label_smoothing": -0.1}, ValueError, "label_smoothing must be >= 0"),
    ({"beta": 0.1, "label_smoothing": 0.1, "loss_type": "ipo"}, ValueError,
     "only applies to loss_type='sigmoid'"),
    ({"beta": 0.1, "label_smoothing": 0.1, "loss_type": "hinge"}, ValueError, "not 'hinge'"),
])
def test_bad_scalars_raise_clear_errors(kwargs: dict, error: type, words: str) -> None:
    with pytest.raises(error) as info:
        preference_loss(*_ok(), **kwargs)
    assert words in str(info.value)


def test_bad_tensors_raise_clear_errors() -> None:
    pw, pl, rw, rl = _ok()
    with pytest.raises(ValueError, match="same shape"):
        preference_loss(pw, pl[:3], rw, rl, beta=0.1)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \(B,\)"):
        preference_loss(pw, pl, rw.view(2, 2), rl, beta=0.1)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = rl.clone()
        broken[1] = bad
        with pytest.raises(ValueError, match="ref_rejected_logps contains NaN or inf"):
            preference_loss(pw, pl, rw, broken, beta=0.1)
    with pytest.raises(TypeError, match="policy_chosen_logps must be a torch.Tensor"):
        preference_loss(pw.tolist(), pl, rw, rl, beta=0.1)
    with pytest.raises(TypeError, match="floating-point"):
        preference_loss(pw.long(), pl, rw, rl, beta=0.1)


def test_bad_token_inputs_raise_clear_errors() -> None:
    lw, mw = _token_batch(4)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        unlikelihood_loss(lw, mw, lw, mw, alpha=-0.1)
    with pytest.raises(ValueError, match="chosen_mask has shape"):
        preferred_ft_loss(lw, mw[:, :3])
    with pytest.raises(ValueError, match="log-probabilities must be <= 0"):
        preferred_ft_loss(-lw, mw)
    with pytest.raises(ValueError, match="only 0 and 1"):
        preferred_ft_loss(lw, mw * 2)
    empty = mw.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="no tokens"):
        unlikelihood_loss(lw, mw, lw, empty, alpha=0.1)
    with pytest.raises(ValueError, match="rows"):
        unlikelihood_loss(lw, mw, lw[:2], mw[:2], alpha=0.1)


# --- Plackett-Luce DPO (App. A.3, Eq. 18) ----------------------------------------------------------------

def _rankings(seed: int, b: int = 6, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (-(torch.rand(b, k, generator=g, dtype=torch.float64) * 40),
            -(torch.rand(b, k, generator=g, dtype=torch.float64) * 40))


def _plackett_luce_direct(policy: list[float], ref: list[float], beta: float) -> float:
    # Eq. 18 by hand: -log prod_k exp(beta h_k) / sum_{j >= k} exp(beta h_j), with a max-shift per factor.
    z = [beta * (p - r) for p, r in zip(policy, ref, strict=True)]
    total = 0.0
    for k in range(len(z)):
        top = max(z[k:])
        total -= z[k] - (top + math.log(sum(math.exp(v - top) for v in z[k:])))
    return total


@pytest.mark.parametrize("k", [2, 3, 4, 6])
@pytest.mark.parametrize("beta", [0.05, 0.5, 5.0])
def test_plackett_luce_matches_direct_formula(k: int, beta: float) -> None:
    policy, ref = _rankings(seed=k, k=k)
    losses, rewards = plackett_luce_loss(policy, ref, beta=beta)
    expected = [_plackett_luce_direct(p.tolist(), r.tolist(), beta) for p, r in zip(policy, ref, strict=True)]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rewards.numpy(), beta * (policy - ref).numpy(), rtol=1e-12)
    assert not rewards.requires_grad


@pytest.mark.parametrize("beta", [0.05, 0.5, 5.0])
def test_plackett_luce_with_two_completions_is_dpo(beta: float) -> None:
    pw, pl, rw, rl = _random_logps(seed=11)
    losses, rewards = plackett_luce_loss(torch.stack([pw, pl], 1), torch.stack([rw, rl], 1), beta=beta)
    dpo, chosen, rejected = preference_loss(pw, pl, rw, rl, beta=beta)
    torch.testing.assert_close(losses, dpo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rewards, torch.stack([chosen, rejected], 1), rtol=0, atol=0)


def test_plackett_luce_gradcheck_and_closed_form_gradient() -> None:
    policy, ref = _rankings(seed=5, b=3, k=4)
    policy.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: plackett_luce_loss(p, ref, beta=0.7)[0], (policy,))
    # dL/dz_k = -1 + sum_{i <= k} softmax(z_{i:})_k: each factor pulls its own completion up and every
    # completion still in its denominator down by its Plackett-Luce probability.
    beta = 0.7
    plackett_luce_loss(policy, ref, beta=beta)[0].sum().backward()
    z = beta * (policy - ref).detach()
    expected = torch.full_like(z, -1.0)
    for i in range(z.shape[1]):
        expected[:, i:] += torch.softmax(z[:, i:], dim=-1)
    torch.testing.assert_close(policy.grad, beta * expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(shift=st.floats(min_value=-50.0, max_value=50.0), beta=betas, seed=st.integers(0, 1000))
def test_plackett_luce_invariant_to_a_per_row_shift(shift: float, beta: float, seed: int) -> None:
    """Lemma 1 for rankings: a constant added to every h_k of a ranking (an f(x) in the reward) is a no-op."""
    policy, ref = _rankings(seed, b=3, k=4)
    shifts = torch.tensor([shift, -shift, 2 * shift], dtype=torch.float64).unsqueeze(1)
    base, _ = plackett_luce_loss(policy, ref, beta=beta)
    moved, _ = plackett_luce_loss(policy + shifts, ref, beta=beta)
    torch.testing.assert_close(moved, base, rtol=1e-7, atol=1e-7)


def test_plackett_luce_at_initialisation_is_log_k_factorial() -> None:
    policy, _ = _rankings(seed=6, k=4)
    losses, _ = plackett_luce_loss(policy, policy.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(24)))  # uniform over 4! orders


def test_plackett_luce_bad_inputs_are_named() -> None:
    policy, ref = _rankings(seed=7)
    with pytest.raises(ValueError, match=r"K >= 2"):
        plackett_luce_loss(policy[:, :1], ref[:, :1], beta=0.1)
    with pytest.raises(ValueError, match=r"shape \(B, K\)"):
        plackett_luce_loss(policy[0], ref[0], beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        plackett_luce_loss(policy, ref[:, :3], beta=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        plackett_luce_loss(policy, ref, beta=0.0)


# --- NLL-regularised DPO (RPO) ----------------------------------------------------------------------------

def test_mean_token_nll_matches_direct_formula() -> None:
    logps, mask = _token_batch(5)
    nll = mean_token_nll(logps, mask)
    for i in range(3):
        tokens = [float(logps[i, t]) for t in range(7) if mask[i, t]]
        assert float(nll[i]) == pytest.approx(-sum(tokens) / len(tokens), rel=1e-12)


def test_rpo_gradient_on_the_chosen_tokens() -> None:
    """Each chosen token: DPO's -beta sigma(r_l - r_w) (through the sum, Sec. 4) plus RPO's -alpha/|y_w|."""
    logps, mask = _token_batch(7)
    logps.requires_grad_(True)
    _, pl, rw, rl = _random_logps(seed=13, b=3)
    alpha, beta = 0.5, 0.2
    pw = torch.where(mask.bool(), logps, 0.0).sum(-1)
    losses, chosen, rejected = preference_loss(pw, pl, rw, rl, beta=beta)
    (losses + alpha * mean_token_nll(logps, mask)).sum().backward()  # RPO: L_DPO + alpha * NLL(y_w) / |y_w|
    per_row = -beta * torch.sigmoid(rejected - chosen) - alpha / mask.sum(-1).double()
    torch.testing.assert_close(logps.grad, per_row.unsqueeze(1) * mask, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda t: preference_loss(torch.where(mask.bool(), t, 0.0).sum(-1), pl, rw, rl, beta=beta)[0]
        + alpha * mean_token_nll(t, mask),
        (logps.detach().clone().requires_grad_(True),))
