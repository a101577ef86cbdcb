"""PPO on the KL-constrained reward objective (paper Eq. 3), as Ziegler et al. (2019): the paper's "PPO"
with r_phi, "PPO-GT" with r*:  max_pi E_{x, y~pi}[r(x, y)] - beta KL(pi(y|x) || pi_ref(y|x))  (Eq. 3).
The value head is a linear layer on the policy's last hidden states: one forward gives log-probs and values,
half the compute of a separate critic (``vf_coef = 0.1`` keeps its pull on the backbone small).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpo_lab.batching import pad_rows
from dpo_lab.logprobs import forward_logits, position_ids_from_mask, token_logprobs
from dpo_lab.loop import TrainLog, batch_indices, is_due, optimizer_step
from dpo_lab.presets import PPOConfig
from dpo_lab.sampling import sample
from dpo_lab.seed import content_hash, seed_everything

# r_phi (reward_model.LearnedReward) or r* (rewards.RewardModel): full texts -> one score each.
ScoreFn = Callable[[Sequence[str]], np.ndarray]


# ------------------------------------------------------------------------------------------ KL control
class AdaptiveKLController:
    """Ziegler et al. (2019), eq. 2:  e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta (1 + e n / horizon),
    n the samples the KL was measured on (beta's speed then does not depend on the batch size).
    ``target=None`` keeps beta fixed."""

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int = 1) -> None:
        if not (init_kl_coef >= 0 and horizon > 0 and (target is None or init_kl_coef > 0 and target > 0)):
            raise ValueError(f"need init_kl_coef >= 0 (> 0 with a target), target > 0 or None and horizon "
                             f"> 0; got {init_kl_coef}, {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), target, int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))  # proportional error, clipped
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


@dataclass
class RunningMoments:
    """Mean and std of every score seen (Chan et al.'s exact parallel update). Standardising with them puts
    r* (a probability) and r_phi (a logit) on one scale, so one kl coefficient and lr suit both."""

    mean: float = 0.0
    var: float = 1.0
    count: int = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size == 0:
            return
        batch_mean, batch_var, n = float(x.mean()), float(x.var()), x.size
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count > 1 else 1.0

    def standardize(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / max(self.std, 1e-8)


# ------------------------------------------------------------------------------------- pure PPO pieces
def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(x: Tensor, mask: Tensor) -> Tensor:
    """(x - mean) / std over the masked entries (zeros elsewhere): advantage whitening."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + 1e-8), 0.0)


def kl_penalized_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         kl_coef: float) -> Tensor:
    """Per-token rewards ``(B, T)``: -beta (log pi - log pi_ref) on every completion token, plus the
    sequence score on each row's last completion token (the reward of Eq. 3, Ziegler et al.)."""
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and "
                         f"mask {tuple(mask.shape)} must have the same shape")
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must be (B,) = ({logprobs.shape[0]},), got {tuple(scores.shape)}")
    mask = mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("every row needs at least one completion token to put its score on")
    rewards = torch.where(mask, -kl_coef * (logprobs - ref_logprobs), 0.0)  # r_t = -beta log(pi/pi_ref)
    columns = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, columns, -1).max(-1).values  # each row's last completion token
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards.dtype)  # + r(x, y)
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over each row's contiguous masked steps, all ``(B, T)``: delta_t = r_t + gamma V_{t+1} - V_t (V = 0
    after the last step), A_t = delta_t + gamma lam A_{t+1}, returns R_t = A_t + V_t; both 0 off the mask."""
    if not (rewards.shape == values.shape == mask.shape) or rewards.ndim != 2:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must be the same (B, T) shape")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    m = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m[:, t]
        # Outside the completion (padding after it, prompt before it) carry nothing to the step before.
        next_value = values[:, t] * m[:, t]
        next_advantage = advantage * m[:, t]
    returns = (advantages + values) * m
    return advantages, returns


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                cliprange: float) -> tuple[Tensor, Tensor]:
    """Clipped surrogate (Schulman et al. 2017): mean over tokens of max(-A ratio, -A clip(ratio, 1 +- eps)).
    Returns ``(loss, clipfrac)``, the share of tokens where the clip binds (zero gradient there)."""
    ratio = torch.exp(logprobs - old_logprobs)  # pi_theta(y_t|.) / pi_old(y_t|.)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)  # pessimistic bound
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               cliprange_value: float) -> tuple[Tensor, Tensor]:
    """Clipped value loss: 0.5 E max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2): (loss, clipfrac)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), mask)
    return loss, clipfrac


# ------------------------------------------------------------------------------- policy + value head
class PolicyWithValueHead(nn.Module):
    """A causal LM and a linear value head on its last hidden states (shared backbone; see module doc)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        hidden = int(getattr(policy.config, "n_embd", None) or policy.config.hidden_size)
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no arbitrary baseline in step 1
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits (B,T,V), token log-probs (B,T-1), values (B,T-1))``; ``values[:, t]`` is V of the state
        whose logits predict token ``t + 1``."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask.long(),
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                          output_hidden_states=True)
        logits = out.logits
        values = self.value_head(out.hidden_states[-1].float()).squeeze(-1)[:, :-1]
        return logits, token_logprobs(logits, input_ids), values


# ------------------------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """One batch of samples and everything PPO needs about them, all ``(B, T-1)`` but scores/texts."""

    input_ids: Tensor
    attention_mask: Tensor
    mask: Tensor  # shifted completion mask: which next-token positions are completion tokens
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    scores: Tensor  # raw r(x, y)
    texts: list[str]
    entropy: float  # mean next-token entropy of the policy that sampled, over completion tokens


def _rollout(model: PolicyWithValueHead, reference: nn.Module, tokenizer: PreTrainedTokenizerBase,
             prompts: Sequence[str], score_fn: ScoreFn, *, max_new_tokens: int, seed: int) -> Rollout:
    device = next(model.parameters()).device
    samples = sample(model.policy, tokenizer, prompts, n_per_prompt=1, max_new_tokens=max_new_tokens,
                     batch_size=len(prompts), seed=seed, progress=False)
    rows = [{"input_ids": p + c[0], "completion_mask": [0] * len(p) + [1] * len(c[0])}
            for p, c in zip(samples.prompt_ids, samples.completion_ids, strict=True)]
    batch = {k: v.to(device) for k, v in pad_rows(rows, int(tokenizer.pad_token_id)).items()}
    texts = [p + c[0] for p, c in zip(samples.prompts, samples.texts, strict=True)]
    scores = np.asarray(score_fn(texts), dtype=np.float64).reshape(-1)
    if scores.shape != (len(texts),) or not np.isfinite(scores).all():
        raise ValueError(f"score_fn must return {len(texts)} finite scores, got shape {scores.shape}")
    with torch.no_grad():
        logits, logprobs, values = model(batch["input_ids"], batch["attention_mask"])
        mask = batch["completion_mask"][:, 1:].bool()
        # Measured once here, on the rollout's own forward, rather than in every update minibatch: a
        # vocabulary-sized log-softmax per minibatch was ~3% of a cpu PPO step (docs/performance.md).
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        entropy = float(masked_mean(-(logp.exp() * logp).sum(-1), mask))
        ref_logits = forward_logits(reference, batch["input_ids"], batch["attention_mask"])
        ref_logprobs = token_logprobs(ref_logits, batch["input_ids"])
    scores_t = torch.as_tensor(scores, dtype=torch.float32, device=device)
    return Rollout(batch["input_ids"], batch["attention_mask"], mask, logprobs, ref_logprobs, values,
                   scores_t, texts, entropy)


# --------------------------------------------------------------------------------------------- training
def check_ppo_settings(config: PPOConfig, prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse bad settings before any work, naming the field (``config`` checked its own ranges when made)."""
    if config.minibatch_size > config.rollout_batch_size:
        raise ValueError(f"PPOConfig.minibatch_size ({config.minibatch_size}) exceeds rollout_batch_size "
                         f"({config.rollout_batch_size})")
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty sequence of strings")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad_token_id; set one (pad = eos)")


def _rollout_seed(seed: int, step: int) -> int:
    """Step ``step``'s sampling seed, a hash of both: nearby seeds' rollouts do not overlap."""
    return int(content_hash("ppo-rollout", seed, step, length=8), 16)


def kl_controller(config: PPOConfig) -> AdaptiveKLController:
    return AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)


@dataclass
class PPOState:
    """What a PPO step updates and a checkpoint keeps (policy + value head, optimizer, beta, score moments),
    and the frozen reference."""

    model: PolicyWithValueHead
    reference: nn.Module
    optimizer: torch.optim.Optimizer
    kl_ctl: AdaptiveKLController
    moments: RunningMoments = field(default_factory=RunningMoments)


def _ppo_update(state: PPOState, ro: Rollout, advantages: Tensor, returns: Tensor, config: PPOConfig, *,
                step: int, seed: int) -> dict[str, float]:
    """``ppo_epochs`` passes of minibatch updates over one rollout; returns the averaged statistics."""
    rows = []
    n = ro.input_ids.shape[0]
    for epoch in range(config.ppo_epochs):
        order = torch.as_tensor(np.random.default_rng([seed, step, epoch]).permutation(n))
        for start in range(0, n, config.minibatch_size):
            idx = order[start:start + config.minibatch_size].to(ro.input_ids.device)
            # Trim columns that are padding for the whole minibatch (right padding: trailing ones).
            width = int(ro.attention_mask[idx].sum(-1).max())
            ids, att, m = ro.input_ids[idx, :width], ro.attention_mask[idx, :width], ro.mask[idx, :width - 1]
            _, logprobs, values = state.model(ids, att)
            old_logprobs, old_values = ro.logprobs[idx, :width - 1], ro.values[idx, :width - 1]
            adv, ret = advantages[idx, :width - 1], returns[idx, :width - 1]
            pg_loss, pg_clipfrac = policy_loss(logprobs, old_logprobs, adv, m, config.cliprange)
            vf_loss, vf_clipfrac = value_loss(values, old_values, ret, m, config.cliprange_value)
            loss = pg_loss + config.vf_coef * vf_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite PPO loss at step {step}; lower the lr")
            optimizer_step(state.optimizer, state.model.parameters(), config.max_grad_norm, loss=loss,
                           where=f"at step {step}")
            with torch.no_grad():
                # 0.5 E[(log pi - log pi_old)^2]: a low-variance estimate of KL(pi_old || pi) (Schulman)
                approx_kl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, m)
                rows.append([float(x) for x in (pg_loss, vf_loss, pg_clipfrac, approx_kl, vf_clipfrac)])
    names = ("loss/policy", "loss/value", "policy/clipfrac", "policy/approx_kl", "val/clipfrac")
    return {name: float(np.mean(column)) for name, column in zip(names, zip(*rows, strict=True), strict=True)}


def ppo_step(state: PPOState, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], score_fn: ScoreFn,
             config: PPOConfig, *, step: int, seed: int,
             on_rollout: Callable[[Rollout, Tensor, Tensor, Tensor], None] | None = None) -> dict[str, Any]:
    """One PPO step: sample y ~ pi (temperature 1), score it (standardised by running moments), per-token
    rewards (Eq. 3), GAE, ``ppo_epochs`` clipped updates, beta toward ``target_kl``; returns the metrics.
    ``on_rollout(rollout, rewards, advantages, returns)`` sees them before whitening (notebook 06 uses it)."""
    started = time.perf_counter()
    device = next(state.model.parameters()).device
    kl_coef = state.kl_ctl.value
    ro = _rollout(state.model, state.reference, tokenizer, prompts, score_fn,
                  max_new_tokens=config.max_new_tokens, seed=_rollout_seed(seed, step))
    rollout_s = time.perf_counter() - started
    raw_scores = ro.scores.double().cpu().numpy()
    if config.normalize_scores:
        state.moments.update(raw_scores)
        scores = torch.as_tensor(state.moments.standardize(raw_scores), dtype=torch.float32, device=device)
    else:
        scores = ro.scores
    log_ratio = torch.where(ro.mask, ro.logprobs - ro.ref_logprobs, 0.0)
    kl = log_ratio.sum(-1)  # sampled sequence KL log pi(y|x)/pi_ref(y|x), per sample
    rewards = kl_penalized_rewards(scores, ro.logprobs, ro.ref_logprobs, ro.mask, kl_coef)
    advantages, returns = gae(rewards, ro.values, ro.mask, config.gamma, config.lam)
    if on_rollout is not None:
        on_rollout(ro, rewards, advantages, returns)
    if config.whiten_advantages:
        advantages = whiten(advantages, ro.mask)
    stats = _ppo_update(state, ro, advantages, returns, config, step=step, seed=seed)
    mean_kl = float(kl.mean())
    state.kl_ctl.update(mean_kl, n_steps=len(prompts))  # adapt beta toward target_kl for the next step
    # Cost: the rollout's tokens pass the policy to sample, to score, and ppo_epochs times in the updates.
    tokens = int(ro.attention_mask.sum())
    n = ro.input_ids.shape[0]
    return {
        "step": step,
        "objective/kl": mean_kl,
        "objective/scores": float(raw_scores.mean()),
        "objective/rlhf_reward": float(raw_scores.mean()) - kl_coef * mean_kl,  # r - beta KL (Eq. 3)
        "kl_coef": kl_coef,
        **stats,
        "policy/entropy": ro.entropy,
        "val/mean": float(masked_mean(ro.values, ro.mask)),
        "returns/mean": float(masked_mean(returns, ro.mask)),
        "objective/completion_tokens": float(ro.mask.sum(-1).float().mean()),
        "time/rollout_s": rollout_s,
        "time/step_s": time.perf_counter() - started,
        "cost/policy_forward_tokens": (2 + config.ppo_epochs) * tokens,
        "cost/policy_backward_tokens": config.ppo_epochs * tokens,
        "cost/samples": n, "cost/reward_queries": n,
        "cost/optimizer_steps": config.ppo_epochs * math.ceil(n / config.minibatch_size),
        "cost/wall_s": time.perf_counter() - started,
    }


def _write_checkpoint(folder: Path, model: PolicyWithValueHead, tokenizer: PreTrainedTokenizerBase) -> None:
    """Policy, tokenizer, and the value head in a subfolder (the policy's loader reads every *.safetensors
    beside its weights)."""
    model.policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "value_head").mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()},
              str(folder / "value_head" / "model.safetensors"))


def train_ppo(policy: nn.Module, reference: nn.Module, tokenizer: PreTrainedTokenizerBase,
              prompts: Sequence[str], score_fn: ScoreFn, *, config: PPOConfig, seed: int,
              log: TrainLog | None = None) -> list[dict[str, Any]]:
    """Train ``policy`` in place, on the device it is on, with PPO on Eq. 3; ``score_fn(texts)`` is r_phi
    (PPO) or r* (PPO-GT) of prompt + completion. ``reference`` stays frozen. Returns the metrics records."""
    if policy is reference:
        raise ValueError("policy and reference are the same object; pass a frozen copy as the reference")
    check_ppo_settings(config, prompts, tokenizer)
    device, prompts = next(policy.parameters()).device, list(prompts)
    log = log if log is not None else TrainLog(eval_every=config.eval_every)
    log.max_steps = config.max_steps
    seed_everything(seed)
    policy.eval()  # dropout off throughout (as the DPO trainer); autograd works in eval mode
    # The reference only runs under no_grad; its requires_grad flags are the caller's and are left alone
    # (flipping them would also freeze any later deepcopy of it used as a policy).
    reference.to(device).eval()
    if not any(p.requires_grad for p in policy.parameters()):
        raise ValueError("no parameter of the policy requires grad; unfreeze it (requires_grad_(True)) first")
    model = PolicyWithValueHead(policy).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    state = PPOState(model, reference, optimizer, kl_controller(config))
    state.optimizer.zero_grad(set_to_none=True)
    start, _, saved = log.restore({"": model.policy, "value_head": model.value_head}) or (0, None, None)
    if saved is not None:
        state.optimizer.load_state_dict(saved["optimizer"])
        state.kl_ctl.value = float(saved["kl_coef"])
        state.moments = RunningMoments(**saved["moments"])
    if start == 0:
        log.log_start(policy)
    name = "PPO" if config.target_kl is None else f"PPO target_kl={config.target_kl:g}"
    bar = tqdm(range(start + 1, config.max_steps + 1), desc=name, disable=not log.progress, initial=start,
               total=config.max_steps)
    for step in bar:
        chosen = batch_indices(len(prompts), config.rollout_batch_size, step, seed)
        record = ppo_step(state, tokenizer, [prompts[i] for i in chosen], score_fn, config, step=step,
                          seed=seed)
        log.log(record, policy)
        bar.set_postfix(score=f"{record['objective/scores']:.3f}", kl=f"{record['objective/kl']:.2f}",
                        beta=f"{record['kl_coef']:.3f}")
        if is_due(step, config.checkpoint_every, config.max_steps):
            log.save(step, lambda folder: _write_checkpoint(folder, model, tokenizer),
                     {"optimizer": state.optimizer.state_dict(), "kl_coef": state.kl_ctl.value,
                      "moments": asdict(state.moments)})
    policy.eval()
    return log.records
