"""Roofline of a dpo-lab DPO training step on this CPU (issue #6, part 3).

    .venv/bin/python benchmarks/bench_roofline.py            # ~2 min
    .venv/bin/python benchmarks/bench_roofline.py --quick    # ~1 min

1. The fp32 matrix-multiply rate torch reaches here: the model's own GEMM shapes (forward and backward of
   every linear layer and of the 4096-token LM head, at the real padded batch) and a big square one.
2. FLOPs of one DPO step (``dpo_trainer._train_step`` on the cpu preset's GPT-2, 32 pairs = 64 rows), counted
   analytically over every position of the padded batch (padding and prompt positions are computed too):
   forward = tokens x (L x 24 d^2 + 2 d V) + L x 4 x rows x T^2 x d (QK^T and AV over the full T x T; the
   causal half is not skipped in this count), backward = 2 x forward, no reference forward (dpo-lab caches
   pi_ref's log-probs). Elementwise work (softmaxes, layer norms, GELU, optimizer) is not counted as FLOPs.
3. Achieved FLOP/s = counted FLOPs / median step time, against the measured matmul rates.
4. Where the time goes: torch.profiler over a few steps, self CPU time bucketed by operator (GEMMs, attention,
   vocabulary-sized elementwise ops of the log-softmax, optimizer, ...) and the wall time outside any op.
5. The floor of ``make reproduce``: the matmul FLOPs of every stage of the cpu reproduction (counted from the
   token totals its runs logged in ``figures/results_cpu.csv`` and ``figures/summary_cpu.json``) over every
   core running at the model-shape rate of section 1. No schedule or kernel can beat it without doing fewer
   FLOPs, that is without shrinking the experiment (issue #12's 25-minute goal).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.common import describe_machine, load_average, markdown_table, median, time_call  # noqa: E402

BATCH = 32  # pairs per DPO step (the cpu preset)


# ------------------------------------------------------------------------------------------ FLOP count
def step_flops(*, rows: int, seq_len: int, n_layer: int, d_model: int, vocab: int,
               with_reference_forward: bool = False) -> dict[str, float]:
    """Matmul FLOPs of one training step over a padded ``rows x seq_len`` batch (multiply-add = 2 FLOPs).

    Per token and layer: QKV 2*d*3d, attention output 2*d*d, MLP 2*d*4d*2 -> 24 d^2; per layer and row the
    attention products QK^T and AV 2 * 2 * T^2 * d; per token the LM head 2*d*V. Backward = 2 x forward
    (gradients of inputs and of weights). A reference forward (what TRL does by default) adds 1 x forward.
    """
    tokens = rows * seq_len
    body = tokens * n_layer * 24 * d_model**2
    attention = n_layer * rows * 4 * seq_len**2 * d_model
    head = tokens * 2 * d_model * vocab
    forward = body + attention + head
    total = 3 * forward + (forward if with_reference_forward else 0)
    return {"body": 3 * body, "attention": 3 * attention, "lm_head": 3 * head, "forward": forward,
            "step": total}


# -------------------------------------------------------------------------------------- matmul rates
def matmul_rates(tokens: int, d: int, vocab: int, repeats: int) -> list[dict[str, Any]]:
    """GFLOP/s of ``torch.mm`` (fp32) on the model's GEMM shapes at ``tokens`` rows, and a big square one."""
    shapes = [
        ("qkv fwd", tokens, d, 3 * d), ("attn out fwd", tokens, d, d), ("mlp up fwd", tokens, d, 4 * d),
        ("mlp down fwd", tokens, 4 * d, d), ("lm head fwd", tokens, d, vocab),
        ("lm head bwd (input grad)", tokens, vocab, d), ("lm head bwd (weight grad)", vocab, tokens, d),
        ("mlp up bwd (weight grad)", d, tokens, 4 * d),
        ("square 2048", 2048, 2048, 2048),
    ]
    rows = []
    for name, m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        times = time_call(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), warmup=3, repeats=repeats)
        seconds = median(times)
        rows.append({"GEMM": name, "M x K x N": f"{m} x {k} x {n}", "ms": seconds * 1e3,
                     "GFLOP/s": 2 * m * k * n / seconds / 1e9, "_flops": 2 * m * k * n, "_s": seconds})
    return rows


# ------------------------------------------------------------------------------------------- the step
def load_step_setup(n_steps: int) -> dict[str, Any]:
    """What one step of the DPO loop needs, for the cpu preset's model and first pairs."""
    from dpo_lab import pipeline
    from dpo_lab.batching import PreferenceCollator, pair_columns
    from dpo_lab.dpo_trainer import make_accelerator, make_optimizer
    from dpo_lab.loop import warmup_then_flat
    from dpo_lab.presets import get_preset
    from dpo_lab.run import reference_logprobs

    preset = get_preset("cpu")
    reference, tokenizer, _ = pipeline.sft_policy(preset, progress=False)
    pairs, _ = pipeline.preference_data(preset, progress=False)
    cols = pair_columns(pairs.select(range(n_steps * BATCH)))
    max_length = int(reference.config.n_positions)
    config = dataclasses.replace(preset.dpo, batch_size=BATCH, micro_batch_size=BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_logprobs(reference, tokenizer, cols, max_length=max_length, cache_dir=tmp,
                                 batch_size=BATCH, progress=False)
    policy = copy.deepcopy(reference).eval()
    optimizer = make_optimizer([p for p in policy.parameters() if p.requires_grad], config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_flat(config.warmup_steps))
    return {"policy": policy, "collator": PreferenceCollator(tokenizer, max_length), "cols": cols,
            "ref": ref, "optimizer": optimizer, "scheduler": scheduler,
            "config": config, "model_config": reference.config, "accelerator": make_accelerator("cpu")}


def run_step(setup: dict[str, Any], step: int) -> dict[str, Any]:
    """One DPO step as ``train_dpo`` takes it: the loop's own per-micro-batch losses (one stacked forward),
    backward, gradient clipping, RMSprop, the warmup schedule."""
    from dpo_lab.batching import PAIR_COLUMNS
    from dpo_lab.dpo_trainer import DPOSettings, _micro_batch_losses
    from dpo_lab.loop import batch_indices

    cols, policy, optimizer = setup["cols"], setup["policy"], setup["optimizer"]
    idx = batch_indices(len(cols["prompt"]), BATCH, step, 0)
    batch = setup["collator"]([{c: cols[c][i] for c in PAIR_COLUMNS} for i in idx])
    settings = DPOSettings(setup["config"], 0, setup["model_config"].n_positions, beta=0.1)
    out = _micro_batch_losses(policy, batch, setup["ref"][idx], setup["accelerator"], settings=settings,
                              where=f"at step {step}")
    loss = out["losses"].mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), setup["config"].max_grad_norm)
    optimizer.step()
    setup["scheduler"].step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.item()}


def padded_length(setup: dict[str, Any], step: int) -> int:
    """T of step ``step``'s stacked chosen+rejected batch (what the forward pass computes over)."""
    from dpo_lab.batching import PAIR_COLUMNS
    from dpo_lab.loop import batch_indices

    cols = setup["cols"]
    idx = batch_indices(len(cols["prompt"]), BATCH, step, 0)
    batch = setup["collator"]([{c: cols[c][i] for c in PAIR_COLUMNS} for i in idx])
    return batch["input_ids"].shape[1]


# ------------------------------------------------------------------------------ floor of the reproduction
def reproduction_flops(figures: Path, preset_name: str = "cpu") -> list[dict[str, Any]]:
    """Matmul FLOPs of each stage of ``make reproduce`` at ``preset_name``, counted low (a lower bound).

    Tokens are unpadded (what the runs logged); a forward costs ``step_flops(...)["forward"]`` per token at
    the stage's typical length, a backward twice that. Counted: SFT (forward + backward of every token it
    logged); sampling the preference candidates (one forward per token, the KV cache making each new token
    cost one token's forward); pi_ref's log-probs of the pairs (one forward, shared by every run); r_phi's
    training (forward + backward over chosen and rejected of every training pair, each epoch; no LM head);
    each frontier run's logged policy forward/backward tokens; PPO's sampling and r_phi queries of its
    rollouts; every evaluation point after step 0 (sampling, the reference stepping alongside for the exact
    sequence KL). Not counted: r*'s TF-IDF, validation passes, tokenizer training, padding, elementwise
    work (softmaxes, GELU, layer norms, optimizer): every one of them only adds time.
    """
    import csv
    import json

    from dpo_lab.presets import get_preset

    preset = get_preset(preset_name)
    pol = preset.policy
    summary = json.loads((figures / f"summary_{preset_name}.json").read_text())
    with open(figures / f"results_{preset_name}.csv") as f:
        runs = list(csv.DictReader(f))
    with open(figures / f"frontier_{preset_name}_points.csv") as f:
        points = [r for r in csv.DictReader(f) if int(r["step"]) > 0]

    def forward(seq_len: int, lm_head: bool = True) -> float:
        """FLOPs per token of one forward over rows of ``seq_len`` tokens (r_phi has no LM head)."""
        f = step_flops(rows=1, seq_len=seq_len, n_layer=pol.n_layer, d_model=pol.n_embd,
                       vocab=summary["sft"]["vocab_size"])
        return (f["forward"] - (0 if lm_head else f["lm_head"] / 3)) / seq_len

    dpo_runs = [r for r in runs if r["method"] == "DPO"]
    rows_per_run = preset.dpo.max_steps * 2 * preset.dpo.batch_size
    seq = round(float(dpo_runs[0]["policy_forward_tokens"]) / rows_per_run)  # mean prompt + completion
    new = preset.preferences.max_new_tokens
    n_pairs = summary["pairs"]["n_pairs"]
    rm = preset.reward_model
    stages = {
        "SFT": 3 * summary["sft"]["tokens"] * forward(pol.n_positions),
        "preference sampling": summary["pairs"]["n_candidates"] * seq * forward(seq),
        "pi_ref log-probs of the pairs": 2 * n_pairs * seq * forward(seq),
        "r_phi training": 3 * rm.epochs * (1 - 2 * rm.val_fraction) * 2 * n_pairs * seq
        * forward(seq, lm_head=False),
    }
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        fwd = sum(float(r["policy_forward_tokens"]) for r in mine)
        bwd = sum(float(r["policy_backward_tokens"]) for r in mine)
        rollouts = sum(float(r["samples"]) for r in mine)
        flops = (fwd + 2 * bwd) * forward(seq) + rollouts * new * forward(seq)
        if method == "PPO":  # r_phi scores every rollout
            flops += rollouts * seq * forward(seq, lm_head=False)
        stages[f"runs: {method}"] = flops
    # Sampling with the reference stepping alongside: one policy and one reference forward per token.
    per_point = preset.eval.n_prompts * preset.eval.samples_per_prompt * seq * 2 * forward(seq)
    stages[f"evaluations ({len(points)} points)"] = len(points) * per_point
    return [{"stage": k, "TFLOP": v / 1e12} for k, v in stages.items()]


# ------------------------------------------------------------------------------------------- profile
_BUCKETS = [  # (bucket, regex over the ATen op name); the first match wins
    ("GEMM (mm/addmm/bmm)", r"^aten::(mm|addmm|bmm|baddbmm|addbmm)$"),
    ("attention kernel (SDPA)", r"scaled_dot_product|flash_attention|_efficient_attention"),
    ("optimizer + grad clip",
     r"^aten::_foreach_|^Optimizer\.|^aten::(addcmul_|addcdiv_|sqrt|linalg_vector_norm)"),
    ("layer norm", r"layer_norm"),
    ("GELU / tanh", r"gelu|tanh"),
    ("embedding", r"embedding"),
]


def bucket_profile(prof: Any, vocab: int, d_model: int, n_steps: int, wall_s: float) -> list[dict[str, Any]]:
    """Self CPU time per bucket per step. Other ops are bucketed by their inputs' last dimension: V means
    the log-softmax / logsumexp over the vocabulary and its backward; 4d means GPT-2's "gelu_new", which
    transformers composes from pow/mul/add/tanh (about ten elementwise passes forward and backward)."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        name = event.key
        bucket = next((b for b, pattern in _BUCKETS if re.search(pattern, name)), None)
        if bucket is None:
            shapes = event.input_shapes or []
            last = {s[-1] for s in shapes if isinstance(s, list) and len(s) >= 2}
            bucket = ("vocab-sized elementwise (log-softmax)" if vocab in last
                      else "elementwise on the 4d MLP hidden (gelu_new)" if 4 * d_model in last
                      else "other ops")
        totals[bucket] += event.self_cpu_time_total / 1e6
    in_ops = sum(totals.values())
    totals["outside any op (Python, autograd engine, tokenizer)"] = max(wall_s - in_ops, 0.0)
    return [{"where": k, "ms per step": v / n_steps * 1e3, "share of wall": f"{v / wall_s:.0%}"}
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, help="timed DPO steps (default 12, quick 5)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_steps = args.steps or (5 if args.quick else 12)
    repeats = 5 if args.quick else 10
    print("# Roofline of a dpo-lab DPO step\n")
    print(describe_machine())

    warmup = 2
    setup = load_step_setup(warmup + 2 * n_steps + 2)
    mc = setup["model_config"]
    d, n_layer, vocab = mc.n_embd, mc.n_layer, mc.vocab_size

    # ---- step timing (after warm-up), with the FLOPs of each step's actual padded batch
    step = 0
    for _ in range(warmup):
        step += 1
        run_step(setup, step)
    times, flops, lengths = [], [], []
    for _ in range(n_steps):
        step += 1
        length = padded_length(setup, step)
        start = time.perf_counter()
        run_step(setup, step)
        times.append(time.perf_counter() - start)
        lengths.append(length)
        flops.append(step_flops(rows=2 * BATCH, seq_len=length, n_layer=n_layer, d_model=d,
                                vocab=vocab)["step"])
    step_s = median(times)
    rate = median([f / t for f, t in zip(flops, times, strict=True)]) / 1e9  # GFLOP/s
    t_med = int(median(lengths))
    parts = step_flops(rows=2 * BATCH, seq_len=t_med, n_layer=n_layer, d_model=d, vocab=vocab)

    # ---- matmul rates at the median padded batch
    gemms = matmul_rates(2 * BATCH * t_med, d, vocab, repeats)
    model_gemms = [g for g in gemms if not g["GEMM"].startswith("square")]
    model_rate = sum(g["_flops"] for g in model_gemms) / sum(g["_s"] for g in model_gemms) / 1e9
    square_rate = next(g["GFLOP/s"] for g in gemms if g["GEMM"].startswith("square"))

    print(f"\n## 1. fp32 matmul rate (torch.mm, median of {repeats}; {2 * BATCH} rows x T={t_med} tokens)\n")
    print(markdown_table(gemms, ["GEMM", "M x K x N", "ms", "GFLOP/s"]))
    print(f"\nmodel-shape GEMMs together: {model_rate:.1f} GFLOP/s; big square: {square_rate:.1f} GFLOP/s")

    print(f"\n## 2. FLOPs of one DPO step ({2 * BATCH} rows x T={t_med}, L={n_layer}, d={d}, V={vocab})\n")
    print(markdown_table([{"part": k, "GFLOP": v / 1e9, "share": f"{v / parts['step']:.0%}"}
                          for k, v in parts.items() if k not in ("forward", "step")]
                         + [{"part": "step (fwd + bwd)", "GFLOP": parts["step"] / 1e9, "share": "100%"}],
                         ["part", "GFLOP", "share"]))

    best_rate = flops[times.index(min(times))] / min(times) / 1e9
    print(f"\n## 3. Achieved ({n_steps} steps, padded T {min(lengths)}-{max(lengths)})\n")
    print(markdown_table([
        {"quantity": "median step time (s)", "value": step_s},
        {"quantity": "fastest step (s), the least disturbed by other load", "value": min(times)},
        {"quantity": "achieved GFLOP/s at the fastest step", "value": best_rate},
        {"quantity": "fastest step, share of big-square rate", "value": f"{best_rate / square_rate:.0%}"},
        {"quantity": "achieved GFLOP/s (counted FLOPs / step time)", "value": rate},
        {"quantity": "share of the big-square matmul rate", "value": f"{rate / square_rate:.0%}"},
        {"quantity": "share of the model-shape matmul rate", "value": f"{rate / model_rate:.0%}"},
        {"quantity": "step time if every FLOP ran at the model-shape rate (s)",
         "value": parts["step"] / (model_rate * 1e9)},
    ], ["quantity", "value"]))

    # ---- profile
    n_prof = max(3, n_steps // 2)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(n_prof):
            step += 1
            run_step(setup, step)
        wall = time.perf_counter() - start
    print(f"\n## 4. Where the time goes (torch.profiler, {n_prof} steps, {wall / n_prof:.3f} s/step "
          "under the profiler)\n")
    print(markdown_table(bucket_profile(prof, vocab, d, n_prof, wall),
                         ["where", "ms per step", "share of wall"]))
    print("\nTop operators by self CPU time:\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))

    figures = Path(__file__).resolve().parents[1] / "figures"
    if (figures / "results_cpu.csv").exists():
        stages = reproduction_flops(figures)
        total = sum(r["TFLOP"] for r in stages) * 1e12
        threads = torch.get_num_threads()
        cores = len(os.sched_getaffinity(0))
        machine_rate = model_rate * 1e9 * cores / threads
        for r in stages:
            r["s at the floor"] = r["TFLOP"] * 1e12 / machine_rate
        print(f"\n## 5. Floor of `make reproduce` (cpu preset): each of {cores} cores at the model-shape "
              f"rate of section 1 ({model_rate:.1f} GFLOP/s per {threads} thread(s))\n")
        print(markdown_table(stages + [{"stage": "total", "TFLOP": total / 1e12,
                                        "s at the floor": total / machine_rate}],
                             ["stage", "TFLOP", "s at the floor"]))
        print(f"\nfloor: {total / machine_rate / 60:.1f} min of compute, install not included")
    print(f"load average at the end: {[round(x, 2) for x in load_average()]}")


if __name__ == "__main__":
    main()
