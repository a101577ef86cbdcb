"""Small helpers shared by the benchmark scripts: machine description, timing, memory, subprocess workers.

Benchmarks are scripts, not tests: they print tables. These machines are shared and noisy, so every script
records what it ran on (CPU model, cores, torch threads, load average) next to its numbers, and compares
tools side by side in one run rather than against numbers from another day.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
_RESULT_PREFIX = "BENCH-RESULT "  # a worker's last stdout line that starts with this carries its JSON


# ------------------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo, which is what lscpu reads), or platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages (what ``uptime`` prints)."""
    return os.getloadavg()


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge a timing: cores, CPU model, torch threads, load, library versions."""
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in load_average()],
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency of the project
        pass
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info


def describe_machine(info: Mapping[str, Any] | None = None) -> str:
    """One line per fact, for the top of a benchmark's output."""
    info = machine_info() if info is None else info
    return "\n".join(f"{k:>14}: {v}" for k, v in info.items())


# ------------------------------------------------------------------------------------------------- timing
def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Seconds per call of ``fn`` (``time.perf_counter``), after ``warmup`` untimed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    if len(values) == 0:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """``median [min-max]`` of a few repeats, so the reader sees the noise."""
    if len(values) == 1:
        return _short(values[0])
    return f"{_short(median(values))} [{_short(min(values))}-{_short(max(values))}]"


def _short(x: float) -> str:
    """3 significant digits, no exponent for the magnitudes benchmarks print."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


# ------------------------------------------------------------------------------------------------- memory
def peak_rss_mib() -> float:
    """This process's peak resident set size: torch's allocations count, unlike tracemalloc's.

    VmHWM (/proc/self/status) is the high-water mark of this program's own memory. ru_maxrss is not: Linux
    carries it across fork + exec, so a worker started by a big parent reports at least the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mib() -> float:
    """This process's resident set size now (statm's second field, in pages)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------------------------------------ workers
def emit_result(result: Mapping[str, Any]) -> None:
    """Print a worker's result as the last stdout line, for ``run_worker``."""
    print(_RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(script: Path, spec: Mapping[str, Any], *, timeout: float = 900,
               threads: int | None = None) -> dict[str, Any]:
    """Run ``script --worker JSON`` in a fresh interpreter and return the JSON it emits.

    A fresh process per measured configuration makes ``peak_rss_mib`` that configuration's own peak, and
    keeps one tool's caches, allocator state and imported modules from helping or hurting the other.
    """
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, str(script), "--worker", json.dumps(dict(spec))]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {dict(spec)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(_RESULT_PREFIX):])


# ------------------------------------------------------------------------------------------------- tables
def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (dicts) restricted to ``columns``, in that order."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(out)


__all__ = ["REPO", "cpu_model", "load_average", "machine_info", "describe_machine", "time_call", "median",
           "spread", "peak_rss_mib", "current_rss_mib", "emit_result", "run_worker", "markdown_table"]
