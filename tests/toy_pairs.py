"""A toy preference set shared by the trainer tests: 16 pairs whose chosen side is plainly positive."""

from dpo_lab.presets import DPOConfig

GOOD = [" great, I loved it", " wonderful and moving", " an excellent cast", " brilliant music"]
BAD = [" awful and boring", " a waste of time", " the worst ever", " a weak script"]
PROMPTS = ["This movie was", "The film", "I think it is", "The acting"]
PAIRS = {
    "prompt": [p for p in PROMPTS for _ in GOOD],
    "chosen": [g for _ in PROMPTS for g in GOOD],
    "rejected": [b for _ in PROMPTS for b in BAD],
}
# Tiny runs: 6 steps of 4 pairs, checkpoints and evaluations every 2 steps.
CONFIG = DPOConfig(optimizer="adamw", lr=3e-3, warmup_steps=2, batch_size=4, micro_batch_size=2, max_steps=6,
                   checkpoint_every=2, eval_every=2, max_grad_norm=10.0)
