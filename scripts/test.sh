#!/usr/bin/env bash
# The project's test command (README and CI call exactly this): set up, then run the
# CPU test suite. Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1 is
# set by tests/conftest.py for CPU-only machines).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest tests -m "not slow" -q "$@"
