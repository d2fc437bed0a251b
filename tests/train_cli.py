"""Running ``cepo.train`` as a user would, from tests: one process (``python -m``), and
reading what the run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cepo.distributed import free_port  # noqa: F401  (re-exported for the tests)

TESTS = Path(__file__).parent


def subprocess_env(extra: dict | None = None) -> dict:
    """The environment for a trainer subprocess: one thread, tests/ importable (plug-ins)."""
    return dict(os.environ, OMP_NUM_THREADS="1", **(extra or {}),
                PYTHONPATH=str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def train(out: Path, model: Path, *args: str, env: dict | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m cepo.train --model MODEL --output_dir OUT ARGS`` -> CompletedProcess."""
    cmd = [sys.executable, "-m", "cepo.train", "--model", str(model), "--output_dir", str(out),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(env),
                          timeout=timeout)


def rows(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The JSON lines of a run's output file."""
    return [json.loads(x) for x in (Path(out) / name).read_text().splitlines() if x.strip()]


def step_rows(out: Path) -> dict[int, dict]:
    """metrics.jsonl rows of training steps (not evaluation-only rows), by step."""
    return {r["step"]: r for r in rows(out) if "loss" in r}



HOLD_LOCK = ("import sys, time; from cepo.run_lock import OutputDirLock; "
             "OutputDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)")
"""``python -c HOLD_LOCK DIR``: a process that holds DIR's run lock until killed."""
