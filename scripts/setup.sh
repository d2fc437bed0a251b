#!/usr/bin/env bash
# Sets up cepo in the current Python environment (use a venv if you prefer one).
#
# torch is installed first and on its own, so that no dependency can pull a different
# (CUDA) build in: an existing torch is kept as it is; otherwise torch==2.13.0 is
# installed (a CPU build on the project's CPU machines). Then cepo itself, editable,
# with the test extra (pytest, triton for the CPU interpreter, liger-kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
before=$("$PY" -c "import torch; print(torch.__version__)")
"$PY" -m pip install --quiet -e ".[test]"
after=$("$PY" -c "import torch; print(torch.__version__)")
if [ "$before" != "$after" ]; then
    echo "setup.sh: a dependency replaced torch $before with $after; reinstall torch first" >&2
    exit 1
fi
echo "setup.sh: cepo installed with torch $after"
