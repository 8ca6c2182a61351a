#!/usr/bin/env bash
# Everything `make test` runs, in order. Fails on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# Manifests and Dockerfiles first: seconds, and no cluster or Docker engine needed.
bash scripts/k8s_validate.sh
bash scripts/lint_docker.sh
# The browser tests drive Debian's chromium; a fresh machine gets it from apt.
bash scripts/ensure_chromium.sh
# Two workers, one test file each at a time (module-scoped stacks stay in one process), in the
# order of pyproject's testpaths: the slowest directories first, so no long file starts last.
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=30 "$@"
