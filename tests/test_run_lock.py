"""A live run owns its output directory; the lock dies with its process; orphans notice."""

import os
import signal
import subprocess
import sys

import pytest

from cepo.run_lock import LauncherWatch, OutputDirLock, OutputDirLocked
from train_cli import HOLD_LOCK


def test_second_run_fails_naming_the_holder_then_the_lock_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirLocked, match=f"PID {holder.pid}"):
            OutputDirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = OutputDirLock(tmp_path).acquire()  # released by the OS when the holder died
    assert (tmp_path / ".lock").read_text() == str(os.getpid())
    lock.release()


def test_launcher_watch(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not LauncherWatch().launcher_died()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    watch = LauncherWatch()
    assert not watch.launcher_died()
    watch.parent = -1  # as if re-parented after the launcher died
    assert watch.launcher_died()
