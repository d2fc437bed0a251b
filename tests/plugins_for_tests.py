"""Reward plug-ins used by the verifier tests (imported by name in worker processes)."""

import os
import time


def length_reward(response: str, answer: str) -> float:
    return 1.0 if answer in response else 0.25


def hang(response: str, answer: str) -> float:
    if "hang" in response:
        time.sleep(3600)
    return 1.0 if answer in response else 0.0


def crash(response: str, answer: str) -> float:
    if "crash" in response:
        raise RuntimeError("boom")
    if "exit" in response:
        os._exit(3)
    return 1.0 if answer in response else 0.0


def digits_reward(response: str, answer: str) -> float:
    """Graded reward so that a random tiny model's groups have non-zero advantages."""
    if answer in response:
        return 1.0
    return len(set(response) & set("0123456789")) / 10


def hang_sometimes(response: str, answer: str) -> float:
    """Hangs on every third response length: the step must still complete."""
    if len(response) % 3 == 0:
        time.sleep(3600)
    return digits_reward(response, answer)


def kill_trainer_once(response: str, answer: str) -> float:
    """digits_reward, but the N-th call overall (N in the file named by CEPO_TEST_KILL, whose
    size counts calls across worker processes) SIGKILLs the trainer (the nearest ancestor
    process running cepo.train) mid-step; the file is then removed, so a resumed run is
    not killed again."""
    import signal

    armed = os.environ.get("CEPO_TEST_KILL")
    if armed and os.path.exists(armed):
        with open(armed) as f:
            target = int(f.readline())
        counter = armed + ".calls"
        fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, b"x")
        os.close(fd)
        if os.path.getsize(counter) >= target:
            os.remove(armed)
            os.kill(_trainer_pid(), signal.SIGKILL)
            time.sleep(60)
    return digits_reward(response, answer)


def nan_reward(response: str, answer: str) -> float:
    """Not a number: the advantages, hence the loss, become NaN."""
    return float("nan")


def constant_reward(response: str, answer: str) -> float:
    """Every response the same reward: no group carries a signal, no update happens."""
    return 0.5


def _trainer_pid() -> int:
    """The nearest ancestor of this process whose command line runs cepo.train."""
    pid = os.getppid()
    while pid > 1:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"-m\x00cepo.train\x00" in f.read():  # not a forkserver preloading it
                return pid
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    raise RuntimeError("no cepo.train process above this one")
