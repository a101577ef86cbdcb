"""DPO training on this CPU: dpo-lab's trainer against TRL's ``DPOTrainer`` (issue #6, part 1).

    .venv/bin/python benchmarks/bench_dpo_vs_trl.py            # ~5 min
    .venv/bin/python benchmarks/bench_dpo_vs_trl.py --quick    # ~1-2 min, fewer steps and repeats

Both train the ``cpu`` preset's SFT GPT-2 (4 layers x 192, vocab 4096) on its own preference pairs with the
same settings: batch 32 pairs (no accumulation), RMSprop lr 1e-4 with 15 warmup steps then constant, gradient
clipping at 10, fp32, max_length 128, dropout off, no evaluation, no checkpoint inside the timed steps.

1. Loss check first: on one batch, TRL's ``compute_loss`` and ``dpo_lab.losses.preference_loss`` (over
   ``logprobs.concatenated_forward``) must agree for ``sigmoid``, ``ipo`` and ``hinge`` -- loss and gradient.
   TRL length-normalises the IPO log-ratios; dpo-lab sums them (the official DPO repo's convention), so IPO is
   compared twice: as is (they differ, by design) and with dpo-lab fed per-token-averaged log-probs (equal).
2. One run, per tool, each in a fresh process (its peak RSS is that configuration's): steady-state pairs/s
   (median step time after warm-up), end-to-end seconds of the run including set-up, peak RSS.
   Tools: dpo-lab (reference log-probs computed once before training, cached on disk); TRL as configured by
   default (reference model forward on every step); TRL with ``precompute_ref_log_probs=True``.
   The order of the tools rotates between repeats so that load drifts hit them alike.
3. A 4-beta sweep (the paper's 0.05, 0.1, 1, 5), per tool, in one process each, as a user would write it: a
   loop of four runs. dpo-lab's runs share the reference log-probs in its cache (the first computes them);
   TRL builds a trainer per run and so recomputes them per run (or per step, by default).

Tokens are made identical: TRL's own preprocessing tokenizes prompt+completion jointly (a BPE merge can
straddle the boundary: the cpu preset's prompts are cut mid-word) and appends EOS, so this script gives TRL
dpo-lab's token ids (prompt and completion tokenized separately, no EOS) through ``_prepare_dataset``; every
other part of TRL is stock. The loss check asserts the two collated batches hold the same ids.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    current_rss_mib,
    describe_machine,
    emit_result,
    load_average,
    machine_info,
    markdown_table,
    median,
    peak_rss_mib,
    run_worker,
    spread,
)

SCRIPT = Path(__file__).resolve()
TOOLS = ("dpo-lab", "trl", "trl-precompute")
SWEEP_BETAS = (0.05, 0.1, 1.0, 5.0)  # the paper's DPO sweep on IMDb
BATCH = 32  # pairs per optimizer step, one micro-batch (the cpu preset's setting)
LR, WARMUP, MAX_GRAD_NORM = 1e-4, 15, 10.0  # the cpu preset's DPOConfig
WARMUP_STEPS_EXCLUDED = 3  # first steps pay allocator and kernel-selection warm-up


# ----------------------------------------------------------------------------------------------- data
def load_cpu_setup(n_pairs: int) -> tuple[Any, Any, Any]:
    """(SFT policy = reference, tokenizer, the first ``n_pairs`` cpu-preset pairs as an in-memory Dataset).

    In memory, so that TRL's ``datasets.map`` caches go to a temporary folder, not into artifacts/.
    """
    import datasets

    from dpo_lab import pipeline
    from dpo_lab.presets import get_preset

    preset = get_preset("cpu")
    reference, tokenizer, _ = pipeline.sft_policy(preset, progress=False)
    pairs, _ = pipeline.preference_data(preset, progress=False)
    if n_pairs > len(pairs):
        raise ValueError(f"asked for {n_pairs} pairs but the cpu preset has {len(pairs)}")
    sub = pairs.select(range(n_pairs)).select_columns(["prompt", "chosen", "rejected"])
    return reference.eval(), tokenizer, datasets.Dataset.from_dict(sub.to_dict())


def max_length_of(model: Any) -> int:
    return int(model.config.n_positions)


# ------------------------------------------------------------------------------------------------ TRL
def trl_trainer(policy: Any, reference: Any | None, tokenizer: Any, pairs: Any, *, beta: float,
                max_steps: int, out_dir: str, loss_type: str = "sigmoid", precompute: bool = False,
                callbacks: list[Any] | None = None) -> Any:
    """A stock ``trl.DPOTrainer`` with dpo-lab's settings; only the tokenization is dpo-lab's (see top)."""
    from trl import DPOConfig, DPOTrainer

    from dpo_lab.batching import tokenize_completion

    max_length = max_length_of(policy)

    class SameTokensDPOTrainer(DPOTrainer):
        """TRL's trainer fed the token ids dpo-lab trains on: prompt and completion tokenized apart."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            def tokenize(example: dict[str, str]) -> dict[str, list[int]]:
                chosen = tokenize_completion(tokenizer, example["prompt"], example["chosen"],
                                             max_length=max_length)
                rejected = tokenize_completion(tokenizer, example["prompt"], example["rejected"],
                                               max_length=max_length)
                n_prompt = chosen["completion_mask"].index(1)
                return {"prompt_ids": chosen["input_ids"][:n_prompt],
                        "chosen_ids": chosen["input_ids"][n_prompt:],
                        "rejected_ids": rejected["input_ids"][n_prompt:]}

            return dataset.map(tokenize, remove_columns=dataset.column_names)

    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=max_steps,
        learning_rate=LR, optim="rmsprop", lr_scheduler_type="constant_with_warmup", warmup_steps=WARMUP,
        max_grad_norm=MAX_GRAD_NORM, weight_decay=0.0, bf16=False, fp16=False, use_cpu=True, beta=beta,
        loss_type=[loss_type], max_length=max_length, precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=BATCH, save_strategy="no", eval_strategy="no", report_to="none",
        logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return SameTokensDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=pairs,
                                processing_class=tokenizer, callbacks=callbacks)


# ------------------------------------------------------------------------------------- 1. loss check
def loss_check(n_pairs: int = 16) -> list[dict[str, Any]]:
    """TRL's loss and gradient vs dpo-lab's on one batch, for sigmoid, ipo and hinge at two betas."""
    from dpo_lab.batching import PreferenceCollator
    from dpo_lab.logprobs import concatenated_forward
    from dpo_lab.losses import preference_loss

    reference, tokenizer, pairs = load_cpu_setup(n_pairs)
    policy = copy.deepcopy(reference)
    # A policy != reference, or every implicit reward is 0 and every sigmoid loss is log 2 on both sides.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    examples = [pairs[i] for i in range(n_pairs)]
    ours = PreferenceCollator(tokenizer, max_length_of(policy))(examples)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(policy, copy.deepcopy(reference), tokenizer, pairs, beta=0.1, max_steps=1,
                              out_dir=tmp)
        theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(n_pairs)])
        same_tokens = _same_tokens(ours, theirs)
        with torch.no_grad():
            ref_c, ref_r = concatenated_forward(reference, ours)[0].unbind(1)
        # completion lengths, for matching TRL's length-normalised IPO
        n_c, n_r = ours["completion_mask"][ours["rows"]].sum(-1).float().unbind(1)
        params = [p for p in policy.parameters() if p.requires_grad]
        for loss_type in ("sigmoid", "ipo", "hinge"):
            for beta in (0.1, 1.0):
                trainer.loss_types, trainer.beta = [loss_type], beta
                policy.zero_grad(set_to_none=True)
                trl_loss = trainer.compute_loss(trainer.model, theirs)
                trl_grad = torch.autograd.grad(trl_loss, params)
                pol_c, pol_r = concatenated_forward(policy, ours)[0].unbind(1)
                variants = [("as defined", (pol_c, pol_r, ref_c, ref_r))]
                if loss_type == "ipo":  # TRL's convention: per-token averages of the log-ratios
                    variants.append(("length-normalised",
                                     (pol_c / n_c, pol_r / n_r, ref_c / n_c, ref_r / n_r)))
                for label, logps in variants:
                    losses, _, _ = preference_loss(*logps, beta=beta, loss_type=loss_type)
                    lab_loss = losses.mean()
                    lab_grad = torch.autograd.grad(lab_loss, params, retain_graph=True)
                    lab_value, trl_value = lab_loss.item(), trl_loss.item()
                    grad_diff = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(lab_grad, trl_grad,
                                                                                          strict=True)))
                    grad_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in trl_grad))
                    rows.append({"loss_type": loss_type, "beta": beta, "dpo-lab convention": label,
                                 "dpo-lab loss": lab_value, "TRL loss": trl_value,
                                 "|diff|": abs(lab_value - trl_value),
                                 "pairs with loss > 0": int((losses > 0).sum()),
                                 "grad rel. diff": grad_diff / max(grad_norm, 1e-30),
                                 "same tokens": same_tokens})
    return rows


def _same_tokens(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    """Do dpo-lab's collated batch and TRL's (each: every chosen row, then every rejected row) hold the same
    real tokens and completion masks?"""
    width = max(ours["input_ids"].shape[1], theirs["input_ids"].shape[1])
    pad = torch.nn.functional.pad
    real = pad(ours["attention_mask"], (0, width - ours["attention_mask"].shape[1])).bool()
    for key in ("input_ids", "completion_mask", "attention_mask"):
        a, b = (pad(t[key], (0, width - t[key].shape[1])) for t in (ours, theirs))
        if key == "input_ids":  # pad ids differ harmlessly; compare real tokens only
            a, b = a[real], b[real]
        if not torch.equal(a, b.to(a.dtype)):
            return False
    return True


# ------------------------------------------------------------------------------------------- workers
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured configuration in this (fresh) process: a single run or a sweep of one tool."""
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    tool, betas, steps = spec["tool"], spec["betas"], spec["steps"]
    reference, tokenizer, pairs = load_cpu_setup(steps * BATCH)  # one epoch, as the cpu preset's runs
    rss_before = current_rss_mib()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for beta in betas:
            run_start = time.perf_counter()
            if tool == "dpo-lab":
                stamps = _dpolab_run(reference, tokenizer, pairs, beta=beta, steps=steps, tmp=tmp)
            else:
                stamps = _trl_run(reference, tokenizer, pairs, beta=beta, steps=steps, tmp=tmp,
                                  precompute=tool == "trl-precompute")
            run_end = time.perf_counter()
            step_times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            runs.append({"beta": beta, "wall_s": run_end - run_start, "setup_s": stamps[0] - run_start,
                         "step_s": step_times})
        total = time.perf_counter() - start
    return {"tool": tool, "steps": steps, "total_s": total, "runs": runs, "peak_rss_mib": peak_rss_mib(),
            "rss_before_mib": rss_before, "threads": torch.get_num_threads()}


def _dpolab_run(reference: Any, tokenizer: Any, pairs: Any, *, beta: float, steps: int,
                tmp: str) -> list[float]:
    """dpo_run as pipeline.dpo calls it; returns perf_counter at the start of training and after each
    step."""
    from dpo_lab.presets import DPOConfig
    from dpo_lab.run import dpo_run

    stamps: list[float] = []

    def stamp(_policy: Any, _step: int) -> dict[str, float]:  # called at step 0 and after every step
        stamps.append(time.perf_counter())
        return {}

    config = DPOConfig(optimizer="rmsprop", lr=LR, warmup_steps=WARMUP, batch_size=BATCH,
                       micro_batch_size=BATCH, max_steps=steps, max_grad_norm=MAX_GRAD_NORM,
                       checkpoint_every=steps, eval_every=1)
    policy = copy.deepcopy(reference)
    # The reference cache lives in tmp: the first run of a sweep fills it, the next ones read it.
    dpo_run(policy, reference, tokenizer, pairs, beta=beta, config=config,
            out_dir=Path(tmp) / f"run-{beta}", seed=0, max_length=max_length_of(reference),
            ref_cache_dir=Path(tmp) / "reference-logps",
            eval_fn=stamp, progress=False)
    return stamps


def _trl_run(reference: Any, tokenizer: Any, pairs: Any, *, beta: float, steps: int, tmp: str,
             precompute: bool) -> list[float]:
    """One TRL run as a user writes it (a new trainer per beta), then save_model like dpo-lab's final
    checkpoint; returns perf_counter at the start of training and after each step."""
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    out_dir = str(Path(tmp) / f"trl-{beta}")
    ref_model = None if precompute else copy.deepcopy(reference)
    trainer = trl_trainer(copy.deepcopy(reference), ref_model, tokenizer, pairs, beta=beta, max_steps=steps,
                          out_dir=out_dir, precompute=precompute,
                          callbacks=[Stamp()])
    trainer.train()
    trainer.save_model(out_dir)
    return stamps


# ---------------------------------------------------------------------------------------------- driver
def steady_pairs_per_s(step_s: list[float]) -> float:
    timed = step_s[WARMUP_STEPS_EXCLUDED:] or step_s
    return BATCH / median(timed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (~1-2 min)")
    parser.add_argument("--steps", type=int, help="optimizer steps of a single run (default 24, quick 8)")
    parser.add_argument("--sweep-steps", type=int, help="steps of each sweep run (default 16, quick 5)")
    parser.add_argument("--repeats", type=int, help="single-run repeats per tool (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in the workers (default: torch's)")
    parser.add_argument("--skip-check", action="store_true", help="skip the loss check")
    parser.add_argument("--skip-sweep", action="store_true", help="skip the 4-beta sweep")
    parser.add_argument("--json", type=Path, help="also write every raw measurement to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        emit_result(worker(json.loads(args.worker)))
        return
    steps = args.steps or (8 if args.quick else 24)
    sweep_steps = args.sweep_steps or (5 if args.quick else 16)
    repeats = args.repeats or (1 if args.quick else 3)
    if steps <= WARMUP_STEPS_EXCLUDED:
        parser.error(f"--steps must be > {WARMUP_STEPS_EXCLUDED} (the warm-up steps left out of pairs/s)")
    if args.threads:
        torch.set_num_threads(args.threads)
    raw: dict[str, Any] = {"machine": machine_info()}
    print("# DPO training: dpo-lab vs TRL on this CPU\n")
    print(describe_machine(raw["machine"]))
    print(f"\nbatch {BATCH} pairs, RMSprop lr {LR:g} (warmup {WARMUP}), clip {MAX_GRAD_NORM:g}, fp32, "
          "cpu-preset GPT-2 and pairs")

    if not args.skip_check:
        print("\n## 1. Same batch, same loss? (16 pairs, policy = reference + N(0, 0.02) noise)\n")
        rows = loss_check()
        raw["loss_check"] = rows
        print(markdown_table(rows, ["loss_type", "beta", "dpo-lab convention", "dpo-lab loss", "TRL loss",
                                    "|diff|", "grad rel. diff", "pairs with loss > 0", "same tokens"]))

    print(f"\n## 2. One run: {steps} steps x {BATCH} pairs, {repeats} repeat(s), a fresh process each\n")
    singles: dict[str, list[dict[str, Any]]] = {t: [] for t in TOOLS}
    for r in range(repeats):
        order = TOOLS[r % len(TOOLS):] + TOOLS[:r % len(TOOLS)]  # rotate: load drifts hit every tool
        for tool in order:
            singles[tool].append(run_worker(SCRIPT, {"tool": tool, "betas": [0.1], "steps": steps,
                                                     "threads": args.threads}))
    raw["single"] = singles
    rows = []
    for tool in TOOLS:
        pps = [steady_pairs_per_s(res["runs"][0]["step_s"]) for res in singles[tool]]
        rows.append({"tool": tool, "pairs/s (steady)": spread(pps), "_pps": median(pps),
                     "run wall s (incl. set-up)": spread([res["runs"][0]["wall_s"] for res in singles[tool]]),
                     "set-up s": spread([res["runs"][0]["setup_s"] for res in singles[tool]]),
                     "peak RSS MiB": spread([res["peak_rss_mib"] for res in singles[tool]]),
                     "RSS before MiB": spread([res["rss_before_mib"] for res in singles[tool]])})
    base = rows[0]["_pps"]
    for row in rows:
        row["dpo-lab speed-up"] = f"{base / row['_pps']:.2f}x"
    print(markdown_table(rows, ["tool", "pairs/s (steady)", "dpo-lab speed-up", "run wall s (incl. set-up)",
                                "set-up s", "peak RSS MiB", "RSS before MiB"]))
    print("\n(median [min-max] over repeats; pairs/s = batch / median step time, first "
          f"{WARMUP_STEPS_EXCLUDED} steps left out; set-up = call start to first step: dpo-lab computes the "
          "reference log-probs there, TRL-precompute in its constructor; RSS before = after imports and "
          "model/data load)")

    if not args.skip_sweep:
        print(f"\n## 3. A 4-beta sweep {SWEEP_BETAS}: 4 runs x {sweep_steps} steps, one process per tool\n")
        sweeps = {}
        for tool in TOOLS:
            sweeps[tool] = run_worker(SCRIPT, {"tool": tool, "betas": list(SWEEP_BETAS), "steps": sweep_steps,
                                               "threads": args.threads})
        raw["sweep"] = sweeps
        base_s = sweeps["dpo-lab"]["total_s"]
        rows = [{"tool": tool, "sweep wall s": res["total_s"],
                 "per run s": " / ".join(f"{run['wall_s']:.1f}" for run in res["runs"]),
                 "set-up per run s": " / ".join(f"{run['setup_s']:.1f}" for run in res["runs"]),
                 "dpo-lab speed-up": f"{res['total_s'] / base_s:.2f}x"} for tool, res in sweeps.items()]
        print(markdown_table(rows, ["tool", "sweep wall s", "dpo-lab speed-up", "per run s",
                                    "set-up per run s"]))
    print(f"\nload average at the end: {[round(x, 2) for x in load_average()]}")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
