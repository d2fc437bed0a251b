"""The one launcher for multi-process tests: ``torchrun`` on CPU, on a free port.

Every test that starts processes under torchrun goes through ``torchrun`` here, so the
port choice, the environment (1 thread per process, tests/ importable) and the
clean-up on a time-out (the whole process tree is killed) are the same everywhere.
There is no retry: a failed launch fails the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from cepo.distributed import free_port

TESTS = Path(__file__).parent


def worker_env(**extra: str) -> dict[str, str]:
    """os.environ with 1 thread per process and tests/ on PYTHONPATH (plugins, workers)."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path, **extra)


def torchrun(args: list[str], *, nproc: int = 2, timeout: float = 300, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node nproc <args>`` (args: a script and its arguments,
    or ``-m module ...``); returns the CompletedProcess (text stdout / stderr).

    On a time-out the launcher and every worker are killed (they run in a session of
    their own) and the test fails with their output. With ``check`` a non-zero exit
    raises AssertionError with the tail of both streams.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env if env is not None else worker_env())
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun timed out after {timeout} s: {' '.join(cmd)}\n"
                             f"{stdout[-4000:]}{stderr[-8000:]}") from None
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"{stdout[-4000:]}{stderr[-8000:]}")
    return done
