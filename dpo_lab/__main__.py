"""Command line: ``python -m dpo_lab reproduce --preset cpu`` and ``python -m dpo_lab preset cpu``."""

from __future__ import annotations

import argparse
import sys

import yaml

from dpo_lab.presets import PRESETS, get_preset


def _overrides(pairs: list[str]) -> dict:
    """``--set dpo.lr=1e-5`` pairs, values parsed as YAML scalars (numbers, booleans, lists)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo_lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run the IMDb frontier end to end and write figures/")
    show = sub.add_parser("preset", help="print every setting of a preset")
    for p in (rep, show):
        p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="defaults to $DPO_LAB_PRESET or 'cpu'")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. --set dpo.lr=1e-5 (repeatable)")
    args = parser.parse_args(argv)
    try:
        preset = get_preset(args.preset, **_overrides(args.overrides))
    except (KeyError, TypeError, ValueError) as err:
        parser.error(str(err).strip("'\""))
    if args.command == "preset":
        print(preset.describe())
        return 0
    from dpo_lab.reproduce import reproduce

    reproduce(preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
