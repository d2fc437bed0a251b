"""A live run owns its output directory; an orphaned worker stops instead of training on.

``torchrun`` starts its workers in a session of their own: when the launcher is killed
with SIGKILL, a worker lives on as an orphan and keeps training into the same output
directory, and a resume started meanwhile would train beside it (two runs appending to
one metrics.jsonl, rotating one checkpoint folder). Two guards:

- ``OutputDirLock``: an exclusive ``flock`` on ``output_dir/.lock``, taken by the main
  rank before anything is written and released by the OS when the process dies (so a
  killed run never leaves a stale lock). A second run on a locked directory fails at
  once with a message naming the holder's PID.
- ``LauncherWatch``: remembers the parent process at start; when the parent has changed
  (the launcher died and the worker was re-parented), the trainer stops at the next step
  boundary.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class OutputDirLocked(RuntimeError):
    """Another live process holds the output directory."""


class OutputDirLock:
    """Exclusive lock on ``directory/.lock`` for the life of this process (or ``release``)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "OutputDirLock":
        """Take the lock or raise OutputDirLocked naming the holder's PID."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirLocked(
                f"output_dir {str(self.path.parent)!r} is in use by a live run (PID {holder}); "
                f"wait for it, stop it (kill {holder}), or choose another --output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class LauncherWatch:
    """Tells whether the torchrun agent that started this worker is gone (the worker was
    re-parented). Only for torchrun workers (``TORCHELASTIC_RUN_ID`` set): a plain
    ``python -m cepo.train`` whose shell exits (nohup) keeps training."""

    def __init__(self):
        self.active = "TORCHELASTIC_RUN_ID" in os.environ
        self.parent = os.getppid()

    def launcher_died(self) -> bool:
        return self.active and os.getppid() != self.parent
