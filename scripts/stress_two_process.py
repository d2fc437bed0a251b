"""Stress the 2-process CPU (gloo) run: the end-to-end trainer run of
tests/test_train_e2e.py (2 processes under torchrun, FSDP2, export) N times in a row.

Any failed launch counts, and an abort (SIGABRT, "terminate called ...") is reported as
such; the exit status is non-zero if any run failed. Meant to be run by hand:

    OMP_NUM_THREADS=1 python scripts/stress_two_process.py --runs 30

``--pytest`` runs the test itself (``test_two_processes_match_one[grpo]``: a 1-process
and a 2-process run, compared) instead of the bare 2-process launch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from launch import worker_env  # noqa: E402
from test_train_e2e import run_train  # noqa: E402
from tiny_lm import make_tiny_model_dir  # noqa: E402

ABORT = "terminate called"


def one_launch(work: Path, model: Path) -> tuple[bool, str]:
    proc = run_train(work, model, nproc=2, check=False)
    return proc.returncode == 0, proc.stderr


def one_pytest(work: Path, model: Path) -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_train_e2e.py") +
                           "::test_two_processes_match_one[grpo]", "--basetemp", str(work)],
                          capture_output=True, text=True, env=worker_env(), cwd=ROOT)
    return proc.returncode == 0, proc.stdout + proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--pytest", action="store_true", help="run the pytest node each time")
    args = ap.parse_args()
    failures = aborts = 0
    with tempfile.TemporaryDirectory(prefix="stress2p-") as tmp:
        model = make_tiny_model_dir(Path(tmp) / "model")
        for i in range(1, args.runs + 1):
            work = Path(tmp) / f"run{i:03d}"
            t0 = time.perf_counter()
            ok, log = (one_pytest if args.pytest else one_launch)(work, model)
            aborted = ABORT in log
            failures += not ok
            aborts += aborted
            print(f"run {i:3d}/{args.runs}: {'ok' if ok else 'FAILED'}"
                  f"{' (abort: terminate called)' if aborted else ''} "
                  f"{time.perf_counter() - t0:6.1f} s", flush=True)
            if not ok:
                print(log[-6000:], flush=True)
    print(f"{args.runs - failures}/{args.runs} runs ok, {failures} failed, {aborts} aborted",
          flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
