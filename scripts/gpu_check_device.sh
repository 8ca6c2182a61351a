#!/usr/bin/env bash
# The GPU check on a lent GPU machine without internet (docs/influence.md, "GPU check"): installs
# the wheels carried from the development machine (`make gpu-check-wheels`, folder
# .gpu-check-wheels) with --no-index, then runs benchmarks/gpu_check.py from this checkout's
# sources. The machine's own torch, transformers and peft are used. The JSON of figures goes to
# $OUT (the device tool's folder that comes back) or the current directory.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${GPU_CHECK_WHEELS:-.gpu-check-wheels}
PYTHON=${PYTHON:-python3}
if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu_check_device: no wheels in $WHEELS; run 'make gpu-check-wheels' where there is internet" >&2
    exit 2
fi
# --no-deps: each wheel's dependencies are either in the folder or already on the machine.
"$PYTHON" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
"$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
export PYTHONPATH="$PWD/gpu_core:$PWD/libs/cost_model:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m benchmarks.gpu_check --out "${OUT:-.}/gpu-check.json" "$@"
