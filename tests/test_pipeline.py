"""The smoke reproduction end to end: data -> SFT -> r* -> pairs -> every method's runs -> figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from dpo_lab import pipeline
from dpo_lab.presets import get_preset, project_root
from dpo_lab.reproduce import reproduce
from dpo_lab.run import read_metrics


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_LAB_ARTIFACTS", str(root / "artifacts"))
        mp.setenv("DPO_LAB_FIGURES", str(root / "figures"))
        summary = reproduce(get_preset("smoke"), progress=False)
    return root / "artifacts", root / "figures", summary


def test_reproduce_writes_every_series(smoke_run):
    _, figures, summary = smoke_run
    points = pd.read_csv(figures / "frontier_smoke_points.csv")
    assert set(points.method) == set(pipeline.METHODS)
    assert (points.step == 0).sum() == len(pipeline.frontier_runs(get_preset("smoke")))
    # Every run starts from the same SFT policy, evaluated with the same seed: one shared starting point.
    assert points[points.step == 0].reward_mean.nunique() == 1
    assert points[points.step == 0].kl_mean.abs().max() < 1e-6
    assert len(list((smoke_run[0] / "start-eval").glob("*.json"))) == 1  # ...evaluated once, then shared
    assert (figures / "frontier_smoke.png").stat().st_size > 10_000
    assert summary["pairs"]["n_pairs"] > 0 and summary["runs"]["DPO"] == 2
    assert set(summary["dominance"]) == {"PPO", "PPO-GT", "PPO + PPO-GT"}
    # The audit scores every point beside r*, and the dominance is counted under it too.
    audit = [f"{name}_{stat}" for name in ("audit_sentiment", "audit_fluency", "distinct_words")
             for stat in ("mean", "se")]
    assert points[audit].notna().all().all()
    assert ((points.audit_sentiment_mean >= 0) & (points.audit_sentiment_mean <= 1)).all()
    assert (points.audit_fluency_mean < 0).all() and (points.distinct_words_mean <= 1).all()
    assert set(summary["dominance_audit"]) == set(summary["dominance"])
    assert (figures / "frontier_smoke_audit.png").stat().st_size > 10_000
    assert summary["audit"]["n_reviews"] == get_preset("smoke").data.audit_reviews
    assert 0 <= summary["learned_reward"]["audit_test_accuracy"] <= 1 and "torch" in summary["machine"]
    assert json.loads((figures / "summary_smoke.json").read_text())["points"] == len(points)


def test_dpo_starts_at_log2_and_logs_trl_metrics(smoke_run):
    preset = get_preset("smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_LAB_ARTIFACTS", str(smoke_run[0]))
        records = read_metrics(pipeline.run_dir(preset, "DPO", 0.1) / "metrics.jsonl")
    first = next(r for r in records if r["step"] == 1)
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert key in first
    assert [r["step"] for r in records] == list(range(preset.dpo.max_steps + 1))


def test_second_run_reuses_every_artefact(smoke_run):
    artifacts, figures, _ = smoke_run
    metrics = sorted(artifacts.glob("training/*/metrics.jsonl"))
    assert len(metrics) == len(pipeline.frontier_runs(get_preset("smoke")))
    before = {p: p.read_bytes() for p in metrics}
    folders = sorted(artifacts.rglob("*"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_LAB_ARTIFACTS", str(artifacts))
        mp.setenv("DPO_LAB_FIGURES", str(figures))
        summary = reproduce(get_preset("smoke"), progress=False)
    assert {p: p.read_bytes() for p in metrics} == before  # nothing retrained, nothing appended
    assert sorted(artifacts.rglob("*")) == folders  # no stage rebuilt under a new key
    assert summary["points"] == len(pd.read_csv(figures / "frontier_smoke_points.csv"))


def test_runs_trained_by_two_workers_match_one_process(smoke_run, tmp_path: Path):
    """``workers=2`` trains runs in two single-thread processes: the same runs, the same points up to the
    float rounding of another thread count, and a failure in a worker is raised in the caller."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for stage in smoke_run[0].iterdir():  # the shared stages only: every run is trained again
        if stage.name not in ("training", "start-eval") and stage.is_dir():
            subprocess.run(["cp", "-r", str(stage), str(artifacts)], check=True)
    methods = ("DPO", "PPO-GT")
    preset = get_preset("smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_LAB_ARTIFACTS", str(artifacts))
        timings: dict[str, float] = {}
        points = pipeline.frontier(preset, methods, progress=False, workers=2, timings=timings)
        assert len(list((artifacts / "training").iterdir())) == len(pipeline.frontier_runs(preset, methods))
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            pipeline.frontier(preset, methods, workers=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_LAB_ARTIFACTS", str(smoke_run[0]))
        alone = pipeline.frontier(preset, methods, progress=False)
    assert set(timings) == set(methods) and all(t > 0 for t in timings.values())
    assert list(points.hyperparameter) == list(alone.hyperparameter)
    assert list(points.step) == list(alone.step)
    assert points.reward_mean.to_numpy() == pytest.approx(alone.reward_mean.to_numpy(), abs=0.05)
    assert points.kl_mean.to_numpy() == pytest.approx(alone.kl_mean.to_numpy(), rel=0.1, abs=0.05)


def test_changed_setting_changes_only_downstream_keys():
    base = get_preset("smoke")
    other = get_preset("smoke", **{"dpo.lr": 1e-3})
    assert pipeline.sft_key(base) == pipeline.sft_key(other)
    assert pipeline.preferences_key(base) == pipeline.preferences_key(other)
    assert pipeline.run_dir(base, "DPO", 0.1) != pipeline.run_dir(other, "DPO", 0.1)
    assert pipeline.run_dir(base, "PPO", 1.0) == pipeline.run_dir(other, "PPO", 1.0)
    assert pipeline.sft_key(base) != pipeline.sft_key(get_preset("smoke", **{"policy.n_layer": 3}))
    longer = get_preset("smoke", **{"dpo.max_steps": 99, "ppo.eval_every": 2})  # same runs, continued
    assert pipeline.run_dir(base, "DPO", 0.1) == pipeline.run_dir(longer, "DPO", 0.1)
    assert pipeline.run_dir(base, "PPO-GT", 1.0) == pipeline.run_dir(longer, "PPO-GT", 1.0)


def test_seeds_share_the_split_and_the_judge_and_differ_in_sft_and_pairs(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DPO_LAB_ARTIFACTS", str(tmp_path))
    zero, one = get_preset("smoke"), get_preset("smoke", seed=1)
    data, other = pipeline.imdb(zero), pipeline.imdb(one)
    assert list(data) == list(pipeline.SPLITS)
    for split in pipeline.SPLITS:  # one split for every seed ...
        assert data[split]["text"] == other[split]["text"]
    texts = {split: set(data[split]["text"]) for split in pipeline.SPLITS}
    for i, a in enumerate(pipeline.SPLITS):  # ... of four disjoint sets of reviews
        for b in pipeline.SPLITS[i + 1:]:
            assert not texts[a] & texts[b], (a, b)
    assert len(data["audit"]) == zero.data.audit_reviews
    assert pipeline.reward_key(zero) == pipeline.reward_key(one)  # one judge
    assert pipeline.sft_key(zero) != pipeline.sft_key(one)
    (sft0, tok0, _), (sft1, tok1, _) = pipeline.sft_policy(zero), pipeline.sft_policy(one)
    assert not torch.equal(sft0.transformer.wte.weight, sft1.transformer.wte.weight)
    for split in ("train", "validation", "test"):  # the same prompts, whatever the seed
        assert pipeline.prompts(zero, tok0, split) == pipeline.prompts(one, tok1, split)
    pairs0, pairs1 = pipeline.preference_data(zero)[0], pipeline.preference_data(one)[0]
    assert set(pairs0["prompt"]) | set(pairs1["prompt"]) <= set(pipeline.prompts(zero, tok0, "train"))
    assert pairs0["chosen"] != pairs1["chosen"]
    with pytest.raises(ValueError, match="split must be"):
        pipeline.prompts(zero, tok0, "audit")


def test_a_tuning_run_reads_the_validation_prompts_in_its_own_folder(smoke_run, monkeypatch):
    monkeypatch.setenv("DPO_LAB_ARTIFACTS", str(smoke_run[0]))
    preset = get_preset("smoke")
    assert pipeline.run_dir(preset, "DPO", 0.1, "validation") != pipeline.run_dir(preset, "DPO", 0.1)
    assert pipeline.run_dir(preset, "PPO", 1.0, "test") == pipeline.run_dir(preset, "PPO", 1.0)
    seen = {}
    monkeypatch.setattr(pipeline, "make_eval_fn",
                        lambda ref, tok, prompts, *a, **k: seen.setdefault("p", prompts))
    sft, tokenizer, _ = pipeline.sft_policy(preset)
    pipeline.run_eval_fn(preset, sft, tokenizer, split="validation", from_sft=False)
    validation = pipeline.prompts(preset, tokenizer, "validation")
    assert seen["p"] == validation != pipeline.prompts(preset, tokenizer, "test")


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="DPOO"):
        pipeline.frontier_runs(get_preset("smoke"), ("DPOO",))


def test_killed_reproduction_finishes_on_rerun(tmp_path: Path) -> None:
    """Kill the main job in the middle of a run; starting it again keeps what finished and completes."""
    env = {**os.environ, "DPO_LAB_ARTIFACTS": str(tmp_path / "artifacts"),
           "DPO_LAB_FIGURES": str(tmp_path / "figures")}
    proc = subprocess.Popen([sys.executable, "-m", "dpo_lab", "reproduce", "--preset", "smoke"], env=env,
                            cwd=project_root(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "artifacts" / "training"
    deadline = time.monotonic() + 180
    while (len(list(runs.glob("*/result.json"))) < 1 or len(list(runs.glob("*/checkpoints/*"))) < 2) \
            and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in runs.glob("*/result.json")}
    assert 1 <= len(finished) < len(pipeline.frontier_runs(get_preset("smoke"))), "not killed mid-sweep"
    assert not (tmp_path / "figures" / "summary_smoke.json").exists()

    with pytest.MonkeyPatch.context() as mp:
        for key in ("DPO_LAB_ARTIFACTS", "DPO_LAB_FIGURES"):
            mp.setenv(key, env[key])
        summary = reproduce(get_preset("smoke"), progress=False)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished runs were not redone
    results = sorted(runs.glob("*/result.json"))
    assert len(results) == len(pipeline.frontier_runs(get_preset("smoke")))
    for result in results:  # every run's log holds each step once, in order, up to its last step
        steps = [r["step"] for r in read_metrics(result.parent / "metrics.jsonl")]
        assert steps == list(range(json.loads(result.read_text())["steps"] + 1)), result.parent.name
    points = pd.read_csv(tmp_path / "figures" / "frontier_smoke_points.csv")
    assert summary["points"] == len(points)
    assert not points.duplicated(["method", "hyperparameter", "step"]).any()


def test_run_work_predicts_each_methods_measured_time():
    """The progress bar's weights: every method's logged run seconds in the last cpu reproduction from
    empty caches, divided by its predicted work, give the same rate within 15% (so the ETA does not drift as
    the stage moves from PPO runs to DPO runs)."""
    preset = get_preset("cpu")
    fresh = project_root() / "figures" / "cost_cpu_fresh_clone.json"  # summary_cpu.json: maybe a cached rerun
    timings = json.loads(fresh.read_text())["timings_s"]
    rates = {}
    for method in pipeline.METHODS:
        work = sum(pipeline.run_work(preset, m) for m, _ in pipeline.frontier_runs(preset, (method,)))
        if method == "PPO":  # its first run trains r_phi
            work += pipeline.run_work(preset, "r_phi")
        rates[method] = work / timings[f"runs: {method}"]
    mean = sum(rates.values()) / len(rates)
    assert all(abs(rate / mean - 1) < 0.15 for rate in rates.values()), rates


def test_reward_model_training_reports_its_last_step(smoke_run, monkeypatch):
    monkeypatch.setenv("DPO_LAB_ARTIFACTS", str(smoke_run[0]))
    report = json.loads(pipeline._reward_model_progress(get_preset("smoke")).read_text())
    assert report["step"] == report["total"] > 0  # what the frontier's progress bar reads meanwhile


def test_pool_progress_counts_new_work_and_names_running_runs(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("DPO_LAB_ARTIFACTS", str(tmp_path))
    preset = get_preset("smoke")
    runs = pipeline.frontier_runs(preset, ("DPO", "PPO"))
    work = {m: pipeline.run_work(preset, m) for m in ("DPO", "PPO", "r_phi")}

    def log_steps(run: tuple[str, float], last: int, partial: bool = False) -> None:
        folder = pipeline.run_dir(preset, *run)
        folder.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(last + 1))
        (folder / "metrics.jsonl").write_text(lines + ('{"step": 9' if partial else ""))

    # A run finished before the stage started counts for nothing.
    finished_before, running = runs[0], runs[-1]
    log_steps(finished_before, pipeline.run_steps(preset, "DPO"))
    watch = pipeline._PoolProgress(preset, runs, disable=False)
    assert watch.bar.total == pytest.approx(sum(work[m] for m, _ in runs[1:]) + work["r_phi"])
    pipeline.atomic_write_json(pipeline._reward_model_progress(preset), {"step": 5, "total": 10})
    watch.update([running], set())  # r_phi half trained, reported by its trainer
    assert watch.bar.n == pytest.approx(work["r_phi"] / 2)
    steps = pipeline.run_steps(preset, "PPO")
    log_steps(running, steps // 2, partial=True)  # a worker mid-way through writing a line
    watch.update([running], set())  # a PPO run past step 0: r_phi is trained
    assert watch.bar.n == pytest.approx(work["r_phi"] + work["PPO"] * (steps // 2) / steps)
    watch.update([], set(runs))
    assert watch.bar.n == pytest.approx(watch.bar.total)
    watch.bar.close()
    shown = capsys.readouterr().err
    assert f"PPO target_kl={running[1]:g}: {steps // 2}/{steps}" in shown and "100%" in shown


def test_cli_workers_default_to_the_cores_and_refuse_zero(capsys):
    import torch

    from dpo_lab.__main__ import main

    expected = 2 if torch.cuda.is_available() else len(os.sched_getaffinity(0))
    assert pipeline.default_workers() == expected
    with pytest.raises(SystemExit):
        main(["reproduce", "--preset", "smoke", "--workers", "0"])
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
