"""Sampling throughput: dpo-lab's decoding loop against HF ``generate`` (issue #6, part 2).

Completions per second at the cpu preset's two sampling shapes, with the real cpu-preset SFT policy
(4 layers x 192, vocab 4096) from ``artifacts/`` (built by ``make reproduce``; this script trains nothing
else):

* preference data: train prompts x 4 samples x 32 new tokens, batches of 128 (the preset samples 1,500
  prompts; ``--pref-prompts`` sets how many are timed here);
* evaluator: 256 held-out test prompts x 2 samples x 32 new tokens, batches of 128.

Rows, each on the same left-padded batches and seed:
  (a) ``model.generate(do_sample=True, top_k=0, ...)`` called directly,
  (b) ``dpo_lab.sampling.sample(backend="generate")`` (the old default),
  (c) ``sample(backend="loop")`` (the new default),
  (d) ``sample(backend="loop_icdf")`` (opt-in: inverse-CDF draw, same distribution, other tokens).
(a)-(c) must return the same tokens; the script checks that and stops if not. "mean length" (tokens per
completion, EOS included) is a coarse check that (d) samples alike. Repeats are interleaved
(a, b, c, d, a, b, ...) so that load from other users hits every row alike; the table shows the median
and [min-max]. Run: ``.venv/bin/python benchmarks/bench_sampling.py [--quick] [--threads 1,2]``.

``--speedups`` times instead the three speed-ups of issue #21 that change numbers, each alone (the other two
off) and before/after side by side in this one process, and prints what moved:
  1. the exact KL stepped alongside the sampler vs a second forward pass (one ``evaluate_policy`` call,
     DPO beta=0.1 checkpoint against pi_SFT, 256 x 2 x 32, batch 128, the float64 CDF in both);
  2. the LM head at completion-predicting positions only vs full logits (DPO steps, 32 pairs);
  3. the float32 CDF vs float64 (``sample`` at the evaluator's shape).
Read-only on the cached stages: ``--artifacts`` (default ``artifacts/``) must hold the cpu preset's SFT,
reward and preference stages and a DPO beta=0.1 run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import describe_machine, markdown_table, median, spread  # noqa: E402
from dpo_lab import logprobs, pipeline, sampling  # noqa: E402
from dpo_lab.batching import pad_rows  # noqa: E402
from dpo_lab.presets import get_preset  # noqa: E402
from dpo_lab.sampling import encode_prompts, sample, sampling_config  # noqa: E402


def plain_generate(model: torch.nn.Module, tokenizer, prompts: list[str], n: int, new: int, batch: int,
                   seed: int) -> list[list[int]]:
    """HF generate, called as a user would, on the batches ``sample`` builds; ids up to the first EOS."""
    ids = encode_prompts(tokenizer, prompts)
    jobs = [ids[i] for i in range(len(ids)) for _ in range(n)]
    out: list[list[int]] = []
    eos = tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(jobs), batch):
            rows = [{"input_ids": r, "completion_mask": [0] * len(r)} for r in jobs[start:start + batch]]
            padded = pad_rows(rows, tokenizer.pad_token_id, side="left")
            input_ids, mask = padded["input_ids"], padded["attention_mask"]
            seqs = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, top_k=0,
                                  max_new_tokens=new, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            for row in seqs[:, input_ids.shape[1]:].tolist():
                out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


def dpo_lab_sample(model, tokenizer, prompts, n, new, batch, seed, backend: str) -> list[list[int]]:
    s = sample(model, tokenizer, prompts, n_per_prompt=n, max_new_tokens=new, batch_size=batch, seed=seed,
               progress=False, backend=backend)
    return [c for per in s.completion_ids for c in per]


def run_shape(name: str, model, tokenizer, prompts: list[str], n: int, new: int, batch: int,
              repeats: int, seed: int = 0) -> list[dict]:
    args = (model, tokenizer)
    samplers: dict[str, Callable[[list[str]], list[list[int]]]] = {
        "(a) model.generate": lambda ps: plain_generate(*args, ps, n, new, batch, seed),
        "(b) sample(backend='generate')": lambda ps: dpo_lab_sample(*args, ps, n, new, batch, seed,
                                                                    "generate"),
        "(c) sample(backend='loop')": lambda ps: dpo_lab_sample(*args, ps, n, new, batch, seed, "loop"),
        "(d) sample(backend='loop_icdf')": lambda ps: dpo_lab_sample(*args, ps, n, new, batch, seed,
                                                                     "loop_icdf"),
    }
    # Warm-up: one batch each (allocator, oneDNN primitive caches); then (a)-(c) must give the same tokens.
    for run in samplers.values():
        run(prompts[: max(1, batch // n)])
    outputs = {label: run(prompts) for label, run in samplers.items()}
    same = {label: tokens == outputs["(a) model.generate"] for label, tokens in outputs.items()}
    for label in list(samplers)[:3]:
        if not same[label]:
            raise SystemExit(f"{name}: {label} sampled different tokens from model.generate")
    lengths = {label: sum(map(len, tokens)) / len(tokens) for label, tokens in outputs.items()}
    times: dict[str, list[float]] = {label: [] for label in samplers}
    for _ in range(repeats):  # interleaved, so a burst of load from other users hits every row alike
        for label, run in samplers.items():
            start = time.perf_counter()
            run(prompts)
            times[label].append(time.perf_counter() - start)
    completions = len(prompts) * n
    base = median(times["(a) model.generate"])
    rows = [{
        "shape": name, "sampler": label, "threads": torch.get_num_threads(),
        "KV cache": "preallocated" if "loop" in label else "DynamicCache",
        "completions/s": completions / median(ts),
        "seconds [min-max]": f"{median(ts):.2f} [{min(ts):.2f}-{max(ts):.2f}]",
        "speed-up vs (a)": base / median(ts), "same tokens as (a)": "yes" if same[label] else "no",
        "mean length": lengths[label],
    } for label, ts in times.items()]
    for row in rows:  # as they come: a run cut short still shows what it measured
        print(f"  {name}, {row['threads']} thread(s), {row['sampler']}: {row['completions/s']:.1f} "
              f"completions/s, {row['seconds [min-max]']} s", flush=True)
    return rows


# ------------------------------------------------------------------- issue #21's three speed-ups
def _draw_inverse_cdf_f64(probs: torch.Tensor) -> torch.Tensor:
    """The sampler's draw before speed-up 3: the float64 CDF."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).squeeze(1)
    last_with_mass = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(index, last_with_mass)


@contextlib.contextmanager
def patched(module: object, name: str, value: object):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, repeats interleaved (a, b, a, b, ...) after one untimed warm-up each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    return times


def report(name: str, times: dict[str, list[float]]) -> None:
    (before, tb), (after, ta) = times.items()
    print(f"  {name}: {before} {spread(tb)} s, {after} {spread(ta)} s, median ratio "
          f"{median(tb) / median(ta):.2f}x", flush=True)


def speedups(args: argparse.Namespace) -> None:
    import copy
    import dataclasses

    import numpy as np

    from dpo_lab import evaluate
    from dpo_lab.batching import PAIR_COLUMNS, PreferenceCollator, pair_columns
    from dpo_lab.dpo_trainer import DPOSettings, _micro_batch_losses, make_accelerator, make_optimizer
    from dpo_lab.kl_estimators import kl_estimates
    from dpo_lab.logprobs import concatenated_forward
    from dpo_lab.preferences import score_samples
    from dpo_lab.run import load_policy, reference_logprobs

    preset = get_preset("cpu")
    root = Path(args.artifacts)
    sft = root / f"sft-{pipeline.sft_key(preset)}" / "policy"
    reference, tokenizer = load_policy(sft)
    policy, _ = load_policy(next(root.glob("training/dpo-beta0.1-*/checkpoints/step-*")))
    reward = pipeline.load_tfidf_reward(root / f"reward-{pipeline.reward_key(preset)}" / "reward")
    e = preset.eval
    test = pipeline.prompts(preset, tokenizer, "test")[: args.eval_prompts]
    print(describe_machine())
    kw = {"samples_per_prompt": e.samples_per_prompt, "max_new_tokens": e.max_new_tokens,
          "batch_size": e.batch_size, "seed": 0}

    # 1. One evaluate_policy call; "before" is its old body: sample, score, then a second pass for the KL.
    def old_evaluate() -> tuple[dict, np.ndarray, np.ndarray, list]:
        s = sample(policy, tokenizer, test, n_per_prompt=kw["samples_per_prompt"],
                   max_new_tokens=kw["max_new_tokens"], batch_size=kw["batch_size"], seed=0, progress=False)
        rewards = np.asarray(score_samples(reward, s.prompts, s.texts))
        flat = [c for per in s.completion_ids for c in per]
        xs = [p for p, per in zip(s.prompt_ids, s.completion_ids, strict=True) for _ in per]
        est = kl_estimates(policy, reference, xs, flat, batch_size=kw["batch_size"],
                           pad_token_id=tokenizer.pad_token_id)
        kl, ratio = est.exact, est.k1
        n = len(test)
        return {"reward_mean": float(rewards.mean()), "kl_mean": evaluate._mean_se(kl, n)[0],
                "logratio_kl_mean": evaluate._mean_se(ratio, n)[0]}, kl, ratio, flat

    def new_evaluate() -> dict:
        return evaluate.evaluate_policy(policy, reference, tokenizer, test, reward, e, seed=kw["seed"])

    with patched(sampling, "_draw_inverse_cdf", _draw_inverse_cdf_f64):  # speed-up 3 off
        report(f"1. exact KL, evaluate_policy ({len(test)} x {e.samples_per_prompt} x {e.max_new_tokens})",
               interleaved({"second pass": old_evaluate, "stepped alongside": new_evaluate}, args.repeats))
        old, kl, ratio, flat = old_evaluate()
        new = new_evaluate()
        s = sample(policy, tokenizer, test, n_per_prompt=e.samples_per_prompt,
                   max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=0, progress=False,
                   reference=reference)
    assert [c for per in s.completion_ids for c in per] == flat, "the reference changed the samples"
    print(f"     max |dKL| per sample {np.abs(np.ravel(s.kl) - kl).max():.2e} (KL up to {kl.max():.2f}), "
          f"max |d log-ratio| {np.abs(np.ravel(s.logratio) - ratio).max():.2e}; kl_mean {old['kl_mean']:.6f}"
          f" -> {new['kl_mean']:.6f}, logratio_kl_mean {old['logratio_kl_mean']:.6f} -> "
          f"{new['logratio_kl_mean']:.6f}, reward_mean {old['reward_mean']:.6f} -> {new['reward_mean']:.6f}")

    if args.parts == "1":
        return
    # 2. DPO steps (32 pairs) from pi_SFT; "before" forces the full-logits path (as for a hooked model).
    n_steps = args.dpo_steps
    pairs = pipeline.load_preferences(root / f"preferences-{pipeline.preferences_key(preset)}" / "pairs")
    cols = pair_columns(pairs.select(range(n_steps * 32)))
    max_length = int(reference.config.n_positions)
    collator = PreferenceCollator(tokenizer, max_length)
    config = dataclasses.replace(preset.dpo, batch_size=32, micro_batch_size=32)
    with tempfile.TemporaryDirectory() as tmp, patched(logprobs, "has_hooks", lambda _: True):
        ref_all = reference_logprobs(reference, tokenizer, cols, max_length=max_length,
                                     cache_dir=tmp, batch_size=32, progress=False)
    batches = [collator([{c: cols[c][i] for c in PAIR_COLUMNS} for i in range(k * 32, (k + 1) * 32)])
               for k in range(n_steps)]
    accelerator = make_accelerator("cpu")

    def trainer() -> Callable[[], list[float]]:
        model = copy.deepcopy(reference).train()
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)

        def steps() -> list[float]:
            losses = []
            for k, batch in enumerate(batches):
                out = _micro_batch_losses(model, batch, ref_all[k * 32:(k + 1) * 32], accelerator,
                                          settings=DPOSettings(config, 0, max_length, beta=0.1),
                                          where=f"at step {k}")
                loss = out["losses"].mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            return losses
        steps.model = model  # type: ignore[attr-defined]
        return steps

    full, skip = trainer(), trainer()
    with patched(logprobs, "has_hooks", lambda _: True):
        full_losses = full()
    skip_losses = skip()  # the same start, batches and optimizer: only the LM head path differs
    with torch.no_grad():
        a = concatenated_forward(full.model.eval(), batches[0])[1]
        with patched(logprobs, "has_hooks", lambda _: True):
            b = concatenated_forward(full.model, batches[0])[1]
        d_weight = max(float((p - q).abs().max())
                       for p, q in zip(full.model.parameters(), skip.model.parameters(), strict=True))
    d_loss = max(abs(x - y) for x, y in zip(full_losses, skip_losses, strict=True))
    d_logp = float((a - b).abs().max())
    print(f"     after {n_steps} DPO steps: max |d loss| {d_loss:.2e} (last {full_losses[-1]:.6f} vs "
          f"{skip_losses[-1]:.6f}); max |d log-prob| per token, same weights {d_logp:.2e}; max |d weight| "
          f"{d_weight:.2e}")

    def timed_full() -> None:
        with patched(logprobs, "has_hooks", lambda _: True):
            full()

    report(f"2. LM head skip, {n_steps} DPO steps x 32 pairs",
           interleaved({"full logits": timed_full, "completion positions": skip}, args.repeats))

    # 3. sample() at the evaluator's shape, float64 vs float32 CDF.
    def draw(f64: bool) -> list[list[int]]:
        f64_draw = patched(sampling, "_draw_inverse_cdf", _draw_inverse_cdf_f64)
        with f64_draw if f64 else contextlib.nullcontext():
            return dpo_lab_sample(reference, tokenizer, test, e.samples_per_prompt, e.max_new_tokens,
                                  e.batch_size, 0, "loop_icdf")
    report(f"3. float32 CDF, sample() {len(test)} x {e.samples_per_prompt} x {e.max_new_tokens}",
           interleaved({"float64": lambda: draw(True), "float32": lambda: draw(False)}, args.repeats))
    a64, a32 = draw(True), draw(False)
    rows = sum(x != y for x, y in zip(a64, a32, strict=True))
    first = [next((t for t, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
             for x, y in zip(a64, a32, strict=True) if x != y]
    print(f"     pi_SFT, seed 0: {rows} of {len(a64)} completions differ (first differing token at "
          f"{first}); {sum(map(len, a64))} vs {sum(map(len, a32))} tokens")
    print(f"{'load after':>14}: {[round(x, 2) for x in os.getloadavg()]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 prompts a shape, 2 repeats, 1 thread")
    parser.add_argument("--pref-prompts", type=int, default=128, help="train prompts timed (preset: 1500)")
    parser.add_argument("--eval-prompts", type=int, default=256, help="test prompts timed (preset: 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch thread counts (default: 1)")
    parser.add_argument("--speedups", action="store_true", help="issue #21's three speed-ups, each alone")
    parser.add_argument("--artifacts", default=str(pipeline.artifacts_dir()),
                        help="cached stages (read only)")
    parser.add_argument("--dpo-steps", type=int, default=10)
    parser.add_argument("--parts", default="123", help="with --speedups: '1' times speed-up 1 alone")
    args = parser.parse_args()
    if args.speedups:
        torch.set_num_threads(int(args.threads or 2))
        speedups(args)
        return
    if args.quick:
        args.pref_prompts, args.eval_prompts, args.repeats = 64, 64, 2
    default_threads = torch.get_num_threads()
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    else:
        thread_counts = [1]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    preset = get_preset("cpu")
    model, tokenizer, _ = pipeline.sft_policy(preset, progress=False)
    model.eval()
    train = pipeline.prompts(preset, tokenizer, "train")[: args.pref_prompts]
    test = pipeline.prompts(preset, tokenizer, "test")[: args.eval_prompts]
    print(describe_machine())
    print(f"{'model':>14}: cpu-preset SFT policy, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"attention {model.config._attn_implementation}")
    cfg = sampling_config(tokenizer, preset.preferences.max_new_tokens)
    print(f"{'sampling':>14}: temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}, "
          f"use_cache {cfg.use_cache}")
    rows: list[dict] = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        p, e = preset.preferences, preset.eval
        rows += run_shape(f"preference data ({len(train)} prompts x {p.samples_per_prompt} x "
                          f"{p.max_new_tokens})", model, tokenizer, train, p.samples_per_prompt,
                          p.max_new_tokens, p.sample_batch_size, args.repeats)
        rows += run_shape(f"evaluator ({len(test)} x {e.samples_per_prompt} x {e.max_new_tokens})", model,
                          tokenizer, test, e.samples_per_prompt, e.max_new_tokens, e.batch_size, args.repeats)
    torch.set_num_threads(default_threads)
    print(f"{'load after':>14}: {[round(x, 2) for x in os.getloadavg()]}")
    print()
    columns = ["shape", "threads", "sampler", "KV cache", "completions/s", "seconds [min-max]",
               "speed-up vs (a)", "same tokens as (a)", "mean length"]
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
