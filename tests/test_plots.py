import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest

from dpo_lab.frontier import dominance, dominance_counts
from dpo_lab.plots import (
    plot_frontier,
    plot_proxy_and_gold,
    plot_reward_vs_cost,
    upper_envelope,
)


def _points(rows):
    return pd.DataFrame(rows, columns=["method", "step", "kl_mean", "reward_mean"])


def test_dominance_counts_points_beaten_on_both_axes():
    points = _points([
        ("DPO", 0, 0.0, 0.5), ("DPO", 1, 2.0, 0.9), ("DPO", 2, 5.0, 0.95),
        ("PPO", 0, 0.0, 0.5),      # start: excluded
        ("PPO", 1, 3.0, 0.7),      # beaten by (2.0, 0.9)
        ("PPO", 2, 6.0, 0.96),     # not beaten: higher reward than every DPO point
        ("PPO", 3, 1.0, 0.6),      # not beaten: lower KL than every DPO point past the start
        ("PPO-GT", 1, 10.0, 0.9),  # beaten by (5.0, 0.95)
    ])
    assert dominance(points, others=["PPO"]) == (1, 3)
    assert dominance(points, others=["PPO", "PPO-GT"]) == (2, 4)


def test_identical_points_count_once_and_noise_aware_needs_a_margin():
    points = _points([("DPO", 1, 2.0, 0.9), ("PPO", 1, 3.0, 0.85),
                      ("PPO", 1, 3.0, 0.85),  # a second run that took the same path: counted once
                      ("PPO", 2, 4.0, 0.7)])
    assert dominance(points) == (2, 2)
    points["reward_se"] = [0.04, 0.04, 0.04, 0.04]  # gap 0.05 < sqrt(2) x 0.04; gap 0.2 is well beyond it
    assert dominance(points, noise_aware=True) == (1, 2)
    with pytest.raises(ValueError, match="reward_se"):
        dominance(points.drop(columns="reward_se"), noise_aware=True)


def test_dominance_reads_another_score_and_both_directions():
    points = _points([("DPO", 1, 2.0, 0.9), ("DPO", 2, 6.0, 0.92), ("PPO", 1, 3.0, 0.8),
                      ("PPO", 2, 5.0, 0.95), ("PPO-GT", 1, 4.0, 0.7)])
    points["audit_sentiment_mean"] = [0.6, 0.7, 0.65, 0.9, 0.5]  # the audit likes PPO's first point more
    assert dominance(points) == (1, 2) and dominance(points, score="audit_sentiment") == (0, 2)
    assert dominance(points, challenger=("PPO",), others=("DPO",)) == (1, 2)  # (5, 0.95) beats (6, 0.92)
    ppo = dominance_counts(points, "audit_sentiment")["PPO"]
    assert (ppo["dominated"], ppo["dpo_dominated"], ppo["dpo_total"]) == (0, 1, 2)
    counts = dominance_counts(points, "audit_sentiment")
    assert counts["PPO + PPO-GT"]["total"] == 3 and counts["PPO-GT"]["dominated"] == 1
    with pytest.raises(ValueError, match="audit_fluency_mean"):
        dominance(points, score="audit_fluency")


def test_ties_do_not_dominate():
    points = _points([("DPO", 1, 2.0, 0.9), ("PPO", 1, 2.0, 0.8), ("PPO", 2, 3.0, 0.9)])
    assert dominance(points) == (0, 2)


def test_dominance_without_challenger_points():
    assert dominance(_points([("PPO", 1, 1.0, 0.5)])) == (0, 1)


def test_missing_column_is_named():
    with pytest.raises(ValueError, match="kl_mean"):
        dominance(pd.DataFrame({"method": ["DPO"], "step": [1], "reward_mean": [0.5]}))


def test_upper_envelope_keeps_only_pareto_points():
    xs, ys = upper_envelope([1.0, 2.0, 3.0, 2.5], [0.5, 0.8, 0.7, 0.9])
    assert xs.tolist() == [1.0, 2.0, 2.5] and ys.tolist() == [0.5, 0.8, 0.9]


def test_plot_frontier_writes_a_figure(tmp_path):
    points = _points([("DPO", 0, 0.0, 0.5), ("DPO", 1, 2.0, 0.9), ("PPO", 1, 3.0, 0.7)])
    fig = plot_frontier(points, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"DPO", "PPO", "SFT (start)"}


def test_plot_frontier_draws_standard_errors_when_the_points_have_them():
    points = _points([("DPO", 0, 0.0, 0.5), ("DPO", 1, 2.0, 0.9), ("PPO", 1, 3.0, 0.7)])
    assert not plot_frontier(points).axes[0].containers  # no SE columns: no error bars
    points["reward_se"], points["kl_se"] = [0.0, 0.02, 0.03], [0.0, 0.1, 0.2]
    bars = plot_frontier(points).axes[0].containers
    assert len(bars) == 2  # one per method, the start excluded
    xbar, ybar = bars[0].lines[2]  # ErrorbarContainer: (data line, caps, (x bars, y bars))
    ys = ybar.get_segments()[0][:, 1]
    assert np.allclose(sorted(ys), [0.88, 0.92])  # DPO's point: 0.9 +- 0.02
    assert np.allclose(sorted(xbar.get_segments()[0][:, 0]), [1.9, 2.1])


def test_label_runs_names_each_run(tmp_path):
    points = _points([("DPO", 0, 0.0, 0.5), ("DPO", 1, 2.0, 0.9), ("DPO", 0, 0.0, 0.5), ("DPO", 1, 1.0, 0.7)])
    points["hyperparameter"] = ["beta=0.1", "beta=0.1", "beta=1", "beta=1"]
    fig = plot_frontier(points, label_runs=True)
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["beta=0.1", "beta=1"]


def test_reward_vs_cost_draws_one_line_per_run_per_cost(tmp_path):
    points = _points([("DPO", 0, 0.0, 0.5), ("DPO", 10, 1.0, 0.7),
                      ("PPO", 0, 0.0, 0.5), ("PPO", 10, 2.0, 0.6)])
    points["hyperparameter"] = ["beta=0.1", "beta=0.1", "target_kl=3", "target_kl=3"]
    points["cost/policy_backward_tokens"] = [0, 1000, 0, 4000]
    points["cost/wall_s"] = [0.0, 5.0, 0.0, 20.0]
    fig = plot_reward_vs_cost(points, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 1000
    left, right = fig.axes
    assert [line.get_xdata().tolist() for line in left.lines] == [[0, 1000], [0, 4000]]
    assert [line.get_xdata().tolist() for line in right.lines] == [[0.0, 5.0], [0.0, 20.0]]
    with pytest.raises(ValueError, match="cost/wall_s"):
        plot_reward_vs_cost(points.drop(columns=["cost/wall_s"]))


def test_proxy_and_gold_draws_each_run_on_both_panels(tmp_path):
    points = _points([("DPO", 0, 0.0, 0.5), ("DPO", 10, 3.0, 0.7), ("DPO", 20, 6.0, 0.65),
                      ("PPO", 0, 0.0, 0.5), ("PPO", 10, 9.0, 0.8)])
    points["run"] = ["d", "d", "d", "p", "p"]
    points["proxy_reward_mean"] = [0.0, 1.0, 2.0, 0.0, 3.0]
    reference = _points([("DPO", 10, 2.0, 0.6), ("DPO", 10, 4.0, 0.75)])
    fig = plot_proxy_and_gold(points.sample(frac=1, random_state=0), tmp_path / "proxy.png",
                              reference=reference)
    assert (tmp_path / "proxy.png").stat().st_size > 1000
    gold, proxy = fig.axes
    runs = [line for line in gold.lines if line.get_marker() == "o"]
    assert sorted(line.get_xdata().tolist() for line in runs) == [[0.0, 3.0, 6.0], [0.0, 9.0]]  # step order
    assert sorted(line.get_ydata().tolist() for line in proxy.lines if line.get_marker() == "o") == [
        [0.0, 1.0, 2.0], [0.0, 3.0]]
    assert any(line.get_ydata().tolist() == [0.6, 0.75] for line in gold.lines)  # the reference envelope
    with pytest.raises(ValueError, match="proxy_reward_mean"):
        plot_proxy_and_gold(points.drop(columns=["proxy_reward_mean"]))
