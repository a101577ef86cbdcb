"""sampling.py: seeded, untruncated (top_k off) ancestral samples with exact left-padding."""

from __future__ import annotations

import pytest
import torch
from tiny_lms import boost_eos  # tests/ is on sys.path

from dpo_lab.logprobs import eval_mode
from dpo_lab.sampling import (
    _cut_at_eos,
    _fast_gpt2_supported,
    sample,
    sampling_config,
)

PROMPTS = ["This movie", "A", "I watched it twice; the music"]


def _kwargs(**over: object) -> dict:
    return {"n_per_prompt": 2, "max_new_tokens": 5, "batch_size": 4, "seed": 0, "progress": False, **over}


def test_same_seed_same_samples_and_rng_untouched(tiny_model, tiny_tokenizer):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sample(tiny_model, tiny_tokenizer, PROMPTS, **_kwargs())
    assert torch.equal(torch.get_rng_state(), before), "sampling must not move the caller's RNG stream"
    b = sample(tiny_model, tiny_tokenizer, PROMPTS, **_kwargs())
    c = sample(tiny_model, tiny_tokenizer, PROMPTS, **_kwargs(seed=1))
    assert a.completion_ids == b.completion_ids and a.texts == b.texts
    assert a.completion_ids != c.completion_ids
    assert len(a.texts) == len(PROMPTS) and all(len(per) == 2 for per in a.texts)
    assert all(1 <= len(ids) <= 5 for per in a.completion_ids for ids in per)


def test_texts_decode_the_sampled_ids(tiny_model, tiny_tokenizer):
    s = sample(tiny_model, tiny_tokenizer, PROMPTS, **_kwargs())
    for per_ids, per_text in zip(s.completion_ids, s.texts, strict=True):
        for ids, text in zip(per_ids, per_text, strict=True):
            assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert s.prompt_ids[0] == tiny_tokenizer("This movie", add_special_tokens=False)["input_ids"]


def test_top_k_is_off(tiny_model, tiny_tokenizer):
    """HF's default top_k=50 would allow at most 50 distinct first tokens; the random tiny model spreads
    its mass over ~300, so untruncated sampling must show many more."""
    assert sampling_config(tiny_tokenizer, 1).top_k == 0
    s = sample(tiny_model, tiny_tokenizer, ["The"], **_kwargs(n_per_prompt=400, max_new_tokens=1,
                                                               batch_size=400))
    distinct = {ids[0] for ids in s.completion_ids[0]}
    assert len(distinct) > 80


def _record_next_token_logits(model: torch.nn.Module) -> tuple[list[torch.Tensor], object]:
    captured: list[torch.Tensor] = []
    def hook(module: torch.nn.Module, inputs: object, out: object) -> None:
        captured.append(out.logits[:, -1].detach().clone())

    handle = model.register_forward_hook(hook)
    return captured, handle


@pytest.mark.parametrize("backend", ["loop", "loop_icdf", "generate"])
def test_left_padded_batch_matches_prompt_alone(tiny_model, tiny_tokenizer, backend):
    """Every generation step of every padded row (KV cache on) gives the logits of an unpadded forward
    over prompt + the tokens sampled so far; and step 0 equals sampling the prompt alone. (The hook makes
    "loop" call the model's own forward; the block loop is held to generate's tokens further below.)"""
    captured, handle = _record_next_token_logits(tiny_model)
    try:
        s = sample(tiny_model, tiny_tokenizer, PROMPTS, **_kwargs(batch_size=6, backend=backend))
        batch_steps = list(captured)
        captured.clear()
        sample(tiny_model, tiny_tokenizer, [PROMPTS[0]], **_kwargs(n_per_prompt=1, backend=backend))
        alone_first = captured[0][0]
    finally:
        handle.remove()
    assert torch.allclose(batch_steps[0][0], alone_first, atol=1e-5)
    rows = [(p, c) for p, per in zip(s.prompt_ids, s.completion_ids, strict=True) for c in per]
    assert len({len(p) for p, _ in rows}) > 1, "the batch must actually need padding"
    checked = 0
    with torch.no_grad():
        for r, (prompt, completion) in enumerate(rows):
            full = torch.tensor([prompt + completion])
            logits = tiny_model(input_ids=full).logits[0]
            for k in range(len(completion)):
                expected = logits[len(prompt) - 1 + k]
                assert torch.allclose(batch_steps[k][r], expected, atol=1e-4), (r, k)
                checked += 1
    assert checked >= len(rows)


@pytest.mark.parametrize("backend", ["loop", "generate"])
def test_stops_only_at_a_sampled_eos(tiny_model, tiny_tokenizer, backend):
    """Make EOS very likely: rows end right after their first EOS, which is kept in the ids and dropped
    from the text; rows that never sample it run the full max_new_tokens."""
    eos = tiny_tokenizer.eos_token_id
    with torch.no_grad():
        u = torch.zeros(tiny_model.config.n_embd)
        u[0] = 1.0
        tiny_model.transformer.ln_f.weight.zero_()
        tiny_model.transformer.ln_f.bias.copy_(u)
        tiny_model.transformer.wte.weight[eos] = 4.5 * u  # EOS logit 4.5, the rest ~0: p(EOS) ~ 0.23
    s = sample(tiny_model, tiny_tokenizer, PROMPTS,
               **_kwargs(n_per_prompt=8, max_new_tokens=4, backend=backend))
    flat = [c for per in s.completion_ids for c in per]
    ended = [c for c in flat if eos in c]
    assert ended and len(ended) < len(flat)
    for c in flat:
        assert c.count(eos) <= 1
        assert (c[-1] == eos) if eos in c else (len(c) == 4)
    assert "" in {t for per in s.texts for t in per}  # EOS as the first token decodes to nothing


def test_cut_at_eos():
    assert _cut_at_eos([5, 6, 0, 0, 0], 0) == [5, 6, 0]
    assert _cut_at_eos([5, 6, 7], 0) == [5, 6, 7]
    assert _cut_at_eos([5, 6, 7], None) == [5, 6, 7]


def test_eval_mode_restores_training_flag(tiny_model, tiny_tokenizer):
    tiny_model.train()
    sample(tiny_model, tiny_tokenizer, ["A"], **_kwargs(n_per_prompt=1, max_new_tokens=1))
    assert tiny_model.training
    with eval_mode(tiny_model):
        assert not tiny_model.training
    assert tiny_model.training


@pytest.mark.parametrize(("prompts", "over", "error", "match"), [
    ([""], {}, ValueError, "prompt 0 is empty"),
    ("A string", {}, TypeError, "not a single string"),
    (["A", 3], {}, TypeError, r"prompts\[1\] must be a str, got int"),
    (["A"], {"n_per_prompt": 0}, ValueError, "n_per_prompt"),
    (["A"], {"batch_size": 0}, ValueError, "batch_size"),
    (["A"], {"seed": -1}, ValueError, "seed"),
    (["A"], {"max_new_tokens": 64}, ValueError, "exceeds the model's context"),
])
def test_bad_input_is_named(tiny_model, tiny_tokenizer, prompts, over, error, match):
    with pytest.raises(error, match=match):
        sample(tiny_model, tiny_tokenizer, prompts, **_kwargs(**over))


# --- backend="loop" against HF generate ------------------------------------------------------------------

MIXED = ["This movie", "A", "I watched it twice; the music", "An excellent, moving picture with a", "The"]


def _both(model, tokenizer, prompts, **over):
    loop = sample(model, tokenizer, prompts, **_kwargs(backend="loop", **over))
    gen = sample(model, tokenizer, prompts, **_kwargs(backend="generate", **over))
    return loop, gen


@pytest.mark.parametrize(("prompts", "over"), [
    (MIXED, {"n_per_prompt": 3, "max_new_tokens": 12, "batch_size": 4}),  # padded, several batches
    (MIXED, {"n_per_prompt": 2, "max_new_tokens": 7, "batch_size": 10, "seed": 5}),  # one batch
    (["I watched it twice"], {"n_per_prompt": 5, "max_new_tokens": 9}),  # no padding: mask dropped
    (["A"], {"n_per_prompt": 3, "max_new_tokens": 4}),  # one-token prompt, no padding
])
def test_loop_gives_generates_tokens(tiny_model, tiny_tokenizer, prompts, over):
    assert _fast_gpt2_supported(tiny_model), "these cases are meant for the fast GPT-2 block loop"
    loop, gen = _both(tiny_model, tiny_tokenizer, prompts, **over)
    assert loop.completion_ids == gen.completion_ids and loop.texts == gen.texts
    assert len({len(c) for per in loop.completion_ids for c in per}) >= 1


@pytest.mark.parametrize("eos_logit", [3.0, 8.0])
def test_loop_gives_generates_tokens_with_eos_and_early_stop(tiny_model, tiny_tokenizer, eos_logit):
    """EOS inside rows (logit 3: p ~ 0.06 a step) and whole batches ending early (logit 8: p ~ 0.9):
    a batch that stops early must leave the RNG where generate leaves it, or the next batch differs."""
    eos = tiny_tokenizer.eos_token_id
    boost_eos(tiny_model, eos, eos_logit)
    loop, gen = _both(tiny_model, tiny_tokenizer, MIXED, n_per_prompt=4, max_new_tokens=10, batch_size=3)
    assert loop.completion_ids == gen.completion_ids
    flat = [c for per in loop.completion_ids for c in per]
    assert any(c[-1] == eos and len(c) < 10 for c in flat)
    if eos_logit == 8.0:  # some 3-row batch stopped before max_new_tokens
        assert any(max(len(c) for c in flat[i:i + 3]) < 10 for i in range(0, len(flat), 3))


def test_loop_through_the_models_own_forward_matches_generate(tiny_model, tiny_tokenizer):
    """With a forward hook the loop calls the model itself (HF cache), still token for token."""
    calls = []
    handle = tiny_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        loop, gen = _both(tiny_model, tiny_tokenizer, MIXED, n_per_prompt=2, max_new_tokens=6, batch_size=4)
    finally:
        handle.remove()
    assert calls, "the hooked model's forward must run"
    assert loop.completion_ids == gen.completion_ids


def test_loop_matches_generate_on_another_architecture(tiny_tokenizer):
    """The generic path (model's own forward) on a non-GPT-2 model: a tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, eos_token_id=tiny_tokenizer.eos_token_id,
                         bos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    loop, gen = _both(model, tiny_tokenizer, MIXED, n_per_prompt=2, max_new_tokens=6, batch_size=4)
    assert loop.completion_ids == gen.completion_ids


def test_inverse_cdf_draws_the_softmax_distribution(tiny_model, tiny_tokenizer):
    """backend="loop_icdf": 6,000 first tokens of one prompt against the model's exact softmax (chi-square),
    and never a token of probability zero (the CDF gives it an empty interval)."""
    from scipy.stats import chisquare

    from dpo_lab.sampling import _draw_inverse_cdf

    n = 6000
    s = sample(tiny_model, tiny_tokenizer, ["This movie"], **_kwargs(n_per_prompt=n, max_new_tokens=1,
                                                                       batch_size=n, backend="loop_icdf"))
    with torch.no_grad():
        ids = torch.tensor([s.prompt_ids[0]])
        p = torch.softmax(tiny_model(input_ids=ids).logits[0, -1].double(), -1).numpy()
    counts = torch.bincount(torch.tensor([c[0] for c in s.completion_ids[0]]), minlength=len(p)).numpy()
    order = p.argsort()[::-1]
    expected, observed = n * p[order], counts[order]
    big = expected >= 5  # tail tokens pooled into one cell so every cell expects >= 5
    exp_cells = [*expected[big], *([expected[~big].sum()] if (~big).any() else [])]
    obs_cells = [*observed[big], *([observed[~big].sum()] if (~big).any() else [])]
    assert len(exp_cells) > 100
    assert chisquare(obs_cells, exp_cells).pvalue > 1e-3
    # A heavy-tailed (Zipf) distribution, where a truncation or an off-by-one would show at once.
    torch.manual_seed(0)
    zipf = (1.0 / torch.arange(1, 301, dtype=torch.float64) ** 1.1)[torch.randperm(300)]
    zipf = (zipf / zipf.sum()).float()
    draws = torch.cat([_draw_inverse_cdf(zipf.expand(10_000, -1)) for _ in range(10)])
    expected = draws.numel() * zipf.double().numpy()
    assert expected.min() >= 5
    assert chisquare(torch.bincount(draws, minlength=300).numpy(), expected).pvalue > 1e-3
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    drawn = torch.stack([_draw_inverse_cdf(probs) for _ in range(500)])
    assert set(drawn[:, 0].tolist()) == {1, 3} and set(drawn[:, 1].tolist()) == {4}


def test_inverse_cdf_backend_keeps_the_sampling_contract(tiny_model, tiny_tokenizer):
    """Seeded, RNG untouched, EOS kept and ending its row, other tokens than "loop" (a different draw)."""
    eos = tiny_tokenizer.eos_token_id
    boost_eos(tiny_model, eos, 3.0)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a = sample(tiny_model, tiny_tokenizer, MIXED, **_kwargs(n_per_prompt=4, max_new_tokens=10,
                                                            backend="loop_icdf"))
    assert torch.equal(torch.get_rng_state(), before)
    b = sample(tiny_model, tiny_tokenizer, MIXED, **_kwargs(n_per_prompt=4, max_new_tokens=10,
                                                            backend="loop_icdf"))
    loop = sample(tiny_model, tiny_tokenizer, MIXED, **_kwargs(n_per_prompt=4, max_new_tokens=10,
                                                               backend="loop"))
    default = sample(tiny_model, tiny_tokenizer, MIXED, **_kwargs(n_per_prompt=4, max_new_tokens=10))
    assert default.completion_ids == a.completion_ids == b.completion_ids != loop.completion_ids
    flat = [c for per in a.completion_ids for c in per]
    assert any(eos in c for c in flat)
    for c in flat:
        assert c.count(eos) <= 1 and ((c[-1] == eos) if eos in c else len(c) == 10)


def test_unknown_backend_is_named(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="backend must be one of"):
        sample(tiny_model, tiny_tokenizer, ["A"], **_kwargs(backend="vllm"))
