#!/usr/bin/env bash
# The first GPU session in one command (docs/gpu-session.md): python3 bench/gpu_session.py, writing into $OUT.
# Without CUDA the same command dry-runs every stage on CPU. PYTHON overrides the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_session.py --out "${OUT:-bench/results/session}" "$@"
