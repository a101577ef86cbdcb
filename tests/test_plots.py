import matplotlib

matplotlib.use("Agg")
import pandas as pd
import pytest

from dpo_lab.plots import dominance, plot_frontier, upper_envelope


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


def test_label_runs_names_each_run(tmp_path):
    points = _points([("DPO", 0, 0.0, 0.5), ("DPO", 1, 2.0, 0.9), ("DPO", 0, 0.0, 0.5), ("DPO", 1, 1.0, 0.7)])
    points["hyperparameter"] = ["beta=0.1", "beta=0.1", "beta=1", "beta=1"]
    fig = plot_frontier(points, label_runs=True)
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["beta=0.1", "beta=1"]
