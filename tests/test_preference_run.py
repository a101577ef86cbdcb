"""The TL;DR / HH run notebook end to end (papermill, fixtures, a tiny local model), its helpers in
dpo_lab.scale.hub_tasks, and the paper sweep specs checked against the notebook's parameters cell."""

from __future__ import annotations

import json
import math
from pathlib import Path

import papermill as pm
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpo_lab.run import read_metrics
from dpo_lab.scale import hub_tasks, sweep

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "templates" / "preference_dpo.ipynb"
SPECS = {"tldr": ROOT / "sweeps" / "tldr_paper.yaml", "hh": ROOT / "sweeps" / "hh_paper.yaml"}
MAX_LENGTH = 192


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny GPT-2 + tokenizer saved as a hub folder would be (safetensors)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tiny_tokenizer.eos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny_sft")
    GPT2LMHeadModel(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _prompt_lengths(tokenizer, task: str) -> list[int]:
    pairs, _ = hub_tasks.load_task_pairs(task, "train", data_dir="fixtures", progress=False)
    return [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pairs["prompt"]]


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **parameters) -> tuple[dict, list[dict], Path]:
    # The kernel inherits os.environ: the root conftest's offline/quiet settings, and a scratch artifacts dir.
    monkeypatch.setenv("DPO_LAB_ARTIFACTS", str(tmp_path / "artifacts"))
    run_dir = tmp_path / "run"
    pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "out.ipynb"), kernel_name="python3",
                        progress_bar=False, cwd=str(ROOT), parameters={**parameters, "run_dir": str(run_dir)})
    result = json.loads((run_dir / "result.json").read_text())
    return result, read_metrics(run_dir / "metrics.jsonl"), run_dir


def _check_common(result: dict, metrics: list[dict], run_dir: Path, steps: int) -> None:
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in result.values()), result
    assert result["steps"] == steps
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == list(range(1, steps + 1))
    # Policy == reference at step 1 (dropout off): every implicit reward is 0 and the loss is log 2 (Eq. 7).
    assert result["loss_step1"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(train[0]["rewards/margins"]) < 1e-5
    evals = [m for m in metrics if "eval_loss" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == steps
    assert result["eval_loss_start"] == pytest.approx(math.log(2), abs=1e-5)
    # A high lr on a few pairs: DPO must separate the training pairs it sees.
    assert train[-1]["rewards/margins"] > 0 and result["final_loss"] < math.log(2)
    assert (run_dir / "curves.png").stat().st_size > 0


def test_tldr_run_on_fixtures(tmp_path, monkeypatch, tiny_model_dir, tiny_tokenizer):
    lengths = _prompt_lengths(tiny_tokenizer, "tldr")
    limit = max(lengths) - 1  # exactly the longest prompt(s) must be dropped
    result, metrics, run_dir = _run(
        tmp_path, monkeypatch, task="tldr", model=str(tiny_model_dir), data_dir="fixtures", lr=1e-3,
        warmup_steps=0, batch_size=2, micro_batch_size=1, max_steps=4, max_length=MAX_LENGTH,
        max_prompt_length=limit, eval_every=2)
    _check_common(result, metrics, run_dir, steps=4)
    n_long = sum(n > limit for n in lengths)
    assert result["n_long_prompts"] == n_long >= 1
    assert result["n_train_pairs"] == len(lengths) - n_long
    assert result["beta"] == 0.5 and result["task"] == "tldr"  # beta=0: the paper's TL;DR value
    assert result["n_eval_pairs"] == 2  # the fixture's validation split


def test_hh_run_exports_a_loadable_policy(tmp_path, monkeypatch, tiny_model_dir, tiny_tokenizer):
    lengths = _prompt_lengths(tiny_tokenizer, "hh")
    limit = 64
    result, metrics, run_dir = _run(
        tmp_path, monkeypatch, task="hh", model=str(tiny_model_dir), data_dir="fixtures", lr=1e-3,
        warmup_steps=0, batch_size=2, micro_batch_size=2, max_steps=3, max_length=MAX_LENGTH,
        max_prompt_length=limit, long_prompts="keep_end", eval_every=5, export_policy=True)
    _check_common(result, metrics, run_dir, steps=3)
    assert result["beta"] == 0.1 and result["n_train_pairs"] == len(lengths)  # keep_end drops nothing
    assert result["n_long_prompts"] == sum(n > limit for n in lengths) >= 1
    # The exported policy is what the HH sweep's DPO run loads as its SFT model and reference.
    policy, reference, _ = hub_tasks.load_models(result["policy_dir"], max_length=MAX_LENGTH)
    start, _, _ = hub_tasks.load_models(str(tiny_model_dir), max_length=MAX_LENGTH)
    moved = [not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), start.state_dict().values(),
                                                   strict=True)]
    assert any(moved)
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(),
                                                  reference.state_dict().values(), strict=True))


# ------------------------------------------------------------------------------------------ hub_tasks
def test_fit_prompts_drop_and_keep_end(tiny_tokenizer):
    pairs, _ = hub_tasks.load_task_pairs("hh", "train", data_dir="fixtures", progress=False)
    lengths = [len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pairs["prompt"]]
    limit = sorted(lengths)[-1] - 1
    dropped, n = hub_tasks.fit_prompts(pairs, tiny_tokenizer, max_prompt_length=limit, max_length=200)
    assert n == sum(x > limit for x in lengths) and len(dropped) == len(pairs) - n
    cut, n_cut = hub_tasks.fit_prompts(pairs, tiny_tokenizer, max_prompt_length=limit, max_length=200,
                                       how="keep_end")
    assert n_cut == n and len(cut) == len(pairs)
    longest = lengths.index(max(lengths))
    assert pairs["prompt"][longest].endswith(cut["prompt"][longest])  # the end of the dialogue is kept
    assert cut["prompt"][longest].endswith("Assistant:")
    with pytest.raises(ValueError, match="how must be"):
        hub_tasks.fit_prompts(pairs, tiny_tokenizer, max_prompt_length=10, max_length=200, how="trim")
    with pytest.raises(ValueError, match="must be < max_length"):
        hub_tasks.fit_prompts(pairs, tiny_tokenizer, max_prompt_length=200, max_length=200)
    with pytest.raises(ValueError, match="every prompt is longer"):
        hub_tasks.fit_prompts(pairs, tiny_tokenizer, max_prompt_length=2, max_length=200)


def test_load_task_pairs_subset_and_bad_input():
    full, stats = hub_tasks.load_task_pairs("tldr", "train", data_dir="fixtures", progress=False)
    assert stats["used"] == len(full) == 3
    sub, sub_stats = hub_tasks.load_task_pairs("tldr", "train", data_dir="fixtures", max_pairs=2, seed=1,
                                               progress=False)
    again, _ = hub_tasks.load_task_pairs("tldr", "train", data_dir="fixtures", max_pairs=2, seed=1,
                                         progress=False)
    assert sub_stats["used"] == 2 and sub["prompt"] == again["prompt"]
    assert set(sub["prompt"]) <= set(full["prompt"])
    with pytest.raises(ValueError, match="unknown task"):
        hub_tasks.load_task_pairs("imdb", "train", data_dir="fixtures")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub_tasks.load_task_pairs("hh", "train", data_dir="no/such/folder")
    with pytest.raises(ValueError, match="max_pairs"):
        hub_tasks.load_task_pairs("hh", "train", data_dir="fixtures", max_pairs=-1)
    assert hub_tasks.resolve_data_dir("hh", "") is None  # the hub


def test_run_summary_is_flat_and_rejects_non_scalars():
    metrics = [{"step": 0, "eval_loss": 0.69, "eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0}]
    metrics += [{"step": s, "loss": 0.7 - 0.01 * s, "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5,
                 "rewards/chosen": 0.0, "rewards/rejected": -0.1 * s} for s in range(1, 21)]
    out = hub_tasks.run_summary(metrics, task="hh")
    assert out["steps"] == 20 and out["loss_step1"] == pytest.approx(0.69)
    assert out["final_rewards_margins"] == pytest.approx((1.9 + 2.0) / 2)  # mean of the last 10% of steps
    assert out["eval_loss_start"] == out["eval_loss_end"] == 0.69
    assert all("/" not in k for k in out)
    with pytest.raises(TypeError, match="scalars"):
        hub_tasks.run_summary(metrics, betas=[0.1, 0.5])
    with pytest.raises(ValueError, match="no training steps"):
        hub_tasks.run_summary(metrics[:1])


def test_load_models_rejects_a_context_too_short(tiny_model_dir):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        hub_tasks.load_models(str(tiny_model_dir), max_length=4096)
    with pytest.raises(ValueError, match="tiny_texts"):
        hub_tasks.load_models("")
    with pytest.raises(FileNotFoundError, match="not a folder holding config.json"):
        hub_tasks.load_models("runs/hh-paper/sft-chosen/policy")  # before the HH reference run exported it


# ---------------------------------------------------------------------------------------- sweep specs
@pytest.mark.parametrize("task", sorted(SPECS))
def test_sweep_spec_matches_the_notebook_and_the_paper(task):
    """The runner's own validation (names and types against the notebook's parameters cell), then the
    paper's settings (App. B), so that a spec cannot drift from either unnoticed."""
    spec = sweep.load_spec(SPECS[task])
    assert sweep.validate_spec(spec) == NOTEBOOK
    assert spec.requires == ("gpu", "hub")
    for run in spec.runs:
        params = run.parameters
        assert params["task"] == task and params["data_dir"] == ""
        assert (params["lr"], params["batch_size"], params["warmup_steps"]) == (1e-6, 64, 150)
    dpo_runs = [r for r in spec.runs if r.parameters.get("objective", "dpo") == "dpo"]
    assert dpo_runs and all(r.parameters["beta"] == hub_tasks.PAPER[task]["beta"] for r in dpo_runs)
    if task == "tldr":
        assert all(r.parameters["model"] == "CarperAI/openai_summarize_tldr_sft" for r in spec.runs)
    else:
        # HH: pi_ref is Preferred-FT of Pythia-2.8B on the chosen responses, made by the first run and
        # loaded from its exported policy by the DPO run, which waits for it.
        first = spec.runs[0]
        assert first.parameters["objective"] == "preferred_ft" and first.parameters["export_policy"] is True
        assert first.parameters["model"] == "EleutherAI/pythia-2.8b"
        assert all(r.parameters["model"] == f"{{sweep_dir}}/{first.name}/policy" and r.after == (first.name,)
                   for r in dpo_runs)
