"""Log-probs count completion tokens only, padding side does not matter, and the KL is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from dpo_lab.batching import PreferenceCollator, pad_rows, tokenize_completion
from dpo_lab.logprobs import (
    completion_token_logprobs,
    concatenated_forward,
    forward_logits,
    sequence_kl,
    sequence_logprobs,
    token_logprobs,
)

PAIRS = [
    ("This movie", " was great, I loved the acting."),
    ("A terrible film.", " The plot"),
    ("I", " watched it twice; the music is wonderful and the ending is sad."),
]


def _rows(tokenizer: PreTrainedTokenizerFast) -> list[dict[str, list[int]]]:
    return [tokenize_completion(tokenizer, p, c, max_length=48) for p, c in PAIRS]


def _from_logits(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, **kw: bool) -> torch.Tensor:
    """log pi(y|x) from the logits: token log-probs summed over the shifted completion mask."""
    return sequence_logprobs(token_logprobs(logits, ids), mask[:, 1:], **kw)


def _model_logps(model: GPT2LMHeadModel, **batch: torch.Tensor) -> torch.Tensor:
    return sequence_logprobs(*completion_token_logprobs(model, **batch))


def _random_batch(seed: int, b: int = 3, t: int = 9, v: int = 11) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.long)
    mask[0, 3:7] = 1
    mask[1, 2:9] = 1
    mask[2, 5:6] = 1
    return logits, ids, mask


def test_token_logprobs_match_hand_loop() -> None:
    logits, ids, _ = _random_batch(0)
    got = token_logprobs(logits, ids)
    assert got.shape == (3, 8) and got.dtype == torch.float32
    for b in range(3):
        for t in range(8):
            expected = torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]]
            assert float(got[b, t]) == pytest.approx(float(expected), abs=1e-5)


def test_token_logprobs_upcast_half_precision() -> None:
    logits, ids, _ = _random_batch(1)
    got = token_logprobs((logits * 30).to(torch.bfloat16), ids)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()


def test_sequence_logprobs_ignore_prompt_and_padding_logits() -> None:
    logits, ids, mask = _random_batch(2)
    base = _from_logits(logits, ids, mask)
    # Logits at position t predict token t+1; only those predicting completion tokens may matter.
    predicts_completion = F.pad(mask[:, 1:], (0, 1)).bool()
    noisy = logits.clone()
    noisy[~predicts_completion] = torch.randn_like(noisy[~predicts_completion]) * 100
    torch.testing.assert_close(_from_logits(noisy, ids, mask), base)
    # Token ids serve only as labels here: relabelling prompt and padding positions changes nothing either.
    relabelled = torch.where(mask.bool(), ids, (ids + 1) % 11)
    torch.testing.assert_close(_from_logits(logits, relabelled, mask), base)
    # ...but changing a logit that predicts a completion token does change it (the test can fail).
    poked = logits.clone()
    poked[0, 3, ids[0, 4]] += 5.0
    assert not torch.allclose(_from_logits(poked, ids, mask), base)


def test_sum_vs_average() -> None:
    logits, ids, mask = _random_batch(3)
    total = _from_logits(logits, ids, mask)
    mean = _from_logits(logits, ids, mask, average=True)
    counts = mask[:, 1:].sum(-1)
    torch.testing.assert_close(mean * counts, total)
    per_token = token_logprobs(logits, ids)
    for b in range(3):
        selected = [float(per_token[b, t]) for t in range(8) if mask[b, t + 1]]
        assert float(total[b]) == pytest.approx(sum(selected), abs=1e-5)


def test_model_logprobs_equal_for_left_and_right_padding(tiny_model: GPT2LMHeadModel,
                                                          tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    rows = _rows(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    right, left = pad_rows(rows, pad, side="right"), pad_rows(rows, pad, side="left")
    assert not torch.equal(right["input_ids"], left["input_ids"])  # the paddings really differ
    with torch.no_grad():
        lp_right = _model_logps(tiny_model, **right)
        lp_left = _model_logps(tiny_model, **left)
        singles = torch.cat([_model_logps(tiny_model, **pad_rows([row], pad)) for row in rows])
        # Without position ids from the mask, left padding shifts positions: the fix is what makes them equal.
        naive = tiny_model(input_ids=left["input_ids"], attention_mask=left["attention_mask"]).logits
        lp_naive = _from_logits(naive, left["input_ids"], left["completion_mask"])
    torch.testing.assert_close(lp_left, lp_right, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lp_right, singles, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(lp_naive, lp_right, atol=1e-3)


def test_padding_token_ids_do_not_matter(tiny_model: GPT2LMHeadModel,
                                         tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    batch = pad_rows(_rows(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    other = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"], 7))
    assert not torch.equal(other["input_ids"], batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(_model_logps(tiny_model, **other),
                                   _model_logps(tiny_model, **batch))


def test_completion_token_logprobs_sum_to_sequence(tiny_model: GPT2LMHeadModel,
                                                   tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    batch = pad_rows(_rows(tiny_tokenizer), tiny_tokenizer.pad_token_id, side="left")
    with torch.no_grad():
        token_logps, mask = completion_token_logprobs(tiny_model, **batch)
        total = _model_logps(tiny_model, **batch)
    torch.testing.assert_close(mask, batch["completion_mask"][:, 1:])
    assert float(token_logps[~mask.bool()].abs().max()) == 0.0
    torch.testing.assert_close(token_logps.sum(-1), total)


def test_concatenated_equals_separate_calls(tiny_model: GPT2LMHeadModel,
                                            tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """One forward over the stacked rows gives each completion's log pi(y|x), as a batch of its own would;
    pairs are columns (chosen, rejected), rankings their K completions, best first."""
    pairs = [{"prompt": p, "chosen": c, "rejected": c[: len(c) // 2] + " boring"} for p, c in PAIRS]
    rankings = [{"prompt": p, "completions": [c, " no", c[:5] + " x", " the plot"]} for p, c in PAIRS]
    for examples, texts in ((pairs, [[e["chosen"], e["rejected"]] for e in pairs]),
                            (rankings, [e["completions"] for e in rankings])):
        batch = PreferenceCollator(tiny_tokenizer, max_length=48)(examples)
        assert batch["rows"].shape == (3, len(texts[0]))
        assert batch["input_ids"].shape[0] == batch["rows"].numel()
        for average in (False, True):
            with torch.no_grad():
                logps, token_logps, mask = concatenated_forward(tiny_model, batch, average=average)
                for k in range(len(texts[0])):
                    alone = pad_rows([tokenize_completion(tiny_tokenizer, e["prompt"], t[k], max_length=48)
                                      for e, t in zip(examples, texts, strict=True)],
                                     tiny_tokenizer.pad_token_id)
                    expected = sequence_logprobs(*completion_token_logprobs(tiny_model, **alone),
                                                 average=average)
                    torch.testing.assert_close(logps[:, k], expected, rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(sequence_logprobs(token_logps.flatten(0, 1), mask.flatten(0, 1),
                                                         average=average), logps.flatten())
    # Pairs keep the official DPO layout: every chosen row, then every rejected row.
    assert PreferenceCollator(tiny_tokenizer, 48)(pairs)["rows"].tolist() == [[0, 3], [1, 4], [2, 5]]


def test_concatenated_forward_backpropagates(tiny_model: GPT2LMHeadModel,
                                             tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    examples = [{"prompt": p, "chosen": c, "rejected": " no"} for p, c in PAIRS]
    logps = concatenated_forward(tiny_model, PreferenceCollator(tiny_tokenizer, 48)(examples))[0]
    (logps[:, 0] - logps[:, 1]).sum().backward()
    grad = tiny_model.transformer.wte.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_sequence_kl_matches_kl_div_and_ignores_logit_shifts() -> None:
    g = torch.Generator().manual_seed(4)
    p, q = torch.randn(2, 6, 13, generator=g), torch.randn(2, 6, 13, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]] * 2)  # every position after the first is a completion token
    kl = sequence_kl(p, q, mask)
    assert kl.shape == (2,) and (kl > 0).all()
    reference = F.kl_div(torch.log_softmax(q[:, :-1], -1), torch.log_softmax(p[:, :-1], -1), log_target=True,
                         reduction="none").sum((-2, -1))
    torch.testing.assert_close(kl, reference)
    # Adding a constant to all logits leaves the distribution, hence the KL, unchanged.
    torch.testing.assert_close(sequence_kl(p + 3.0, q - 1.0, mask), kl, rtol=1e-4, atol=1e-5)


def test_sequence_kl_equals_hand_loop() -> None:
    logits, ids, mask = _random_batch(5)
    ref = torch.randn_like(logits)
    got = sequence_kl(logits, ref, mask)
    for b in range(3):
        expected = 0.0
        for t in range(logits.shape[1] - 1):
            if mask[b, t + 1]:
                p = torch.softmax(logits[b, t], -1)
                expected += float((p * (torch.log(p) - torch.log_softmax(ref[b, t], -1))).sum())
        assert float(got[b]) == pytest.approx(expected, rel=1e-5)
    assert float(sequence_kl(logits, logits.clone(), mask).abs().max()) == 0.0


def test_bad_inputs_raise_clear_errors(tiny_model: GPT2LMHeadModel) -> None:
    logits, ids, mask = _random_batch(6)
    with pytest.raises(ValueError, match="disagree on"):
        token_logprobs(logits, ids[:, :-1])
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        token_logprobs(logits, ids.float())
    with pytest.raises(ValueError, match="logits must have 3 dimensions"):
        token_logprobs(logits[0], ids)
    token_logps = token_logprobs(logits, ids)
    with pytest.raises(ValueError, match="mask has shape"):
        sequence_logprobs(token_logps, mask[:, 2:])
    with pytest.raises(ValueError, match="only 0 and 1"):
        sequence_logprobs(token_logps, mask[:, 1:] * 2)
    with pytest.raises(TypeError, match="integer or bool"):
        sequence_logprobs(token_logps, mask[:, 1:].float())
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have no completion tokens"):
        sequence_logprobs(token_logps, empty[:, 1:])
    first = mask.clone()
    first[0, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        sequence_kl(logits, logits, first)
    with pytest.raises(ValueError, match="same shape"):
        sequence_kl(logits, logits[..., :-1], mask)
    attention = torch.ones_like(ids)
    with pytest.raises(ValueError, match="no real tokens"):
        forward_logits(tiny_model, ids, torch.zeros_like(ids))
    with pytest.raises(ValueError, match="position 0"):
        completion_token_logprobs(tiny_model, ids, attention, first)
    padded = attention.clone()
    padded[0, 5] = 0
    with pytest.raises(ValueError, match="attention_mask says are padding"):
        completion_token_logprobs(tiny_model, ids, padded, mask)
    with pytest.raises(KeyError, match="rows"):
        concatenated_forward(tiny_model, {"input_ids": ids, "attention_mask": attention,
                                          "completion_mask": mask})


def test_token_logprobs_backward_matches_autograd() -> None:
    """The one-buffer backward of token_logprobs equals autograd's through log_softmax + gather."""
    from dpo_lab.logprobs import _TokenLogprobs

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = torch.randint(0, 7, (3, 5), generator=gen)
    assert torch.autograd.gradcheck(lambda x: _TokenLogprobs.apply(x, ids[:, 1:]), (logits,))

    x32 = logits.detach().float().requires_grad_()
    weights = torch.randn(3, 4, generator=gen)
    (token_logprobs(x32, ids) * weights).sum().backward()
    plain = logits.detach().float().requires_grad_()
    reference = torch.log_softmax(plain[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (reference * weights).sum().backward()
    torch.testing.assert_close(x32.grad, plain.grad)
    assert x32.grad[:, -1].abs().max() == 0  # the last position predicts nothing


@pytest.mark.parametrize("side", ["left", "right"])
def test_lm_head_at_completion_positions_only_equals_the_full_logits(tiny_model: GPT2LMHeadModel,
                                                                      tiny_tokenizer: PreTrainedTokenizerFast,
                                                                      side: str) -> None:
    """completion_token_logprobs' head-skipping path (GPT-2: body, then the LM head at completion-predicting
    positions) gives the full-logits path's values and parameter gradients to float rounding."""
    model = tiny_model.train()  # dropout is 0.1: the two paths must draw the same masks
    batch = pad_rows(_rows(tiny_tokenizer), tiny_tokenizer.pad_token_id, side=side)
    weights = torch.randn(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1)

    def run(hooked: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        handle = model.register_forward_hook(lambda *_: None) if hooked else None  # hooks: the full path
        torch.manual_seed(0)
        token_logps, mask = completion_token_logprobs(model, **batch)
        if handle is not None:
            handle.remove()
        (token_logps * weights).sum().backward()
        torch.testing.assert_close(mask, batch["completion_mask"][:, 1:])
        assert float(token_logps.detach()[~mask.bool()].abs().max()) == 0.0
        return token_logps.detach(), [p.grad.clone() for p in model.parameters()]

    (full, full_grads), (skip, skip_grads) = run(hooked=True), run(hooked=False)
    torch.testing.assert_close(skip, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(skip_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model.eval()
