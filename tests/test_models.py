"""Tokenizer training, the GPT-2 policy, its sampling defaults, SFT and safe save/load round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import datasets
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from dpo_lab.data import load_imdb
from dpo_lab.loop import warmup_then_cosine
from dpo_lab.models import (
    EOS,
    build_policy,
    encode_reviews,
    load_hub_policy,
    train_sft,
    train_tokenizer,
)
from dpo_lab.presets import PolicyConfig
from dpo_lab.run import load_policy, save_policy

TINY = PolicyConfig(n_layer=2, n_head=2, n_embd=32, n_positions=48, sft_steps=30, sft_batch_size=8,
                    sft_lr=5e-3, sft_warmup_steps=3)


@pytest.fixture(scope="module")
def reviews() -> tuple[list[str], list[str]]:
    """300 train and 40 held-out IMDb reviews, cut to 400 characters (only the first 48 tokens are used)."""
    imdb: datasets.DatasetDict = load_imdb("offline")
    return [t[:400] for t in imdb["train"]["text"][:300]], [t[:400] for t in imdb["test"]["text"][:40]]


@pytest.fixture(scope="module")
def tokenizer(reviews: tuple[list[str], list[str]]) -> PreTrainedTokenizerFast:
    return train_tokenizer(reviews[0], vocab_size=512)


def _sequence_logps(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.log_softmax(logits.double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


def test_tokenizer_is_byte_level_deterministic_and_eos_everywhere(reviews, tokenizer) -> None:
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == EOS
    assert tokenizer.unk_token is None
    again = train_tokenizer(reviews[0], vocab_size=512)
    assert again.get_vocab() == tokenizer.get_vocab()
    text = "Ünïcödé — never seen 🎬 in training!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # bytes cover every string: nothing is unknown
    assert tokenizer(EOS, add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]
    # trained merges compress real text well below one token per byte
    sample = reviews[1][0]
    assert len(tokenizer(sample)["input_ids"]) < 0.6 * len(sample.encode())


def test_tokenizer_bad_arguments() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(TypeError, match="must be a str"):
        train_tokenizer(["ok", None], vocab_size=300)  # type: ignore[list-item]


def test_build_policy_shapes_dropout_and_seed(tokenizer) -> None:
    model = build_policy(tokenizer, TINY, seed=0)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size) == (2, 2, 32, 48, 512)
    assert cfg.eos_token_id == cfg.pad_token_id == tokenizer.eos_token_id
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert not model.training
    same, other = build_policy(tokenizer, TINY, seed=0), build_policy(tokenizer, TINY, seed=1)
    w = model.transformer.wte.weight
    assert torch.equal(w, same.transformer.wte.weight) and not torch.equal(w, other.transformer.wte.weight)
    with pytest.raises(ValueError, match="divisible"):
        build_policy(tokenizer, dataclasses.replace(TINY, n_embd=33))


def test_generation_samples_the_full_distribution(tokenizer) -> None:
    model = build_policy(tokenizer, TINY, seed=0)
    gen = model.generation_config
    assert (gen.do_sample, gen.top_k, gen.top_p, gen.temperature) == (True, 0, 1.0, 1.0)
    assert gen.pad_token_id == tokenizer.eos_token_id
    # An untrained model is near uniform over 512 tokens: 3000 one-token samples from one prompt hit far
    # more than the 50 distinct tokens that HF's default top_k=50 would allow.
    torch.manual_seed(0)
    prompt = torch.full((3000, 2), tokenizer.eos_token_id)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1)
    assert len(set(out[:, -1].tolist())) > 200


def test_encode_reviews_appends_eos_and_truncates(tokenizer) -> None:
    ids, lengths = encode_reviews(tokenizer, ["Good film.", "word " * 100], max_length=16)
    n = len(tokenizer("Good film.", add_special_tokens=False)["input_ids"])
    assert lengths.tolist() == [n + 1, 16]
    assert ids[0, n].item() == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in ids[1].tolist()  # a cut review does not end


def test_lr_schedule_warms_up_then_decays() -> None:
    lrs = [warmup_then_cosine(s, lr=1.0, warmup=10, total=100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_sft_loss_falls_and_is_deterministic(reviews, tokenizer) -> None:
    train, held_out = reviews
    model = build_policy(tokenizer, TINY, seed=0)
    result = train_sft(model, tokenizer, train, TINY, seed=0, held_out_texts=held_out, progress=False)
    losses = result["losses"]
    assert len(losses) == TINY.sft_steps == len(result["lrs"])
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert result["held_out_loss"] < result["held_out_loss_init"] - 0.5
    assert result["held_out_ppl"] == pytest.approx(torch.tensor(result["held_out_loss"]).exp().item())
    assert not model.training

    twin = build_policy(tokenizer, TINY, seed=0)
    again = train_sft(twin, tokenizer, train, TINY, seed=0, progress=False)
    assert again["losses"] == losses
    assert torch.equal(model.transformer.wte.weight, twin.transformer.wte.weight)


def test_sft_refuses_a_context_longer_than_the_model(reviews, tokenizer) -> None:
    config = dataclasses.replace(TINY, sft_steps=3)
    a = build_policy(tokenizer, config, seed=0)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        too_long = dataclasses.replace(config, n_positions=64)
        train_sft(a, tokenizer, reviews[0], too_long, seed=0, progress=False)


def test_save_load_round_trip_gives_identical_logprobs(tmp_path: Path, reviews, tokenizer) -> None:
    model = build_policy(tokenizer, TINY, seed=3)
    path = save_policy(model, tokenizer, tmp_path / "policy")
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    loaded, loaded_tok = load_policy(path)
    ids = torch.tensor([tokenizer(reviews[1][0], add_special_tokens=False)["input_ids"][:40]])
    assert torch.equal(_sequence_logps(model, ids), _sequence_logps(loaded, ids))
    assert loaded_tok.get_vocab() == tokenizer.get_vocab() and loaded_tok.pad_token == EOS
    assert loaded.generation_config.top_k == 0 and loaded.generation_config.do_sample
    with pytest.raises(FileNotFoundError, match="no saved policy"):
        load_policy(tmp_path / "nowhere")


def test_hub_policy_path_via_local_checkpoint(tmp_path: Path, tiny_tokenizer) -> None:
    """A plain save_pretrained GPT-2 (dropout on, no pad token, HF's default generation settings), loaded as
    the paper preset loads gpt2-large, then fine-tuned by the same train_sft."""
    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token=EOS)
    assert tok.pad_token is None
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=1, n_head=2)
    hub_model = GPT2LMHeadModel(config)
    hub_model.save_pretrained(tmp_path / "gpt2-tiny")
    tok.save_pretrained(tmp_path / "gpt2-tiny")

    model, loaded_tok = load_hub_policy(str(tmp_path / "gpt2-tiny"))
    assert loaded_tok.pad_token == EOS and model.config.pad_token_id == loaded_tok.eos_token_id
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.generation_config.top_k == 0
    ids = torch.tensor([loaded_tok("A great movie.", add_special_tokens=False)["input_ids"]])
    assert torch.equal(_sequence_logps(model, ids), _sequence_logps(hub_model.eval(), ids))

    config = PolicyConfig(source="hub", n_positions=32, sft_steps=5, sft_batch_size=4, sft_lr=1e-2,
                          sft_warmup_steps=1)
    texts = ["This movie was great, I loved the acting.", "A terrible film, the plot was boring."] * 4
    result = train_sft(model, loaded_tok, texts, config, seed=0, progress=False)
    assert result["losses"][-1] < result["losses"][0]
