"""Tiny GPT-2s for exact checks, shared by the evaluation, sampling and KL-estimator tests."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def tiny_lm(seed: int, vocab: int = 5) -> GPT2LMHeadModel:
    """A 1-layer GPT-2 over ``vocab`` tokens (EOS = 0), small enough to enumerate every completion."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=8, n_embd=8, n_layer=1, n_head=2, eos_token_id=0,
                        bos_token_id=0, initializer_range=0.5)
    return GPT2LMHeadModel(config).eval()


def seq_logprob(model: GPT2LMHeadModel, prompt: list[int], completion: tuple[int, ...]) -> float:
    """log pi(completion | prompt) in float64, by one forward pass and a plain sum."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + list(completion)])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(completion)))


def boost_eos(model: torch.nn.Module, eos: int, logit: float) -> None:
    """Every position then gives EOS the logit ``logit`` and ~0 to every other token."""
    with torch.no_grad():
        u = torch.zeros(model.config.n_embd)
        u[0] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(u)
        model.transformer.wte.weight[eos] = logit * u
