#!/usr/bin/env bash
# GPU smoke test + 1B Wanda scoring benchmark (see benchmarks/gpu_smoke.py for what it runs).
#
#   bash benchmarks/gpu_smoke.sh [gpu_smoke.py options]     # e.g. --skip-pipeline, --require-cuda
#
# Needs a CUDA build of torch and this package importable (pip install -e ., or run from the repo:
# PYTHONPATH is set below). Works offline: the tiny world needs no download. With $OUT set, the
# JSON results and the pipeline report are written there.
# Exit codes: 0 success, or no CUDA device (prints "no CUDA device"); 2 no device with
# --require-cuda; 1 a part failed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python_bin="${PYTHON:-python}"

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# No network on the GPU machines: fail fast instead of retrying hub requests.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

exec "$python_bin" benchmarks/gpu_smoke.py "$@"
