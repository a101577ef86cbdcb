"""sampling.py: seeded, untruncated (top_k off) ancestral samples with exact left-padding."""

from __future__ import annotations

import pytest
import torch

from dpo_lab.sampling import _cut_at_eos, eval_mode, left_pad, sample, sample_completions, sampling_config

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
    assert sample_completions(tiny_model, tiny_tokenizer, PROMPTS, **_kwargs()) == a.texts


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


def test_left_padded_batch_matches_prompt_alone(tiny_model, tiny_tokenizer):
    """Every generation step of every padded row (KV cache on) gives the logits of an unpadded forward
    over prompt + the tokens sampled so far; and step 0 equals sampling the prompt alone."""
    captured, handle = _record_next_token_logits(tiny_model)
    try:
        s = sample(tiny_model, tiny_tokenizer, PROMPTS, **_kwargs(batch_size=6))
        batch_steps = list(captured)
        captured.clear()
        sample(tiny_model, tiny_tokenizer, [PROMPTS[0]], **_kwargs(n_per_prompt=1))
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


def test_stops_only_at_a_sampled_eos(tiny_model, tiny_tokenizer):
    """Make EOS very likely: rows end right after their first EOS, which is kept in the ids and dropped
    from the text; rows that never sample it run the full max_new_tokens."""
    eos = tiny_tokenizer.eos_token_id
    with torch.no_grad():
        u = torch.zeros(tiny_model.config.n_embd)
        u[0] = 1.0
        tiny_model.transformer.ln_f.weight.zero_()
        tiny_model.transformer.ln_f.bias.copy_(u)
        tiny_model.transformer.wte.weight[eos] = 4.5 * u  # EOS logit 4.5, the rest ~0: p(EOS) ~ 0.23
    s = sample(tiny_model, tiny_tokenizer, PROMPTS, **_kwargs(n_per_prompt=8, max_new_tokens=4))
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


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


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
    (["A", 3], {}, TypeError, "prompt 1 is int"),
    (["A"], {"n_per_prompt": 0}, ValueError, "n_per_prompt"),
    (["A"], {"batch_size": 0}, ValueError, "batch_size"),
    (["A"], {"seed": -1}, ValueError, "seed"),
    (["A"], {"max_new_tokens": 64}, ValueError, "exceeds the model's context"),
])
def test_bad_input_is_named(tiny_model, tiny_tokenizer, prompts, over, error, match):
    with pytest.raises(error, match=match):
        sample(tiny_model, tiny_tokenizer, prompts, **_kwargs(**over))
