"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny GPT-2, built in well under a second."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

TINY_CORPUS = [
    "This movie was great, I loved the acting and the story.",
    "A terrible film. The plot was boring and the actors were awful.",
    "I watched it twice; the music is wonderful and the ending is sad.",
    "Worst movie ever, a waste of time and money.",
    "An excellent, moving picture with a brilliant cast.",
    "The director did a fine job but the script is weak.",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_CORPUS, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                      bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return wrapped


@pytest.fixture()
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tiny_tokenizer.eos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


# Tiny models on a shared 2-core machine: one thread avoids hand-off overhead that makes them ~100x slower.
torch.set_num_threads(1)
