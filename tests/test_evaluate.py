"""evaluate.py: the sequence-level KL is exact (brute force on a tiny vocabulary) and 0 for pi == pi_ref."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from tiny_lms import seq_logprob, tiny_lm  # tests/ is on sys.path

from dpo_lab.evaluate import evaluate_policy, make_eval_fn
from dpo_lab.kl_estimators import kl_estimates
from dpo_lab.presets import DPOConfig, EvalConfig
from dpo_lab.run import dpo_run, read_metrics

PROMPTS = ["This movie was", "A terrible", "The music", "I watched"]


def length_reward(texts: Sequence[str]) -> np.ndarray:
    """Test double for r*: a smooth function of the text in [0, 1]."""
    return np.asarray([(sum(map(ord, t)) % 101) / 100 for t in texts])


def _eval(policy, reference, tokenizer, samples_per_prompt=3, **kw):
    config = EvalConfig(samples_per_prompt=samples_per_prompt, max_new_tokens=5, batch_size=8)
    return evaluate_policy(policy, reference, tokenizer, PROMPTS, length_reward, config, seed=0, **kw)


def test_kl_is_zero_for_the_reference_itself(tiny_model, tiny_tokenizer):
    out = _eval(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer)
    assert out["n"] == 12 and out["n_prompts"] == 4
    assert out["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert out["logratio_kl_mean"] == pytest.approx(0.0, abs=1e-5)
    assert 0.0 <= out["reward_mean"] <= 1.0 and out["reward_se"] > 0
    assert 1 <= out["completion_tokens_mean"] <= 5


def test_scorers_read_the_same_samples_and_skip_undefined_scores(tiny_model, tiny_tokenizer):
    seen: list[tuple[list[str], list[str]]] = []

    def spy(prompts: list[str], completions: list[str]) -> np.ndarray:
        seen.append((prompts, completions))
        return length_reward([p + c for p, c in zip(prompts, completions, strict=True)])

    def half_undefined(prompts: list[str], completions: list[str]) -> np.ndarray:
        return np.where(np.arange(len(prompts)) % 3 == 0, np.nan, 1.0 + np.arange(len(prompts)) % 3)

    plain = _eval(tiny_model, tiny_model, tiny_tokenizer)
    out = _eval(tiny_model, tiny_model, tiny_tokenizer, scorers={"spy": spy, "gappy": half_undefined})
    assert {k: out[k] for k in plain} == plain  # scorers change nothing else
    assert (out["spy_mean"], out["spy_se"]) == pytest.approx((out["reward_mean"], out["reward_se"]))
    (prompts, completions), = seen
    assert len(prompts) == len(completions) == 12 and prompts[:3] == [PROMPTS[0]] * 3
    # Per prompt the defined scores are 2 and 3 (mean 2.5): the NaN of each prompt's first sample is left out.
    assert out["gappy_mean"] == pytest.approx(2.5) and out["gappy_se"] == pytest.approx(0.0)


def test_kl_grows_with_the_distance_and_both_estimators_agree(tiny_model, tiny_tokenizer):
    torch.manual_seed(1)
    near, far = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p_near, p_far in zip(near.parameters(), far.parameters(), strict=True):
            noise = torch.randn_like(p_near)
            p_near.add_(0.05 * noise)
            p_far.add_(0.5 * noise)
    a = _eval(near, tiny_model, tiny_tokenizer, samples_per_prompt=8)
    b = _eval(far, tiny_model, tiny_tokenizer, samples_per_prompt=8)
    assert 0 < a["kl_mean"] < b["kl_mean"]
    # Same expectation (the chain rule); the sampled log-ratio is noisier.
    tol = 4 * (b["kl_se"] + b["logratio_kl_se"])
    assert abs(b["kl_mean"] - b["logratio_kl_mean"]) < tol
    assert _eval(far, tiny_model, tiny_tokenizer, samples_per_prompt=8) == b  # seeded


def test_sequence_kl_equals_brute_force_enumeration():
    """Vocab 5 (token 0 = EOS), at most 3 new tokens: every completion the sampler can produce is a run of
    non-EOS tokens, cut at 3 or ended by EOS. Exact KL(pi(y|x) || pi_ref(y|x)) over that finite set must
    equal the pi-weighted average of the summed per-step vocabulary KLs (no sampling needed)."""
    policy, reference = tiny_lm(0), tiny_lm(1)
    prompt, horizon, eos = [3, 1], 3, 0
    completions = [c + (eos,) for n in range(horizon) for c in itertools.product(range(1, 5), repeat=n)]
    completions += list(itertools.product(range(1, 5), repeat=horizon))
    assert len(completions) == 1 + 4 + 16 + 64
    log_pi = np.array([seq_logprob(policy, prompt, c) for c in completions])
    log_ref = np.array([seq_logprob(reference, prompt, c) for c in completions])
    pi = np.exp(log_pi)
    # The enumeration is the whole support. Each sequence has its own float32 forward, and a prefix's logits
    # differ in the last bits between lengths (6e-9 seen on an AVX2 machine): the tree sums to 1 within 1e-6.
    assert pi.sum() == pytest.approx(1.0, abs=1e-6)
    exact = float(np.sum(pi * (log_pi - log_ref)))
    assert exact > 0.05  # a non-trivial case
    est = kl_estimates(policy, reference, [prompt] * len(completions), [list(c) for c in completions],
                       batch_size=7, pad_token_id=eos)
    kl, logratio = est.exact, est.k1
    assert float(np.sum(pi * kl)) == pytest.approx(exact, rel=1e-5)
    np.testing.assert_allclose(logratio, log_pi - log_ref, atol=1e-4)


def test_eval_fn_plugs_into_the_trainer(tiny_model, tiny_tokenizer, tmp_path):
    reference = copy.deepcopy(tiny_model)
    config = EvalConfig(n_prompts=2, samples_per_prompt=2, max_new_tokens=4, batch_size=4)
    eval_fn = make_eval_fn(reference, tiny_tokenizer, PROMPTS[:2], length_reward, config, seed=0)
    pairs = {"prompt": PROMPTS * 2, "chosen": [" great"] * 8, "rejected": [" awful"] * 8}
    config = DPOConfig(optimizer="adamw", lr=1e-2, warmup_steps=0, batch_size=4, micro_batch_size=4,
                       max_steps=4, checkpoint_every=4, eval_every=2)
    result = dpo_run(tiny_model, reference, tiny_tokenizer, pairs, beta=0.1, config=config,
                     out_dir=tmp_path / "run", seed=0, max_length=16, ref_cache_dir=tmp_path / "cache",
                     eval_fn=eval_fn, progress=False)
    records = {r["step"]: r for r in read_metrics(result.metrics_path)}
    assert sorted(records) == [0, 1, 2, 3, 4]
    assert records[0]["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # the starting point: pi == pi_ref
    assert records[4]["kl_mean"] > 0 and "reward_mean" in records[2] and "reward_mean" not in records[3]


@pytest.mark.parametrize("hooked", [False, True], ids=["gpt2-stepper", "hf-forward"])
def test_kl_stepped_alongside_equals_the_second_pass(tiny_model, tiny_tokenizer, hooked):
    """sample(reference=...) gives the second pass's exact KL and log-ratio on the same samples (float
    rounding), counts the EOS step and none after it, and samples the same tokens as without a reference."""
    from dpo_lab.sampling import sample

    eos = tiny_tokenizer.eos_token_id
    torch.manual_seed(1)
    policy = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
        policy.lm_head.weight[eos] += 3.0  # some rows stop early
    if hooked:  # the reference through its own forward and a DynamicCache
        tiny_model.register_forward_hook(lambda *_: None)
    prompts = ["This movie", "A", "I watched it twice; the music", "The"]
    args = {"n_per_prompt": 3, "max_new_tokens": 8, "batch_size": 5, "seed": 0, "progress": False}
    plain = sample(policy, tiny_tokenizer, prompts, **args)
    both = sample(policy, tiny_tokenizer, prompts, reference=tiny_model, **args)
    assert both.completion_ids == plain.completion_ids and plain.kl is None
    flat = [c for per in both.completion_ids for c in per]
    assert any(c[-1] == eos and len(c) < 8 for c in flat)
    est = kl_estimates(policy, tiny_model, [p for p in both.prompt_ids for _ in range(3)], flat,
                       batch_size=5, pad_token_id=tiny_tokenizer.pad_token_id)
    kl, logratio = est.exact, est.k1
    assert kl.min() > 0.1
    np.testing.assert_allclose(np.ravel(both.kl), kl, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.ravel(both.logratio), logratio, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="loop backend"):
        sample(policy, tiny_tokenizer, prompts, reference=tiny_model, backend="generate", **args)
