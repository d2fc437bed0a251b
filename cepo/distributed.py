"""Process-group set-up for torchrun (one or many processes and nodes) and plain python."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group_backend(device_type: str, cpu_offload: bool = False) -> str:
    """The backend string for ``init_process_group``.

    gloo on CPU; NCCL on CUDA; with CPU offload on CUDA both, ``"cuda:nccl,cpu:gloo"``:
    FSDP2 then keeps shards, gradients and optimizer state in host memory, and the
    collectives that touch them where they are (the gradient-norm clip's all-reduce, a
    checkpoint's gathers) need a CPU backend; CUDA tensors still go through NCCL.
    """
    if device_type == "cpu":
        return "gloo"
    if device_type != "cuda":
        raise ValueError(f"config: 'device' must be cpu or cuda, got {device_type!r}")
    return "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"


def init_distributed(device: str = "auto", cpu_offload: bool = False) -> DistInfo:
    """Initialise the default process group (see ``process_group_backend``).

    Under torchrun the rank and world come from its environment; launched with plain
    ``python -m cepo.train`` it becomes a world of one, so FSDP2 code paths are the same.
    Pass ``cpu_offload`` as the run will shard (FSDP2 ``CPUOffloadPolicy``).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config: 'device' is cuda but no CUDA device is available")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(device, cpu_offload),
                                timeout=datetime.timedelta(minutes=30),
                                device_id=dev if device == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of floats over ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, device: torch.device) -> int:
    """Max of an int over ranks."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_max_float(value: float, device: torch.device) -> float:
    """Max of a float over ranks (float64)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _clear_distributed_caches() -> None:
    """Empty torch.distributed's memo caches (functools caches keyed by meshes, specs and
    groups, and DTensor's sharding-propagation cache of this thread)."""
    import sys
    import warnings

    with warnings.catch_warnings():  # touching torch's deprecated aliases warns
        warnings.simplefilter("ignore")
        for name, module in list(sys.modules.items()):
            if not name.startswith("torch.distributed") or module is None:
                continue
            for value in list(vars(module).values()):
                if isinstance(value, type):
                    continue
                clear = getattr(value, "cache_clear", None)
                if callable(clear) and hasattr(value, "cache_info"):
                    clear()
    try:
        from torch.distributed.tensor import DTensor
        propagator = DTensor._op_dispatcher.sharding_propagator
    except (ImportError, AttributeError):
        return
    for value in vars(propagator).values():
        clear = getattr(value, "cache_clear", None)
        if callable(clear):
            clear()


def _release_process_groups(groups: list) -> None:
    """Drop every Python reference to the destroyed ``groups`` so that they are freed
    (their C++ threads joined) now, on this thread.

    ``destroy_process_group`` only unregisters a group; the C++ object, and with it gloo's
    threads (two ``pt_gloo_runloop`` workers and the ``gloo_tcp_loop`` socket loop),
    lives on while anything references it, and under FSDP2 something always does: every
    ``DeviceMesh`` keeps its groups in ``_pg_registry`` (and DTensor's sharding caches
    keep the meshes alive until interpreter teardown), FSDP2's per-module state keeps
    ``shard_process_group``. The group is unusable once destroyed, so the references
    held in dicts (instance attributes included) and lists are set to None.
    """
    import gc
    import warnings

    from torch.distributed.device_mesh import DeviceMesh

    _clear_distributed_caches()  # their entries are not visible to gc.get_referrers
    gc.collect()  # the finished run's modules, optimizers, DTensors (cycles)
    with warnings.catch_warnings():  # isinstance on torch's deprecated aliases warns
        warnings.simplefilter("ignore")
        meshes = [obj for obj in gc.get_objects() if isinstance(obj, DeviceMesh)]
    for mesh in meshes:
        registry = getattr(mesh, "_pg_registry", None)
        if isinstance(registry, dict):
            groups.extend(registry.values())
            registry.clear()
    del meshes
    ids = {id(g) for g in groups}
    for g in groups:
        for holder in gc.get_referrers(g):
            if holder is groups:
                continue
            if isinstance(holder, dict):
                for k, v in list(holder.items()):
                    if id(v) in ids:
                        holder[k] = None
            elif isinstance(holder, list):
                for i, v in enumerate(holder):
                    if id(v) in ids:
                        holder[i] = None
    groups.clear()
    gc.collect()


def gloo_threads() -> list[str]:
    """Names of gloo's threads alive in this process (Linux; [] elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if "gloo" in name:
            names.append(name)
    return names


def shutdown() -> None:
    """Tear the process group down, and gloo's threads with it, before the interpreter
    exits.

    All ranks first meet at a barrier (no peer is inside a collective), then the group is
    destroyed and every reference to it dropped (``_release_process_groups``), so its
    C++ object is freed here, on the main thread. Left alive (as FSDP2's meshes and
    DTensor's caches would leave it), the group is destroyed during interpreter
    teardown instead, or not at all, while gloo's socket loop thread still handles the
    peers' connections closing; gloo's ``Loop::shutdown`` returns early once another
    caller has begun stopping the loop, and the loop's still-joinable ``std::thread``
    is then destroyed: std::terminate, "terminate called without an active exception",
    SIGABRT in one rank at exit. Call it after the run's model, optimizer and DTensors
    are out of scope (FSDP2 modules hold the group too); a warning names what is left.
    """
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    backend = dist.get_backend_config()
    from torch.distributed.distributed_c10d import _world
    groups = list(_world.pg_map)  # the default group and every group made from it
    dist.destroy_process_group()
    _release_process_groups(groups)
    left = gloo_threads() if "gloo" in backend else []
    if left:
        import warnings
        warnings.warn(f"cepo.distributed.shutdown: gloo threads still alive after the process "
                      f"group was destroyed ({', '.join(sorted(left))}): something still "
                      "references it (an FSDP2 module or DTensor in scope?); the process may "
                      "abort at exit", RuntimeWarning, stacklevel=2)
