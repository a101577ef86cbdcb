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
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import describe_machine, markdown_table, median  # noqa: E402
from dpo_lab import pipeline  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 prompts a shape, 2 repeats, 1 thread")
    parser.add_argument("--pref-prompts", type=int, default=128, help="train prompts timed (preset: 1500)")
    parser.add_argument("--eval-prompts", type=int, default=256, help="test prompts timed (preset: 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch thread counts (default: 1)")
    args = parser.parse_args()
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
