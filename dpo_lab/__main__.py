"""Command line.

    python -m dpo_lab reproduce --preset cpu          # the IMDb frontier end to end -> figures/
    python -m dpo_lab reproduce --out DIR             # ... its figure and tables -> DIR
    python -m dpo_lab preset cpu                      # print every setting of a preset (--json: as JSON)
    python -m dpo_lab sweep --preset cpu              # the preset's frontier sweep through papermill -> runs/
    python -m dpo_lab sweep sweeps/hh_paper.yaml      # a sweep spec
    python -m dpo_lab execute NB OUT -p beta 0.3      # one notebook, parameters checked before it runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from dpo_lab.presets import PRESETS, Preset, check_notebook_parameters, get_preset, parse_overrides


def _add_preset_arguments(add: Callable[..., object], preset_help: str) -> None:
    add("--preset", default=None, choices=sorted(PRESETS), help=preset_help)
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set dpo.lr=1e-5 (repeatable)")


def _usage_error(err: Exception) -> int:
    """``error: MESSAGE`` (a KeyError's without its quotes) and exit code 2, as for a bad argument."""
    print(f"error: {err.args[0] if isinstance(err, KeyError) and err.args else err}", file=sys.stderr)
    return 2


def _folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be a folder (it, or one above it, is a file or a link to nothing), else None."""
    for part in (folder, *folder.parents):
        if part.is_dir():
            return None
        if part.exists() or part.is_symlink():
            what = "a file" if part.exists() else "a link to nothing"
            return f"{folder} is {what}" if part == folder else f"{folder} lies under {part}, {what}"
    return None


def _sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dpo_lab.scale import sweep

    try:
        if args.spec and (args.preset or args.overrides or args.methods):
            parser.error("give a SPEC file or --preset/--set/--methods, not both")
        if args.spec:
            spec = sweep.load_spec(args.spec)
        else:
            methods = args.methods.split(",") if args.methods else None
            spec = sweep.preset_spec(args.preset or "cpu", parse_overrides(args.overrides), methods)
        root = Path(args.runs_dir) if args.runs_dir else None
        devices = args.devices.split(",") if args.devices else None
        if args.dry_run:  # every check a real run makes before its first run (preflight), nothing run
            _, devices, _, missing = sweep.preflight(spec, root=root, devices=devices, force=True,
                                                     jobs=args.jobs)
            print(sweep.plan(spec, root).to_markdown(index=False))
            if missing and not args.force:
                raise sweep.SweepError(f"{spec.source} requires {list(spec.requires)}; this machine lacks "
                                       f"{missing}, so a real run here would refuse (--force to run anyway)")
            return 0
        outcomes = sweep.run_sweep(spec, root=root, devices=devices, force=args.force,
                                   retry_failed=not args.skip_failed, jobs=args.jobs)
    except sweep.SweepInterrupted as stopped:  # its running runs were ended and marked interrupted
        print(sweep.summarize(stopped.outcomes), file=sys.stderr)
        print(f"error: sweep {spec.name!r} {stopped}; run it again to finish it", file=sys.stderr)
        return 128 + stopped.signum
    except (sweep.SweepError, KeyError, TypeError, ValueError) as err:
        return _usage_error(err)
    folder = sweep.sweep_folder(spec, root)
    print((folder / "results.md").read_text())
    print(sweep.summarize(outcomes))
    print(f"results: {folder / 'results.csv'}")
    return 1 if any(o.state == "failed" for o in outcomes) else 0


def _execute(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import papermill
    from papermill.parameterize import add_builtin_parameters

    from dpo_lab.scale import sweep

    try:
        parameters = {name: yaml.safe_load(value) for name, value in args.parameters}
        paths = []
        for path, what in ((args.notebook, "NOTEBOOK"), (args.output, "OUTPUT")):
            try:  # papermill formats both with the parameters (``runs/{beta}``): a stray brace fails here
                paths.append(path.format(**add_builtin_parameters(parameters)))
            except (KeyError, IndexError, ValueError, AttributeError) as err:
                why = f"({type(err).__name__}: {err}); write a literal brace as {{{{ or }}}}"
                raise sweep.SweepError(f"{what} {path!r}: papermill formats it with the parameters and fails "
                                       f"{why}") from err
        notebook, output = paths
        sweep.check_parameters(notebook, parameters)
        if "preset" in sweep.notebook_parameters(notebook):  # its preset, and values of its settings (beta)
            check_notebook_parameters(parameters)
        if not Path(output).resolve().parent.is_dir():
            raise sweep.SweepError(f"OUTPUT {output!r}: folder {str(Path(output).parent)!r} does not exist")
    except (yaml.YAMLError, sweep.SweepError, KeyError, TypeError, ValueError) as err:
        return _usage_error(err)
    papermill.execute_notebook(args.notebook, args.output, parameters=parameters)
    return 0


def _reproduce(args: argparse.Namespace, parser: argparse.ArgumentParser, preset: Preset) -> int:
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    for option, variable in (("out", "DPO_LAB_FIGURES"), ("artifacts", "DPO_LAB_ARTIFACTS")):
        given = getattr(args, option)  # refused before any stage runs, not by a traceback after SFT
        folder = given if given is not None else os.environ.get(variable)
        problem = _folder_problem(Path(folder)) if folder else None
        if problem:
            parser.error(f"{f'--{option}' if given is not None else variable} {problem}; give a folder "
                         "(it is created if missing)")
    from dpo_lab.pipeline import default_workers
    from dpo_lab.reproduce import reproduce
    from dpo_lab.run import RunLockedError

    if args.artifacts is not None:
        os.environ["DPO_LAB_ARTIFACTS"] = str(args.artifacts)  # presets.artifacts_dir reads it at each call
    workers = default_workers() if args.workers is None else args.workers
    try:
        reproduce(preset, out_dir=args.out, workers=workers)
    # RunLockedError: $DPO_LAB_LOCK_TIMEOUT ran out while another process held a run; ValueError: a damaged
    # cached file (named, with what to delete), raised in a frontier worker too, or data the preset cannot use
    except (RunLockedError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo_lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("reproduce", help="run the IMDb frontier end to end and write figures/").add_argument
    _add_preset_arguments(add, "defaults to $DPO_LAB_PRESET or 'cpu'")
    add("--out", type=Path, metavar="DIR",
        help="where the figure, tables and summary go (default $DPO_LAB_FIGURES or figures/)")
    add("--artifacts", type=Path, metavar="DIR",
        help="the stage and run cache (default $DPO_LAB_ARTIFACTS or artifacts/)")
    add("--workers", type=int, default=None, metavar="N",
        help="frontier runs trained side by side, one thread each (default: one per core; two on CUDA)")
    add = sub.add_parser("preset", help="print every setting of a preset").add_argument
    add("name", nargs="?", default=None, choices=sorted(PRESETS), help="the preset to print")
    _add_preset_arguments(add, "the preset to print (same as NAME)")
    add("--json", action="store_true", help="print the preset as JSON (Preset.to_dict)")
    add = sub.add_parser("sweep", help="papermill a sweep of notebook runs; skips finished runs").add_argument
    add("spec", nargs="?", help="a YAML sweep spec (default: the preset's frontier sweep)")
    _add_preset_arguments(add, "the preset whose frontier sweep to run (default cpu)")
    add("--methods", help="comma-separated subset of DPO,Unlikelihood,Preferred-FT,PPO,PPO-GT")
    add("--runs-dir", help="where sweeps write (default $DPO_LAB_RUNS or runs/)")
    add("--devices", help="comma-separated CUDA devices, one run on each at a time (default: every GPU)")
    add("--jobs", type=int, default=1, metavar="N",
        help="on a CPU machine, N runs at a time, each with its share of the cores (default 1)")
    add("--dry-run", action="store_true", help="check the spec and list each run's state")
    add("--force", action="store_true", help="run even if a requirement (gpu, hub) is missing")
    add("--skip-failed", action="store_true", help="do not retry runs that failed before")
    add = sub.add_parser("execute", help="papermill one notebook, refusing bad parameters first").add_argument
    add("notebook")
    add("output")
    add("-p", dest="parameters", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
        help="a parameter (value parsed as YAML), repeatable")
    args = parser.parse_args(argv)
    if args.command in ("sweep", "execute"):
        return {"sweep": _sweep, "execute": _execute}[args.command](args, parser)
    try:
        preset = get_preset(getattr(args, "name", None) or args.preset, **parse_overrides(args.overrides))
    except (KeyError, TypeError, ValueError) as err:
        parser.error(str(err.args[0] if err.args else err))
    if args.command == "preset":
        print(json.dumps(preset.to_dict(), indent=2) if args.json else preset.describe())
        return 0
    return _reproduce(args, parser, preset)


if __name__ == "__main__":
    sys.exit(main())
