"""Samples behind the frontier's numbers: one completion of each of the first N test prompts from the final
policy of chosen runs, scored by r* and the audit's sentiment classifier, with each text's distinct-word
ratio. Writes a markdown table (README, "The audit"); reads the cached stages and runs only.

    .venv/bin/python scripts/frontier_samples.py --preset cpu --n 6 --out figures/samples_cpu.md \
        "DPO=0.1" "PPO-GT=12" "PPO=12"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dpo_lab import labs, pipeline
from dpo_lab.audit import distinct_word_ratio
from dpo_lab.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="METHOD=VALUE, e.g. DPO=0.1 PPO-GT=12")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--n", type=int, default=6, help="test prompts (the first N)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    preset = get_preset(args.preset)
    _, tokenizer, _ = pipeline.sft_policy(preset, progress=False)
    runs = {}
    for spec in args.runs:
        method, value = spec.split("=", 1)
        runs[spec] = pipeline.result(preset, method, float(value), progress=False)
    reward, _ = pipeline.reward_model(preset)
    sentiment, _, _ = pipeline.audit_judges(preset, progress=False)
    rows = labs.final_samples(preset, runs, tokenizer, args.n, {"r*": reward, "audit sentiment": sentiment})
    ratios = distinct_word_ratio([row["text"] for row in rows])
    lines = ["| run | prompt + completion | r* | audit sentiment | distinct-word ratio (whole text) |",
             "|---|---|---|---|---|"]
    for row, ratio in zip(rows, ratios, strict=True):
        text = row["text"].replace("|", "\\|").replace("\n", " ")
        scores = f"{row['r*']:.3f} | {row['audit sentiment']:.3f} | {ratio:.2f}"
        lines.append(f"| {row['run']} | {text} | {scores} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
