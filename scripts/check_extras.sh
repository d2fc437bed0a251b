#!/usr/bin/env bash
# Check that the `vllm` extra resolves together with the project's pins, without
# installing anything: `pip install --dry-run --report` in a throw-away venv (pip reads
# wheel metadata only; the 300+ MB vLLM wheel is never downloaded). Fails (exit 1) when
# the extra does not resolve, or resolves only by replacing a project pin.
#
#   scripts/check_extras.sh            # cepo[vllm] as a user would install it, and the
#                                      # oldest vLLM of the range; ~3 min, needs the index
#   PYTHON=python3.12 scripts/check_extras.sh
#
# The project's pins checked: torch==$TORCH (the tested torch; cepo itself leaves torch
# open) and whatever pyproject.toml requires (transformers range, ...).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-2.13.0}"
VLLM_OLDEST="${VLLM_OLDEST:-0.30.0}"   # lower bound of the extra in pyproject.toml

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/pip"
# a recent pip fetches metadata only (PEP 658) and writes --report
"$PIP" install -q --upgrade pip >/dev/null

resolve() {  # resolve <label> <requirement>...; writes $WORK/<label>.json
    local label="$1"; shift
    echo "== resolving ($label): $* torch==$TORCH"
    if ! "$PIP" install -q --dry-run --ignore-installed --report "$WORK/$label.json" \
            "$@" "torch==$TORCH" > "$WORK/$label.log" 2>&1; then
        tail -n 30 "$WORK/$label.log"
        echo "FAIL ($label): does not resolve with torch==$TORCH and the project's pins" >&2
        return 1
    fi
    "$WORK/venv/bin/python" - "$WORK/$label.json" "$TORCH" <<'EOF'
import json, sys
report, torch_pin = sys.argv[1], sys.argv[2]
versions = {i["metadata"]["name"].lower(): i["metadata"]["version"]
            for i in json.load(open(report))["install"]}
missing = [p for p in ("vllm", "torch", "transformers") if p not in versions]
if missing:
    sys.exit(f"FAIL: {missing} absent from the resolution")
if versions["torch"].split("+")[0] != torch_pin:
    sys.exit(f"FAIL: torch resolved to {versions['torch']}, not the pinned {torch_pin}")
print("   ok: " + ", ".join(f"{p}=={versions[p]}" for p in
      ("cepo", "vllm", "torch", "transformers", "tokenizers") if p in versions))
EOF
}

resolve extra "$ROOT[vllm]"
resolve oldest "$ROOT" "vllm==$VLLM_OLDEST"
echo "check_extras: the vllm extra resolves with the project's pins"
