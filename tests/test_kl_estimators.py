"""kl_estimators.py: k1 and k3 unbiased, k2/k3 non-negative per token, the exact sum = the sampler's KL,
and a sampler whose top-k, minimum length and EOS stripping do what they say."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from tiny_lms import boost_eos, seq_logprob, tiny_lm  # tests/ is on sys.path
from transformers import GPT2Config, GPT2LMHeadModel

from dpo_lab.kl_estimators import drop_eos, kl_estimates, sample_with_settings, token_estimators
from dpo_lab.sampling import sample

PROMPTS = ["This movie was", "A terrible", "The music", "I watched"]


def _perturbed(model: GPT2LMHeadModel, scale: float, seed: int = 1) -> GPT2LMHeadModel:
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def _flat(samples) -> tuple[list[list[int]], list[list[int]]]:
    xs = [x for x, per in zip(samples.prompt_ids, samples.completion_ids, strict=True) for _ in per]
    return xs, [c for per in samples.completion_ids for c in per]


def test_k1_k3_and_exact_are_unbiased_by_brute_force():
    """Vocab 5 (token 0 = EOS), at most 3 new tokens: the 85 completions are the whole support, so
    E_pi[estimator] = sum_y pi(y) estimator(y) exactly, against KL(pi(y|x) || pi_ref(y|x)) by definition."""
    policy, reference = tiny_lm(0), tiny_lm(1)
    prompt, horizon, eos = [3, 1], 3, 0
    completions = [c + (eos,) for n in range(horizon) for c in itertools.product(range(1, 5), repeat=n)]
    completions += list(itertools.product(range(1, 5), repeat=horizon))
    log_pi = np.array([seq_logprob(policy, prompt, c) for c in completions])
    log_ref = np.array([seq_logprob(reference, prompt, c) for c in completions])
    pi = np.exp(log_pi)
    assert pi.sum() == pytest.approx(1.0, abs=1e-6)
    kl = float(np.sum(pi * (log_pi - log_ref)))
    assert kl > 0.05
    est = kl_estimates(policy, reference, [prompt] * len(completions), [list(c) for c in completions],
                       batch_size=16, pad_token_id=eos)
    for name in ("k1", "k3", "exact"):
        assert float(np.sum(pi * getattr(est, name))) == pytest.approx(kl, rel=1e-5), name
    # k2 is not unbiased: here it misses by far more than rounding.
    assert abs(float(np.sum(pi * est.k2)) - kl) > 1e-2
    np.testing.assert_allclose(est.k1, log_pi - log_ref, atol=1e-4)
    assert (est.k1 < 0).any(), "k1 is negative on some completions, unbiased all the same"
    assert est.n_tokens.tolist() == [len(c) for c in completions]


def test_k2_and_k3_are_non_negative_per_token():
    torch.manual_seed(0)
    logits_p, logits_q = 4 * torch.randn(2, 64, 50), 4 * torch.randn(2, 64, 50)
    ids = torch.randint(0, 50, (2, 64))
    logp = logits_p.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    logq = logits_q.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    near = logp + 1e-7 * torch.randn_like(logp)  # k3 = e^u - 1 - u at u ~ 1e-7: the rounding case
    for a, b in ((logp, logq), (logp, near), (logq, logp)):
        k1, k2, k3 = token_estimators(a, b)
        assert k1.dtype == torch.float64
        assert bool((k2 >= 0).all()) and bool((k3 >= 0).all())
        assert (k1 < 0).any() and (k1 > 0).any()
        torch.testing.assert_close(k2, 0.5 * k1.square())
    with pytest.raises(ValueError, match="same shape"):
        token_estimators(logp, logq[:, :3])


def test_all_four_are_zero_at_the_reference_and_exact_equals_the_samplers_kl(tiny_model, tiny_tokenizer):
    s = sample(tiny_model, tiny_tokenizer, PROMPTS, n_per_prompt=3, max_new_tokens=6, batch_size=5, seed=0,
               progress=False)
    xs, ys = _flat(s)
    same = kl_estimates(tiny_model, copy.deepcopy(tiny_model), xs, ys, batch_size=5)
    for name, values in same.as_dict().items():
        if name != "n_tokens":
            assert np.abs(values).max() == 0.0, name
    policy = _perturbed(tiny_model, 0.1)
    s = sample(policy, tiny_tokenizer, PROMPTS, n_per_prompt=3, max_new_tokens=6, batch_size=5, seed=0,
               progress=False, reference=tiny_model)  # the KL and log-ratio stepped alongside the sampler
    xs, ys = _flat(s)
    est = kl_estimates(policy, tiny_model, xs, ys, batch_size=4, pad_token_id=tiny_tokenizer.pad_token_id)
    np.testing.assert_allclose(est.exact, np.ravel(s.kl), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(est.k1, np.ravel(s.logratio), rtol=1e-4, atol=1e-4)  # sums in another order
    assert (est.exact > 0).all() and (est.k2 >= 0).all() and (est.k3 >= 0).all()


def test_default_settings_reproduce_generate_sampling_and_top_k_is_applied(tiny_model, tiny_tokenizer):
    kw = {"n_per_prompt": 3, "max_new_tokens": 5, "batch_size": 4, "seed": 2}
    plain = sample_with_settings(tiny_model, tiny_tokenizer, PROMPTS, **kw)
    assert plain == sample(tiny_model, tiny_tokenizer, PROMPTS, **kw, backend="generate", progress=False)
    greedy = sample_with_settings(tiny_model, tiny_tokenizer, PROMPTS, **kw, top_k=1)
    assert all(len({tuple(c) for c in per}) == 1 for per in greedy.completion_ids)  # top-1 = argmax
    wide = sample_with_settings(tiny_model, tiny_tokenizer, ["The"], **{**kw, "n_per_prompt": 300,
                                                                         "max_new_tokens": 1,
                                                                         "batch_size": 300})
    cut = sample_with_settings(tiny_model, tiny_tokenizer, ["The"], **{**kw, "n_per_prompt": 300,
                                                                        "max_new_tokens": 1,
                                                                        "batch_size": 300}, top_k=5)
    assert len({c[0] for c in wide.completion_ids[0]}) > 50 >= 5 >= len({c[0] for c in cut.completion_ids[0]})
    with pytest.raises(ValueError, match="min_new_tokens"):
        sample_with_settings(tiny_model, tiny_tokenizer, PROMPTS, **kw, min_new_tokens=6)
    with pytest.raises(ValueError, match="top_p"):
        sample_with_settings(tiny_model, tiny_tokenizer, PROMPTS, **kw, top_p=0.0)


def test_top_k_sampling_biases_k1_away_from_the_exact_kl(tiny_tokenizer):
    """Sampling from the top-5 of pi but scoring log pi / pi_ref: the mean k1 is not KL(pi || pi_ref).
    Would fail if the sampler ignored top_k (then both sides estimate the same KL)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        initializer_range=0.2, eos_token_id=tiny_tokenizer.eos_token_id,
                        bos_token_id=tiny_tokenizer.eos_token_id)
    reference = GPT2LMHeadModel(config).eval()
    policy = _perturbed(reference, 0.05)
    kw = {"n_per_prompt": 100, "max_new_tokens": 4, "batch_size": 200, "seed": 0}
    pad = tiny_tokenizer.pad_token_id

    def mean_se(samples, name):
        values = getattr(kl_estimates(policy, reference, *_flat(samples), batch_size=200, pad_token_id=pad),
                         name)
        return values.mean(), values.std(ddof=1) / np.sqrt(values.size)

    truth, truth_se = mean_se(sample_with_settings(policy, tiny_tokenizer, PROMPTS, **kw), "exact")
    k1, k1_se = mean_se(sample_with_settings(policy, tiny_tokenizer, PROMPTS, **kw), "k1")
    assert abs(k1 - truth) < 4 * (k1_se + truth_se)  # from pi itself: unbiased
    k1_top, k1_top_se = mean_se(sample_with_settings(policy, tiny_tokenizer, PROMPTS, **kw, top_k=5), "k1")
    assert abs(k1_top - truth) > 6 * (k1_top_se + truth_se), (k1_top, truth)


def test_min_new_tokens_forbids_eos_and_strip_eos_drops_it(tiny_model, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    boost_eos(tiny_model, eos, 4.0)
    kw = {"n_per_prompt": 8, "max_new_tokens": 6, "batch_size": 16, "seed": 0}
    free = sample_with_settings(tiny_model, tiny_tokenizer, PROMPTS, **kw)
    flat = [c for per in free.completion_ids for c in per]
    assert any(c[-1] == eos and len(c) < 6 for c in flat)
    forced = sample_with_settings(tiny_model, tiny_tokenizer, PROMPTS, **kw, min_new_tokens=6)
    assert all(len(c) == 6 and eos not in c for per in forced.completion_ids for c in per)
    stripped = sample_with_settings(tiny_model, tiny_tokenizer, PROMPTS, **kw, strip_eos=True)
    assert [c for per in stripped.completion_ids for c in per] == drop_eos(flat, eos)
    assert drop_eos([[5, eos], [eos], [5, 6], []], eos) == [[5], [], [5, 6], []]
    # An empty completion (a lone EOS, dropped) has no steps: every estimator is 0 on it.
    reference = _perturbed(tiny_model, 0.1)
    est = kl_estimates(tiny_model, reference, [[5, 6], [5, 6]], [[], [eos]], batch_size=2, pad_token_id=eos)
    assert est.n_tokens.tolist() == [0, 1] and est.k1[0] == est.k3[0] == est.exact[0] == 0.0
    assert est.exact[1] > 0
