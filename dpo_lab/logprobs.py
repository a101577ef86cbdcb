"""``log π(y|x) = Σ_t log π(y_t | x, y_<t)`` over completion tokens (Eq. 7; :func:`sequence_logprobs` is the
one routine that sums) and the exact KL between two policies. Logits at t predict token t + 1, so per-token
log-probs are ``(B, T-1)`` under ``completion_mask[:, 1:]``; logits go to fp32 before any softmax."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dpo_lab.batching import pad_rows


def check_tensor(name: str, x: object, ndim: int) -> Tensor:
    """``x``, refused unless a tensor of ``ndim`` dimensions (the error names it)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_mask(name: str, mask: object, shape: torch.Size) -> Tensor:
    """A 0/1 integer or bool mask of ``shape``, as bool."""
    mask = check_tensor(name, mask, len(shape))
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but the values have shape {tuple(shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be an integer or bool tensor of 0/1, got dtype {mask.dtype}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1")
    return mask.bool()


def _shifted_completion_mask(completion_mask: Tensor, shape: torch.Size) -> Tensor:
    """``completion_mask[:, 1:]``: the mask over next-token log-probs that selects completion tokens."""
    mask = check_mask("completion_mask", completion_mask, shape)
    if mask.shape[1] < 2:
        raise ValueError(f"sequences need at least 2 positions (a context and a token), "
                         f"got T={mask.shape[1]}")
    if bool(mask[:, 0].any()):
        # Nothing predicts position 0, so a completion token there could not be scored; silently dropping
        # it would under-count log π(y|x).
        raise ValueError("completion_mask is 1 at position 0: the first token has no context to predict it "
                         "(every completion needs at least one prompt token before it)")
    return mask[:, 1:]


class _TokenLogprobs(torch.autograd.Function):
    """``gather - logsumexp`` with a one-buffer backward (autograd's makes three): same values, a third less
    vocabulary-sized work per DPO step (bench_roofline). ``(B, S, V)`` logits, ``(B, L)`` labels, L <= S."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: Tensor, labels: Tensor) -> Tensor:
        n = labels.shape[1]
        shifted = logits[:, :n]
        labels = labels.unsqueeze(-1)
        lse = torch.logsumexp(shifted, dim=-1)
        ctx.save_for_backward(logits, labels, lse)
        return shifted.gather(-1, labels).squeeze(-1) - lse

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        logits, labels, lse = ctx.saved_tensors
        n = labels.shape[1]
        grad_logits = torch.empty_like(logits)
        grad_logits[:, n:].zero_()  # a last position predicts nothing
        body = grad_logits[:, :n]
        torch.sub(logits[:, :n], lse.unsqueeze(-1), out=body)
        body.exp_().mul_(grad.neg().unsqueeze(-1))  # d(-lse)/dx = -softmax(x)
        body.scatter_add_(-1, labels, grad.unsqueeze(-1))  # d(x_label)/dx = one-hot
        return grad_logits, None


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """``log p(x_{t+1} | x_{<=t})`` for every position: ``(B, T, V), (B, T) -> (B, T-1)``, in fp32."""
    logits = check_tensor("logits", logits, 3)
    input_ids = check_tensor("input_ids", input_ids, 2)
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} "
                         "disagree on (B, T)")
    if input_ids.is_floating_point():
        raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    # gather - logsumexp == log_softmax(...).gather(...) without materialising a second (B, T, V) tensor.
    return _TokenLogprobs.apply(logits.float(), input_ids[:, 1:])  # fp32 before the softmax


def sequence_logprobs(token_logps: Tensor, mask: Tensor, *, average: bool = False) -> Tensor:
    """``log π(y|x)``, ``(B, T-1) -> (B,)``: the sum over masked tokens (Eq. 7), or with ``average`` their
    mean (TRL's IPO, SimPO: β then scales a per-token log-ratio, not comparable with Eq. 7's)."""
    mask = check_mask("mask", mask, check_tensor("token_logps", token_logps, 2).shape)
    counts = mask.sum(-1)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"rows {rows} have no completion tokens: "
                         "log π(y|x) of an empty completion is undefined")
    # where (not multiply): a NaN/inf at a masked position must not leak into the sum.
    total = torch.where(mask, token_logps, 0.0).sum(-1)
    return total / counts if average else total


# ------------------------------------------------------------------------------------------ running a model
def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions over real tokens only, so left and right padding give the same log-probs (GPT-2 would
    otherwise start a left-padded row at position n_pad)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def has_hooks(model: nn.Module) -> bool:
    """Forward hooks (a test's logit recorder, a profiler) expect the model's own forward to run."""
    from torch.nn.modules import module as torch_module

    global_hooks = (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks)
    return any(g for g in global_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch dropout off for the block and restore the caller's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_inputs(input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor | bool]:
    """Checked keyword arguments of a causal LM's (or its body's) forward; left or right padding alike."""
    input_ids = check_tensor("input_ids", input_ids, 2)
    mask = check_mask("attention_mask", attention_mask, input_ids.shape)
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("attention_mask has a row with no real tokens")
    return {"input_ids": input_ids, "attention_mask": mask.long(),
            "position_ids": position_ids_from_mask(mask), "use_cache": False}


def forward_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Run a causal LM once and return its ``(B, T, V)`` logits; left or right padding, same values."""
    return model(**_model_inputs(input_ids, attention_mask)).logits


def completion_token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                              completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token ``log π(y_t | x, y_<t)`` (0 off the completion) and the shifted mask, both ``(B, T-1)``.
    On GPT-2 without hooks the LM head runs only where a completion token is predicted."""
    inputs = _model_inputs(input_ids, attention_mask)
    if bool((completion_mask.bool() & ~attention_mask.bool()).any()):
        raise ValueError("completion_mask marks positions that attention_mask says are padding")
    mask = _shifted_completion_mask(completion_mask, input_ids.shape)
    body, head = getattr(model, "transformer", None), getattr(model, "lm_head", None)
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Module) or has_hooks(model):
        token_logps = token_logprobs(model(**inputs).logits, input_ids)  # hooks expect the model's forward
        return torch.where(mask, token_logps, 0.0), mask.long()
    hidden = body(**inputs).last_hidden_state[:, :-1][mask]  # (N, d): rows that predict a completion token
    picked = _TokenLogprobs.apply(head(hidden).float()[None], input_ids[:, 1:][mask][None])[0]
    zeros = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
    return zeros.masked_scatter(mask, picked), mask.long()


def concatenated_forward(model: nn.Module, batch: Mapping[str, Tensor], *,
                         average: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``log π(y_k|x)`` ``(B, K)`` of a ``PreferenceCollator`` batch from ONE forward pass (column k: the
    k-th completion; chosen, rejected), with per-token log-probs and masks ``(B, K, T-1)``."""
    token_logps, mask = completion_token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                                  batch["completion_mask"])
    rows = batch["rows"]
    return sequence_logprobs(token_logps, mask, average=average)[rows], token_logps[rows], mask[rows]


@torch.no_grad()
def batch_logits(models: Sequence[nn.Module], prompt_ids: Sequence[Sequence[int]],
                 completion_ids: Sequence[Sequence[int]], *, batch_size: int,
                 pad_token_id: int = 0) -> Iterator[tuple[list[Tensor], Tensor, Tensor]]:
    """Per batch of exact ``prompt + completion`` ids: ``(each model's logits, input_ids, completion_mask)``,
    in eval mode, all on the first model's device (full-vocabulary logits are large)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    for i, p in enumerate(prompt_ids):
        if not p:
            raise ValueError(f"row {i}: the prompt needs at least one token")
    dev = model_device(models[0])
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(eval_mode(model))
        for start in range(0, len(prompt_ids), batch_size):
            batch = pad_rows([{"input_ids": [*p, *c], "completion_mask": [0] * len(p) + [1] * len(c)}
                              for p, c in zip(prompt_ids[start:start + batch_size],
                                              completion_ids[start:start + batch_size], strict=True)],
                             pad_token_id)
            logits = [forward_logits(model, batch["input_ids"].to(model_device(model)),
                                     batch["attention_mask"].to(model_device(model))).to(dev)
                      for model in models]
            yield logits, batch["input_ids"].to(dev), batch["completion_mask"].to(dev)


@torch.no_grad()
def completion_logprobs(model: nn.Module, prompt_ids: Sequence[Sequence[int]],
                        completion_ids: Sequence[Sequence[Sequence[int]]], *, batch_size: int,
                        pad_token_id: int = 0) -> np.ndarray:
    """``log π(y|x)`` of each prompt's K completions (token ids as ``sampling.sample`` gives), ``(P, K)``."""
    if len({len(per) for per in completion_ids}) > 1:
        raise ValueError("every prompt needs the same number of completions")
    flat_prompts = [p for p, per in zip(prompt_ids, completion_ids, strict=True) for _ in per]
    flat = [c for per in completion_ids for c in per]
    out = [sequence_logprobs(token_logprobs(logits, ids), mask[:, 1:]).double().cpu()
           for (logits,), ids, mask in batch_logits([model], flat_prompts, flat, batch_size=batch_size,
                                                    pad_token_id=pad_token_id)]
    return torch.cat(out).numpy().reshape(len(completion_ids), -1)


# ------------------------------------------------------------------------------------------------------ KL
def sequence_kl(policy_logits: Tensor, ref_logits: Tensor, completion_mask: Tensor) -> Tensor:
    """Sequence KL (paper footnote 3): ``Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t))`` over completion steps,
    exact over the vocabulary in fp32, each step clamped at 0 against rounding."""
    policy_logits = check_tensor("policy_logits", policy_logits, 3)
    ref_logits = check_tensor("ref_logits", ref_logits, 3)
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(f"policy_logits {tuple(policy_logits.shape)} and ref_logits "
                         f"{tuple(ref_logits.shape)} must have the same shape")
    mask = _shifted_completion_mask(completion_mask, policy_logits.shape[:2])
    logp = torch.log_softmax(policy_logits[:, :-1].float(), dim=-1)
    logq = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)
    return torch.where(mask, kl, 0.0).sum(-1)
