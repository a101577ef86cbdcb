"""``python -m dpo_lab``: overrides parsed as numbers, bad parameters refused with their names."""

from __future__ import annotations

import json

import pytest

from dpo_lab.__main__ import main
from dpo_lab.presets import parse_overrides, project_root


def test_overrides_parse_numbers_lists_and_strings() -> None:
    parsed = parse_overrides(["dpo.lr=1e-5", "dpo.betas=[0.1, 1]", "dpo.optimizer=adamw", "seed=3"])
    assert parsed == {"dpo.lr": 1e-5, "dpo.betas": [0.1, 1], "dpo.optimizer": "adamw", "seed": 3}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["dpo.lr"])
    with pytest.raises(SystemExit) as exit_info:  # a usage error: exit code 2, like every bad argument
        main(["preset", "cpu", "--set", "dpo.lr"])
    assert exit_info.value.code == 2


def test_preset_prints_every_setting_with_overrides(capsys: pytest.CaptureFixture) -> None:
    assert main(["preset", "cpu", "--json", "--set", "dpo.lr=1e-5"]) == 0
    assert json.loads(capsys.readouterr().out)["dpo"]["lr"] == 1e-5
    with pytest.raises(SystemExit):
        main(["preset", "cpu", "--set", "dpo.lrr=1"])
    assert "unknown preset parameter 'dpo.lrr'" in capsys.readouterr().err


def test_execute_refuses_an_unknown_parameter_before_running(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out.ipynb"
    code = main(["execute", str(project_root() / "notebooks/05_dpo.ipynb"), str(out), "-p", "betta", "0.3"])
    assert code == 2 and not out.exists()
    assert "unknown parameter(s) ['betta']" in capsys.readouterr().err
    code = main(["execute", str(project_root() / "notebooks/05_dpo.ipynb"), str(out), "-p", "beta", "[0.3"])
    assert code == 2 and not out.exists()  # a YAML error in a value is a usage error too
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("output, message", [
    ("out{}.ipynb", "papermill formats it"),  # papermill formats OUTPUT with the parameters
    ("out-{betta}.ipynb", "papermill formats it"),
    ("no-such-folder/out.ipynb", "does not exist"),
])
def test_execute_refuses_an_output_papermill_cannot_write(tmp_path, capsys: pytest.CaptureFixture,
                                                         output: str, message: str) -> None:
    code = main(["execute", str(project_root() / "notebooks/05_dpo.ipynb"), str(tmp_path / output),
                 "-p", "beta", "0.3"])
    assert code == 2 and list(tmp_path.iterdir()) == []
    assert message in capsys.readouterr().err


def test_every_spec_error_exits_2(tmp_path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", "--preset", "smoke", "--set", "dpo.lr", "--dry-run"]) == 2  # no '='
    assert "KEY=VALUE" in capsys.readouterr().err
    spec = tmp_path / "spec.yaml"
    notebook = "notebook: notebooks/templates/frontier_run.ipynb\n"
    for text in ("name: [unclosed\n", "name: s\nnotebook: 3\ngrid: {x: [1]}\n", "- a list\n",
                 f"name: s\n{notebook}runs: [{{name: 'a{{b}}'}}]\n",  # braces reached papermill's formatter
                 f"name: s\n{notebook}grid: {{seed: [0]}}\nruns: [{{name: seed0}}]\n"):  # one folder, twice
        spec.write_text(text)
        assert main(["sweep", str(spec), "--runs-dir", str(tmp_path), "--dry-run"]) == 2, text
        assert "error:" in capsys.readouterr().err


def test_sweep_dry_run_lists_states(tmp_path, capsys: pytest.CaptureFixture) -> None:
    code = main(["sweep", "--preset", "smoke", "--methods", "DPO", "--runs-dir", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "dpo-beta0.1" in out and "todo" in out
    assert main(["sweep", "--preset", "smoke", "--set", "dpo.lr=fast", "--runs-dir", str(tmp_path)]) == 2
    assert "'dpo.lr' expects float" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--out", "--artifacts"])
def test_reproduce_refuses_a_file_for_a_folder(tmp_path, capsys: pytest.CaptureFixture, option: str) -> None:
    taken = tmp_path / "results.txt"
    taken.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--preset", "smoke", option, str(taken)])
    assert exit_info.value.code == 2 and f"{option} {taken} is a file" in capsys.readouterr().err
    assert taken.read_text() == "keep me"


def test_execute_refuses_an_out_of_range_preset_value_before_running(tmp_path, monkeypatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """``-p beta -1`` used to fail inside the DPO trainer, after the SFT and pair stages had run."""
    import papermill

    def run(*args, **kwargs):
        raise AssertionError("the notebook ran before its parameters were checked against the preset")

    monkeypatch.setattr(papermill, "execute_notebook", run)
    notebooks, out = project_root() / "notebooks", str(tmp_path / "out.ipynb")
    for notebook, parameters, words in [
        ("05_dpo.ipynb", ["beta", "-1"], "parameter 'beta' must be > 0, got -1.0 (a value of dpo.betas)"),
        ("05_dpo.ipynb", ["betas", "[0.1, .nan]"], "parameter 'betas'[1] must be a finite number, got nan"),
        ("05_dpo.ipynb", ["overrides", "{dpo.lr: 0}"], "dpo.lr must be > 0, got 0.0"),
        ("06_ppo_and_baselines.ipynb", ["target_kls", "[3, 0]"], "parameter 'target_kls'[1] must be > 0"),
        ("13_pair_sources.ipynb", ["beta", "0.0"], "parameter 'beta' must be > 0, got 0.0"),
        ("templates/frontier_run.ipynb", ["value", "-0.5"], "parameter 'value' must be > 0, got -0.5"),
    ]:
        assert main(["execute", str(notebooks / notebook), out, "-p", *parameters]) == 2, parameters
        assert words in capsys.readouterr().err
    monkeypatch.setenv("DPO_LAB_PRESET", "smoke")
    code = main(["execute", str(notebooks / "templates/frontier_run.ipynb"), out,
                 "-p", "method", "Unlikelihood", "-p", "value", "-0.5"])
    words = "must be >= 0, got -0.5 (a value of baselines.unlikelihood_alphas)"
    assert code == 2 and words in capsys.readouterr().err
    with pytest.raises(AssertionError, match="the notebook ran"):  # a legitimate value reaches papermill
        main(["execute", str(notebooks / "05_dpo.ipynb"), out, "-p", "beta", "0.3", "-p", "betas", "[]"])


@pytest.mark.parametrize("case", ["dangling --out", "--out under a file", "DPO_LAB_FIGURES a file",
                                  "--artifacts under a file", "DPO_LAB_ARTIFACTS a file"])
def test_reproduce_refuses_a_folder_it_cannot_create(tmp_path, monkeypatch, capsys: pytest.CaptureFixture,
                                                     case: str) -> None:
    """A FileExistsError or NotADirectoryError traceback; now a usage error before any stage."""
    from dpo_lab import pipeline

    def stage(*args, **kwargs):
        raise AssertionError("a stage ran before the folders were checked")

    for name in ("sft_policy", "reward_model", "preference_data", "frontier"):
        monkeypatch.setattr(pipeline, name, stage)
    taken = tmp_path / "results.txt"
    taken.write_text("keep me")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    monkeypatch.setenv("DPO_LAB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("DPO_LAB_ARTIFACTS", str(tmp_path / "artifacts"))
    link, under = tmp_path / "link", taken / "sub"
    argv, words = {
        "dangling --out": (["--out", str(link)], f"--out {link} is a link to nothing"),
        "--out under a file": (["--out", str(under)], f"--out {under} lies under {taken}, a file"),
        "DPO_LAB_FIGURES a file": ([], f"DPO_LAB_FIGURES {taken} is a file"),
        "--artifacts under a file": (["--artifacts", str(taken / "a")], f"lies under {taken}, a file"),
        "DPO_LAB_ARTIFACTS a file": ([], f"DPO_LAB_ARTIFACTS {taken} is a file"),
    }[case]
    if case.startswith("DPO_LAB"):
        monkeypatch.setenv(case.split()[0], str(taken))
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--preset", "smoke", *argv])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err
    assert taken.read_text() == "keep me"
