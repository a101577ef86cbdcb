"""The research labs' runs (notebooks 12 and 13): DPO and PPO with pairs from another labeller or sampler,
another start than pi_SFT, or r_phi read beside r*; evaluated as the frontier's runs are (paper footnote 3)
and cached in ``artifacts/training/lab-...`` under a key that hashes their pairs, start and settings."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import datasets
import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_lab import pipeline
from dpo_lab.batching import pair_columns
from dpo_lab.cache import cached_directory, content_hash
from dpo_lab.preferences import Candidates, build_preference_pairs, score_samples
from dpo_lab.presets import Preset, artifacts_dir
from dpo_lab.rewards import RewardModel
from dpo_lab.run import RunResult, dpo_run, load_policy, pairs_fingerprint, ppo_run, trajectory_settings

SHOW_PROGRESS = pipeline.SHOW_PROGRESS


# ------------------------------------------------------------------------------------------ pair sources
def label_agreement(candidates: Candidates, scores: list[list[float]]) -> float:
    """Share of the pairs ordered by ``scores`` (ties and empty completions skipped, as in the pairs) that
    r* (``candidates["rewards"]``) orders the same way; r* ties count half."""
    agree, total = 0.0, 0
    for texts, gold, proxy in zip(candidates["completions"], candidates["rewards"], scores, strict=True):
        for a in range(len(texts)):
            for b in range(a + 1, len(texts)):
                if not texts[a] or not texts[b] or proxy[a] == proxy[b] or texts[a] == texts[b]:
                    continue
                total += 1
                agree += 0.5 if gold[a] == gold[b] else float((gold[a] > gold[b]) == (proxy[a] > proxy[b]))
    if total == 0:
        raise ValueError("no pair to compare: every pair is tied, empty or identical")
    return agree / total


def proxy_preference_data(preset: Preset, *, progress: bool = SHOW_PROGRESS) -> tuple[datasets.Dataset, dict]:
    """pi_SFT's samples of the preference stage labelled by r_phi instead of r* (Gao et al. 2022's proxy);
    ``stats`` adds ``agreement_with_r_star``, the share of these pairs that r* orders the same way."""

    def build(folder: Path) -> None:
        candidates = pipeline.preference_candidates(preset, progress=progress)
        r_phi = pipeline.learned_reward(preset, progress=progress)
        scores = score_samples(r_phi, candidates["prompts"], candidates["completions"])
        pairs, stats = build_preference_pairs(candidates["prompts"], candidates["completions"], scores)
        relabelled: Candidates = {**candidates, "rewards": scores}
        pipeline.save_preferences(pairs, folder / "pairs", stats=stats, candidates=relabelled)
        summary = {**dataclasses.asdict(stats), "agreement_with_r_star": label_agreement(candidates, scores)}
        (folder / "pairs" / "stats.json").write_text(json.dumps(summary))

    key = content_hash("proxy-labels", pipeline.preferences_key(preset), pipeline.reward_model_key(preset))
    folder = cached_directory(pipeline.stage_dir("preferences-proxy", key), build)
    return pipeline.load_pair_stage(folder / "pairs")


def sampled_preference_data(preset: Preset, sampler: PreTrainedModel,
                            sampler_tokenizer: PreTrainedTokenizerBase, *, sampler_key: str,
                            progress: bool = SHOW_PROGRESS) -> tuple[datasets.Dataset, dict]:
    """The preference stage with another sampler (identified by ``sampler_key`` in the cache): the same
    train prompts, labelled by r*, all pairs kept."""
    key = content_hash("sampled-by", sampler_key, pipeline.preferences_key(preset))
    folder = pipeline.sampled_pairs_folder(preset, progress, "preferences-sampled", key,
                                           (sampler, sampler_tokenizer))
    return pipeline.load_pair_stage(folder)


def sibling_preference_data(preset: Preset, sampler_seed: int, *,
                            progress: bool = SHOW_PROGRESS) -> tuple[datasets.Dataset, dict]:
    """Off-policy pairs: sampled from a sibling of pi_SFT (another ``seed``, same recipe), labelled by r*."""
    if sampler_seed == preset.seed:
        raise ValueError(f"sampler_seed {sampler_seed} is the preset's own seed: that sampler is pi_SFT "
                         "itself")
    sibling = dataclasses.replace(preset, seed=sampler_seed)
    model, tokenizer, _ = pipeline.sft_policy(sibling, progress=progress)
    return sampled_preference_data(preset, model, tokenizer, sampler_key=f"sft-{pipeline.sft_key(sibling)}",
                                   progress=progress)


def resampled_preference_data(preset: Preset, run: RunResult, *,
                              progress: bool = SHOW_PROGRESS) -> tuple[datasets.Dataset, dict]:
    """Pairs sampled from a finished run's final policy and labelled by r*: iterative DPO's next round."""
    model, tokenizer = load_policy(run.checkpoint_dir)
    sampler_key = str(run.checkpoint_dir.resolve().relative_to(artifacts_dir().resolve()))
    return sampled_preference_data(preset, model, tokenizer, sampler_key=sampler_key, progress=progress)


def equal_count(pairs: datasets.Dataset, n: int, *, seed: int) -> datasets.Dataset:
    """``n`` of ``pairs``, a seeded choice in the original order (pair sources compared at equal counts)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(pairs) < n:
        raise ValueError(f"only {len(pairs)} pairs, fewer than the {n} asked for")
    keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=n, replace=False))
    return pairs.select(keep.tolist())


# ------------------------------------------------------------------------------------------------- runs
def lab_dpo(preset: Preset, pairs: datasets.Dataset, beta: float, *, start: RunResult | None = None,
            proxy: bool = False, progress: bool = SHOW_PROGRESS) -> RunResult:
    """DPO (Eq. 7) at ``beta`` on ``pairs`` from pi_SFT, or from ``start``'s final policy, then the reference
    too (iterative DPO); KL is measured to pi_SFT either way, ``proxy`` also reads r_phi."""
    sft, tokenizer, _ = pipeline.sft_policy(preset, progress=progress)
    reference = sft if start is None else load_policy(start.checkpoint_dir)[0]
    eval_fn = pipeline.run_eval_fn(preset, sft, tokenizer, proxy=proxy, from_sft=start is None)
    trajectory = trajectory_settings(preset.dpo)
    start_name = None if start is None else str(start.checkpoint_dir.resolve().relative_to(
        artifacts_dir().resolve()))
    key = content_hash("lab-dpo", pairs_fingerprint(pair_columns(pairs)), pipeline.sft_key(preset),
                       pipeline.reward_key(preset), pipeline.audit_key(preset), trajectory, preset.eval, beta,
                       start_name, proxy)
    return dpo_run(copy.deepcopy(reference), reference, tokenizer, pairs,
                   out_dir=artifacts_dir() / "training" / f"lab-dpo-beta{beta:g}-{key}",
                   ref_cache_dir=artifacts_dir() / "reference-logps", eval_fn=eval_fn, config=preset.dpo,
                   beta=beta, seed=preset.seed, max_length=preset.policy.n_positions, progress=progress)


def lab_ppo(preset: Preset, target_kl: float | None, *, progress: bool = SHOW_PROGRESS) -> RunResult:
    """The frontier's "PPO" (on r_phi) with r_phi read beside r*; ``target_kl`` None keeps the KL coefficient
    fixed at ``ppo.init_kl_coef``."""
    reference, tokenizer, _ = pipeline.sft_policy(preset, progress=progress)
    config = dataclasses.replace(preset.ppo, target_kl=target_kl)
    key = content_hash("lab-ppo-proxy", pipeline.preferences_key(preset), pipeline.reward_model_key(preset),
                       trajectory_settings(config), preset.eval)
    name = f"target_kl{target_kl:g}" if target_kl is not None else f"kl_coef{config.init_kl_coef:g}"
    train_prompts = pipeline.prompts(preset, tokenizer, "train")
    return ppo_run(copy.deepcopy(reference), reference, tokenizer, train_prompts,
                   pipeline.learned_reward(preset, progress=progress),
                   out_dir=artifacts_dir() / "training" / f"lab-ppo-{name}-{key}",
                   eval_fn=pipeline.run_eval_fn(preset, reference, tokenizer, proxy=True), config=config,
                   seed=preset.seed, progress=progress)


# ------------------------------------------------------------------------------------------------ reading
def final_samples(preset: Preset, runs: dict[str, RunResult], tokenizer: PreTrainedTokenizerBase,
                  n_prompts: int, rewards: dict[str, RewardModel]) -> list[dict]:
    """One completion of each of the first ``n_prompts`` test prompts from each run's final policy, drawn as
    the evaluation draws them, as rows {"run", "text" (prompt + completion), one score per reward}."""
    rows = []
    for name, result in runs.items():
        policy, _ = load_policy(result.checkpoint_dir)
        drawn = pipeline.sample_test_prompts(preset, policy, tokenizer, n_prompts)
        texts = [p + per[0] for p, per in zip(drawn.prompts, drawn.texts, strict=True)]
        scores = {label: reward(texts) for label, reward in rewards.items()}
        rows += [{"run": name, "text": text, **{label: float(s[i]) for label, s in scores.items()}}
                 for i, text in enumerate(texts)]
    return rows
