"""CPU threads that fit the machine: intra-op threads from the cores this process may use.

PyTorch starts as many intra-op threads as the machine has cores, whatever else runs.
Two training processes on one machine then spin against each other (measured on 2 cores:
a tiny-model step went from ~4 s to ~117 s). torchrun sets OMP_NUM_THREADS=1 only when
it starts more than one process per node, and never looks at the CPU affinity. Here the
count is the cores in this process's affinity mask divided among the processes of this
node; an explicit OMP_NUM_THREADS (or ``--cpu_threads``) wins.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its affinity mask; the machine's count elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def choose_threads(requested: int, *, cores: int, local_world_size: int,
                   omp_env: str | None) -> tuple[int, str]:
    """(threads, why): ``requested`` if > 0; else OMP_NUM_THREADS when set by the user
    (torchrun's own default of 1 for several processes counts as set); else the cores of
    this process's affinity shared equally by the node's processes (at least 1)."""
    if requested > 0:
        return requested, "cpu_threads option"
    if omp_env:
        try:
            value = int(omp_env)
        except ValueError:
            value = 0
        if value > 0:
            return value, "OMP_NUM_THREADS"
    share = max(1, cores // max(1, local_world_size))
    return share, f"{cores} available core(s) / {local_world_size} process(es) on this node"


def configure_threads(requested: int = 0) -> tuple[int, str]:
    """Set torch's intra-op threads for this process (see ``choose_threads``); returns
    (threads, why) for the log."""
    import torch

    threads, why = choose_threads(requested, cores=available_cores(),
                                  local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                                  omp_env=os.environ.get("OMP_NUM_THREADS"))
    torch.set_num_threads(threads)
    return threads, why
