"""ppo.py: hand-computed GAE, KL control and clipped losses; a tiny PPO run that learns, repeats, resumes."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_lab.evaluate import make_eval_fn
from dpo_lab.ppo import (
    AdaptiveKLController,
    PolicyWithValueHead,
    PPOConfig,
    PPOState,
    RunningMoments,
    gae,
    kl_controller,
    kl_penalized_rewards,
    policy_loss,
    ppo_step,
    value_loss,
    whiten,
)
from dpo_lab.presets import EvalConfig
from dpo_lab.run import ppo_run, read_metrics

PROMPTS = ["This movie", "The film", "I think", "A story", "The acting", "Music is", "Worst", "An excellent"]


def vowel_share(texts):
    """A synthetic reward a random tiny GPT-2 can raise quickly: the share of characters that are vowels."""
    return np.array([sum(ch in "aeiou" for ch in s) / max(len(s), 1) for s in texts])


# ------------------------------------------------------------------------------------------------- GAE
def test_gae_hand_example() -> None:
    # One row: a prompt step (masked), three completion steps, one padding step (masked).
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=3: delta = 1 + 0 - 0.7 = 0.3                       A = 0.3
    # t=2: delta = 0 + 0.7 - 0.6 = 0.1                     A = 0.1 + 0.95 * 0.3   = 0.385
    # t=1: delta = 0 + 0.6 - 0.5 = 0.1                     A = 0.1 + 0.95 * 0.385 = 0.46575
    expected_adv = torch.tensor([[0.0, 0.46575, 0.385, 0.3, 0.0]])
    expected_ret = torch.tensor([[0.0, 0.96575, 0.985, 1.0, 0.0]])  # A + V
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, expected_ret)


def test_gae_discounted_hand_example() -> None:
    rewards = torch.tensor([[1.0, 2.0]])
    values = torch.tensor([[0.5, 1.0]])
    mask = torch.ones(1, 2)
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # t=1: delta = 2 - 1 = 1;                A = 1
    # t=0: delta = 1 + 0.5 * 1 - 0.5 = 1;    A = 1 + 0.25 * 1 = 1.25
    torch.testing.assert_close(adv, torch.tensor([[1.25, 1.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.75, 2.0]]))


def test_gae_limits() -> None:
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.ones(3, 6)
    # lambda = 1, gamma = 1: Monte-Carlo returns (reward-to-go), independent of the values.
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, rewards.flip(-1).cumsum(-1).flip(-1))
    # lambda = 0: the one-step TD error.
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(3, 1)], dim=1)
    torch.testing.assert_close(adv, rewards + next_values - values)


def test_gae_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 0.95)
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), 1.5, 0.95)


# ---------------------------------------------------------------------------------------- KL rewards
def test_kl_penalized_rewards_hand_example() -> None:
    logprobs = torch.tensor([[-1.0, -1.0, -2.0, -1.0, 0.0]])
    ref_logprobs = torch.tensor([[-5.0, -1.1, -1.8, -1.3, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    rewards = kl_penalized_rewards(torch.tensor([2.0]), logprobs, ref_logprobs, mask, kl_coef=0.5)
    # log-ratios on completion tokens: 0.1, -0.2, 0.3 -> -0.5 x: -0.05, 0.1, -0.15 (+ score 2 on the last)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.05, 0.1, 1.85, 0.0]]))


def test_kl_penalized_rewards_needs_a_completion_token() -> None:
    with pytest.raises(ValueError, match="completion token"):
        kl_penalized_rewards(torch.zeros(1), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), 0.1)


# -------------------------------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller_update_rule() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    # KL 9: e = clip(9/6 - 1 = 0.5) = 0.2;  beta = 0.2 * (1 + 0.2 * 64 / 10000) = 0.200256
    assert ctl.update(9.0, n_steps=64) == pytest.approx(0.200256, rel=1e-12)
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    # KL 5: e = 5/6 - 1 = -1/6 (inside the clip);  beta = 0.2 * (1 - 64 / 60000)
    assert ctl.update(5.0, n_steps=64) == pytest.approx(0.2 * (1 - 64 / 60_000), rel=1e-12)
    # KL 0: e clipped at -0.2;  beta = previous * (1 - 0.2 * 100 / 10000)
    before = ctl.value
    assert ctl.update(0.0, n_steps=100) == pytest.approx(before * 0.998, rel=1e-12)


def test_fixed_controller_and_factory() -> None:
    ctl = AdaptiveKLController(0.3, target=None)
    assert ctl.update(100.0, n_steps=64) == 0.3
    assert kl_controller(PPOConfig(target_kl=None)).target is None
    adaptive = kl_controller(PPOConfig(target_kl=3.0, init_kl_coef=0.1))
    assert adaptive.target == 3.0 and adaptive.value == 0.1
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.2, target=0.0, horizon=10)


# --------------------------------------------------------------------------------------- clipped losses
def test_policy_loss_clipping_hand_example() -> None:
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, +1, -1, -1, cliprange 0.2:
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2  clipped (no gain from pushing the ratio higher)
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5  unclipped (gradient pulls the ratio back up)
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5  unclipped (gradient pushes the ratio back down)
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8  clipped
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
    logprobs = ratio.log().requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, clipfrac = policy_loss(logprobs, torch.zeros(1, 4), advantages, torch.ones(1, 4), cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert float(clipfrac) == pytest.approx(0.5)
    loss.backward()
    # d/dlogp of -A * ratio = -A * ratio / 4 where unclipped, 0 where clipped.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.5 / 4, 1.5 / 4, 0.0]]))


def test_policy_loss_ignores_masked_tokens() -> None:
    logprobs = torch.tensor([[0.1, 50.0]])
    advantages, mask = torch.tensor([[1.0, 1.0]]), torch.tensor([[1, 0]])
    loss, _ = policy_loss(logprobs, torch.zeros(1, 2), advantages, mask, 0.2)
    assert float(loss) == pytest.approx(-math.exp(0.1))


def test_value_loss_clipping_hand_example() -> None:
    # old value 0, return 1, cliprange_value 0.2:
    #   V=0.5 -> clipped V 0.2: max((0.5-1)^2 = 0.25, (0.2-1)^2 = 0.64) = 0.64  (clipped term wins)
    #   V=0.1 -> inside the clip: 0.81
    #   V=-0.5 -> clipped -0.2: max(2.25, 1.44) = 2.25 (unclipped wins)
    values = torch.tensor([[0.5, 0.1, -0.5]])
    loss, clipfrac = value_loss(values, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3), 0.2)
    assert float(loss) == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert float(clipfrac) == pytest.approx(1 / 3)


def test_whiten_is_masked() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = whiten(x, mask)
    assert float(out[0, 3]) == 0.0
    torch.testing.assert_close(out[0, :3], torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3), atol=1e-5,
                               rtol=1e-5)


def test_running_moments_match_numpy() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (5, 17, 1, 40)]
    moments = RunningMoments()
    for b in batches:
        moments.update(b)
    everything = np.concatenate(batches)
    assert moments.mean == pytest.approx(everything.mean())
    assert moments.std == pytest.approx(everything.std())
    assert moments.count == everything.size


def test_value_head_aligned_with_logprobs(tiny_model) -> None:
    model = PolicyWithValueHead(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8]])
    logits, logprobs, values = model(ids, torch.ones_like(ids))
    assert logits.shape[:2] == (1, 4) and logprobs.shape == values.shape == (1, 3)
    assert bool((values == 0).all())  # zero-initialised head


# --------------------------------------------------------------------------------------------- runs
CONFIG = PPOConfig(target_kl=None, init_kl_coef=0.05, rollout_batch_size=16, minibatch_size=8, ppo_epochs=2,
                   lr=1e-2, max_new_tokens=12, max_steps=24, eval_every=12, checkpoint_every=12)


def _run(policy, tokenizer, out_dir: Path, config: PPOConfig = CONFIG, reference=None, **kw):
    # CPU pinned: bit-exact determinism and resume are promised there (CUDA kernels may differ).
    reference = copy.deepcopy(policy) if reference is None else reference
    return ppo_run(policy, reference, tokenizer, PROMPTS, vowel_share, config=config, out_dir=out_dir,
                     seed=0, progress=False, device="cpu", **kw)


def test_ppo_increases_the_reward(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    reference = copy.deepcopy(tiny_model)
    # The project's evaluator (a frontier point: r and KL on held-out prompts) as eval_fn.
    eval_config = EvalConfig(n_prompts=4, samples_per_prompt=4, max_new_tokens=12, batch_size=16)
    frontier = make_eval_fn(reference, tiny_tokenizer, PROMPTS[:4], vowel_share, eval_config, seed=0)
    calls = []

    def eval_fn(policy, step):
        calls.append(step)
        return frontier(policy, step)

    result = _run(tiny_model, tiny_tokenizer, tmp_path, reference=reference, eval_fn=eval_fn)
    records = read_metrics(result.metrics_path)
    assert calls == [0, 12, 24]
    assert records[0]["step"] == 0 and records[0]["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert [r["step"] for r in records] == list(range(0, 25))
    assert "reward_mean" in records[12] and "reward_mean" not in records[5]
    assert records[24]["reward_mean"] > records[0]["reward_mean"] and records[24]["kl_mean"] > 0.1
    assert all(p.requires_grad for p in reference.parameters())  # the caller's reference is left as it was
    scores = [r["objective/scores"] for r in records[1:]]
    first, last = np.mean(scores[:4]), np.mean(scores[-4:])
    assert last > first + 0.05, (first, last)
    assert records[-1]["objective/kl"] > 0.1  # it moved away from pi_ref
    for key in ("kl_coef", "loss/policy", "loss/value", "policy/clipfrac", "policy/approx_kl",
                "policy/entropy"):
        assert all(math.isfinite(r[key]) for r in records[1:]), key
    assert (result.checkpoint_dir / "value_head" / "model.safetensors").is_file()


def test_ppo_is_deterministic_and_resumes_exactly(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    config = PPOConfig(target_kl=1.0, init_kl_coef=0.05, kl_horizon=100, rollout_batch_size=8,
                       minibatch_size=4, ppo_epochs=2, lr=3e-3, max_new_tokens=8, max_steps=4, eval_every=2,
                       checkpoint_every=2)
    full = _run(copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path / "full", config)
    again = _run(copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path / "again", config)
    strip = ("time/rollout_s", "time/step_s", "cost/wall_s")  # wall-clock
    clean = [[{k: v for k, v in r.items() if k not in strip} for r in read_metrics(res.metrics_path)]
             for res in (full, again)]
    assert clean[0] == clean[1]
    assert len({r["kl_coef"] for r in clean[0]}) > 1  # the adaptive controller moved beta

    # Interrupted after step 2, then continued to step 4: the same numbers as the uninterrupted run.
    policy = copy.deepcopy(tiny_model)
    reference = copy.deepcopy(tiny_model)
    _run(policy, tiny_tokenizer, tmp_path / "resumed", dataclasses.replace(config, max_steps=2), reference)
    resumed = _run(policy, tiny_tokenizer, tmp_path / "resumed", config, reference)
    got = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(resumed.metrics_path)]
    assert got == clean[0]
    ref_policy = copy.deepcopy(tiny_model)
    _run(ref_policy, tiny_tokenizer, tmp_path / "full", config)  # finished run: loads its final weights
    for a, b in zip(policy.state_dict().values(), ref_policy.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ppo_rejects_bad_arguments(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="same object"):
        ppo_run(tiny_model, tiny_model, tiny_tokenizer, PROMPTS, vowel_share, config=CONFIG,
                  out_dir=tmp_path, seed=0, progress=False)
    with pytest.raises(ValueError, match="minibatch_size"):
        _run(tiny_model, tiny_tokenizer, tmp_path, PPOConfig(rollout_batch_size=4, minibatch_size=8))
    frozen = copy.deepcopy(tiny_model).requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        _run(frozen, tiny_tokenizer, tmp_path / "frozen")
    with pytest.raises(ValueError, match="prompts"):
        ppo_run(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer, [], vowel_share, config=CONFIG,
                  out_dir=tmp_path, seed=0, progress=False)

    def bad_reward(texts):
        return np.zeros(len(texts) + 1)

    with pytest.raises(ValueError, match="score_fn"):
        ppo_run(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer, PROMPTS, bad_reward, config=CONFIG,
                  out_dir=tmp_path / "bad", seed=0, progress=False)


def test_on_rollout_sees_the_step_it_is_part_of(tiny_model, tiny_tokenizer) -> None:
    """The hook gets the batch, rewards and GAE that the update uses, and watching changes nothing."""
    def one_step(on_rollout=None):
        model = PolicyWithValueHead(copy.deepcopy(tiny_model)).eval()
        state = PPOState(model, tiny_model, torch.optim.Adam(model.parameters(), lr=1e-2),
                         AdaptiveKLController(0.05, None))
        record = ppo_step(state, tiny_tokenizer, PROMPTS, vowel_share, CONFIG, step=1, seed=0,
                          on_rollout=on_rollout)
        return record, model

    seen = []
    record, model = one_step(lambda *args: seen.append(args))
    (ro, rewards, advantages, returns), = seen
    assert len(ro.texts) == len(PROMPTS)
    assert record["objective/scores"] == pytest.approx(float(vowel_share(ro.texts).mean()), abs=1e-6)
    raw = vowel_share(ro.texts)
    scores = torch.as_tensor((raw - raw.mean()) / raw.std(), dtype=torch.float32)  # standardised at step 1
    expected = kl_penalized_rewards(scores, ro.logprobs, ro.ref_logprobs, ro.mask, 0.05)
    torch.testing.assert_close(rewards, expected)
    expected_gae = gae(expected, ro.values, ro.mask, CONFIG.gamma, CONFIG.lam)
    torch.testing.assert_close((advantages, returns), expected_gae)
    unwatched, plain = one_step()
    assert {k: v for k, v in record.items() if not k.startswith(("time/", "cost/wall"))} == {
        k: v for k, v in unwatched.items() if not k.startswith(("time/", "cost/wall"))}
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
