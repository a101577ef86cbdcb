import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from dpo_lab.frontier import dominance
from dpo_lab.plots import plot_frontier, plot_seed_bands, upper_envelope


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


def _data_lines(ax):
    return [line for line in ax.lines if len(line.get_xdata())]  # not seaborn's empty legend handles


def _bands(ax):
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def _band_widths(ax, method_index):
    """Height of a method's band at each x of its line (bands are drawn in method order)."""
    line, band = _data_lines(ax)[method_index], _bands(ax)[method_index]
    vertices = band.get_paths()[0].vertices
    return [np.ptp(vertices[np.isclose(vertices[:, 0], x), 1]) for x in line.get_xdata()]


def test_seed_bands_average_seeds_per_step(tmp_path):
    rows = [  # DPO's two seeds differ in KL and reward; PPO's two seeds are identical
        ("DPO", 0, 0, 0.0, 0.5), ("DPO", 0, 1, 1.0, 0.6), ("DPO", 0, 2, 2.0, 0.8),
        ("DPO", 1, 0, 0.0, 0.5), ("DPO", 1, 1, 3.0, 0.8), ("DPO", 1, 2, 4.0, 0.8),
        ("PPO", 0, 0, 0.0, 0.5), ("PPO", 0, 1, 2.0, 0.7), ("PPO", 1, 0, 0.0, 0.5), ("PPO", 1, 1, 2.0, 0.7),
    ]
    points = pd.DataFrame(rows, columns=["method", "seed", "step", "kl_mean", "reward_mean"])
    fig = plot_seed_bands(points, tmp_path / "bands.png")
    ax = fig.axes[0]
    assert (tmp_path / "bands.png").stat().st_size > 1000
    assert len(_data_lines(ax)) == 2 and len(_bands(ax)) == 2  # one line and one band per method
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["DPO", "PPO"]
    dpo = _data_lines(ax)[0]
    assert dpo.get_xdata().tolist() == [0.0, 2.0, 3.0]  # each step at its seed-mean KL, in step order
    assert np.allclose(dpo.get_ydata(), [0.5, 0.7, 0.8])
    assert np.allclose(_band_widths(ax, 0), [0.0, 0.2, 0.0])  # 2 s.e. of {0.6, 0.8} = 2 * 0.1
    assert np.allclose(_band_widths(ax, 1), 0.0)  # identical seeds: no spread


def test_seed_bands_need_a_seed_column():
    with pytest.raises(ValueError, match="seed"):
        plot_seed_bands(_points([("DPO", 0, 0.0, 0.5)]))
