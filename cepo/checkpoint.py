"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically. (The
final export in Hugging Face layout is ``cepo.export``.)

Layout of one checkpoint, ``<root>/step_000042/``::

    dcp/shard-0000R-model-00001-of-00001.safetensors   one file per rank: its shards of
                                                       the model and optimizer tensors
    state.json        trainer state, scheduler, optimizer hyper-parameters, world size
    rng_rank0000R.safetensors                          each rank's RNG streams
    COMPLETE          written last

Nothing is pickled, on save or on load. DCP's default ``FileSystemWriter`` pickles its
``.metadata`` file and any non-tensor value (and its reader unpickles them with
``weights_only=False``), so this module uses DCP's safetensors storage
(``HuggingFaceStorageWriter(save_distributed=True)`` / ``HuggingFaceStorageReader``,
whose metadata is the JSON header of each file) and gives DCP tensors only; the
optimizer's non-tensor values (param_groups: lr, betas, ...) go to ``state.json``.
Resharding on load (another world size) is DCP's.

Atomicity: every rank writes into ``step_000042.tmp``; after all have finished, rank 0
writes ``COMPLETE`` and renames the directory to ``step_000042`` (one ``rename`` on one
filesystem). A crash at any earlier point leaves the previous checkpoint the newest
complete one; ``latest_checkpoint`` ignores ``.tmp`` directories and the next save
removes them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

log = logging.getLogger(__name__)

FORMAT = "cepo-checkpoint-v1"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_LEFTOVER = re.compile(r"^step_\d{6,}\.(tmp|old)$")  # partial or replaced: safe to delete


# ----------------------------------------------------------------------------- process group

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _no_dist() -> bool:
    """DCP without its collectives when there is nobody to coordinate with. In one process
    with a (gloo) process group, DCP's distributed save left every later training step
    about 1.8x slower on CPU (torch 2.13; the embedded default's steps went from 0.69 s to
    1.27 s after its first checkpoint, every op slower, not the save itself); with
    ``no_dist`` they do not. Two processes were not affected."""
    return not dist.is_initialized() or _world() == 1


def _on_rank0(fn: Callable[[], None], what: str) -> None:
    """Run ``fn`` on rank 0 only; every rank returns once it is done (a barrier), and
    every rank raises if it failed (instead of the others waiting at the next barrier).
    Rank 0 starts ``fn`` without waiting for the others: callers that need every rank
    to have finished something first must call ``dist.barrier()`` before."""
    error = None
    if _rank() == 0:
        try:
            fn()
        except BaseException as e:  # re-raised below, after telling the other ranks
            error = e
    if dist.is_initialized() and _world() > 1:
        # a CPU flag where the group has a CPU backend (gloo; cuda:nccl,cpu:gloo)
        device = (torch.device("cpu") if "cpu:" in dist.get_backend_config()
                  else torch.device("cuda", torch.cuda.current_device()))
        flag = torch.tensor([0 if error is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is None and flag.item():
            raise RuntimeError(f"checkpoint: rank 0 failed to {what}; see rank 0's error")
    if error is not None:
        raise error


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` (replacing a previous ``dst``) with atomic renames."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- RNG

def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG streams as (tensors, string metadata) for a safetensors file."""
    version, words, gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(),
               "python": torch.tensor(words, dtype=torch.int64)}
    meta = {"python_version": str(version), "python_gauss": json.dumps(gauss)}
    np = sys.modules.get("numpy")  # only if something imported it
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = json.dumps([kind, int(pos), int(has_gauss), float(cached)])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch"])
    random.setstate((int(meta["python_version"]), tuple(tensors["python"].tolist()),
                     json.loads(meta["python_gauss"])))
    if "numpy" in tensors:
        import numpy as np
        kind, pos, has_gauss, cached = json.loads(meta["numpy"])
        np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                             cached))
    if "cuda" in tensors:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda"])
        else:
            warnings.warn("checkpoint: the CUDA RNG state was saved on a GPU and is not "
                          "restored here (no CUDA device)")


def _reseed(step: int) -> None:
    """Fallback when the world size changed: fresh, distinct streams per rank."""
    seed = (step * 1_000_003 + _rank() * 7919 + 17) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed)


# ----------------------------------------------------------------------------- state dicts

def _split_optim(optim_sd: dict) -> tuple[dict, dict]:
    """(tensor part for DCP, non-tensor part for JSON) of a get_state_dict optimizer dict."""
    tensors, extras = {}, {}
    for fqn, state in optim_sd.get("state", {}).items():
        tensors[fqn] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        if rest:
            extras[fqn] = rest
    return {"state": tensors}, {"state": extras, "param_groups": optim_sd.get("param_groups", [])}


def _like(value, template):
    """JSON turned tuples into lists: give them back the type of the live value."""
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(_like(v, t) for v, t in zip(value, template))
    return value


def _check_groups(saved: list, live: list) -> None:
    if len(saved) != len(live):
        raise ValueError(f"checkpoint: the optimizer has {len(live)} param groups but the "
                         f"checkpoint has {len(saved)}; build the optimizer as in the run that "
                         "saved it")


def _merge_optim(tensors: dict, extras: dict, template: dict) -> dict:
    groups = extras["param_groups"]
    live = template.get("param_groups", [])
    _check_groups(groups, live)
    groups = [{k: _like(v, g_live.get(k)) for k, v in g.items()} for g, g_live in zip(groups, live)]
    state = {fqn: {**s, **extras["state"].get(fqn, {})} for fqn, s in tensors["state"].items()}
    return {"state": state, "param_groups": groups}


def _alias_key(t: torch.Tensor):
    local = t.to_local() if hasattr(t, "to_local") else t
    if local.numel() == 0:
        return None
    return (local.device, local.untyped_storage().data_ptr(), local.storage_offset(),
            tuple(local.shape), local.stride(), local.dtype)


def _drop_aliases(sd: dict) -> tuple[dict, dict[str, str]]:
    """(state dict with one name per tensor, {dropped name: kept name}).

    Tied parameters (embeddings and LM head) appear under two names as one tensor;
    safetensors refuses to store shared memory, and one copy is all that is needed.
    """
    seen, unique, aliases = {}, {}, {}
    for k, v in sd.items():
        key = _alias_key(v) if isinstance(v, torch.Tensor) else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
        else:
            if key is not None:
                seen[key] = k
            unique[k] = v
    return unique, aliases


def _json(obj, what: str, fix: str) -> str:
    try:
        return json.dumps(obj, indent=1, allow_nan=True)
    except TypeError as e:
        raise TypeError(f"checkpoint: {what} must be JSON-serialisable ({e}); {fix}") from None


def _ensure_optimizer_state(optimizer) -> None:
    """Give a never-stepped optimizer its state tensors, so that DCP can load into them.

    ``get_state_dict`` does it itself (torch's ``_init_optim_state``: one step with zero
    gradients and lr 0), but silently skips it when any parameter already has a gradient,
    which would leave the moments unloaded. Gradients are set aside around it.
    """
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    from torch.distributed.checkpoint import state_dict as dcp_state_dict

    try:
        dcp_state_dict._init_optim_state(optimizer)  # private (torch 2.13): get_state_dict's own
    finally:
        for p, g in zip(params, grads):
            p.grad = g


def _writer(path: Path):
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    return HuggingFaceStorageWriter(str(path), save_distributed=True)


def _reader(path: Path):
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    return HuggingFaceStorageReader(str(path))


# ----------------------------------------------------------------------------- public API

def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "COMPLETE").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``ckpt_root`` (None if there is none).

    Complete means a ``step_NNNNNN`` directory holding ``COMPLETE``; partial ``.tmp``
    directories from a crashed save are ignored.
    """
    steps = _complete_steps(Path(ckpt_root))
    return steps[-1][1] if steps else None


def save_checkpoint(ckpt_root: str | Path, step: int, *, model, optimizer, scheduler=None,
                    trainer_state: dict, keep_last: int = 2,
                    extra_models: dict | None = None) -> Path:
    """Save model, optimizer, scheduler, trainer state and every rank's RNG, atomically.

    Collective: every rank calls it. ``model`` is a plain module or an FSDP2-sharded one
    (each rank writes its own shards). ``trainer_state`` must be JSON-serialisable
    (JSON: dict keys come back as strings, tuples as lists).
    Keeps the newest ``keep_last`` complete checkpoints (0 keeps all); complete
    checkpoints of a later step than ``step`` (an abandoned run continued from an older
    checkpoint) are renamed ``*.abandoned`` so that ``latest_checkpoint`` cannot pick
    them. ``extra_models``: name -> another module (e.g. a lagged teacher) whose weights
    go into the same atomic checkpoint (no optimizer state); ``load_checkpoint`` restores
    them by name. Returns ``ckpt_root/step_NNNNNN``.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: 'step' must be an int >= 0, got {step!r}")
    if not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"save_checkpoint: 'keep_last' must be an int >= 0 (0 keeps every "
                         f"checkpoint), got {keep_last!r}")
    from safetensors.torch import save_file

    rng_tensors, rng_meta = _rng_state()  # before anything else can draw
    root = Path(ckpt_root)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"

    fresh = not optimizer.state  # never stepped (e.g. a step-0 checkpoint)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if fresh:  # undo get_state_dict's lazy init (a step with lr 0 that sets AdamW's step
        optimizer.state.clear()  # to 1): saving must not change the run's bias correction
        optim_sd["state"] = {}
    model_sd, _ = _drop_aliases(model_sd)
    optim_tensors, optim_extras = _split_optim(optim_sd)
    optim_extras["fresh"] = fresh
    extras = {name: _drop_aliases(get_model_state_dict(m))[0]
              for name, m in (extra_models or {}).items()}
    meta = {"format": FORMAT, "step": step, "world_size": _world(),
            "trainer_state": trainer_state, "extra_models": sorted(extras),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "optimizer": optim_extras}
    _json(trainer_state, "'trainer_state'", "store plain numbers, strings, lists and dicts")
    _json(meta["scheduler"], "the scheduler's state_dict", "use a scheduler whose state holds "
          "plain numbers (LambdaLR, CosineAnnealingLR, SequentialLR, ...)")
    meta_text = _json(meta, "the optimizer's param_groups / non-tensor state",
                      "use plain-number hyper-parameters (e.g. lr as a float, not a tensor)")

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        for p in root.iterdir():
            if _LEFTOVER.match(p.name):  # a crashed save's partial directory
                shutil.rmtree(p, ignore_errors=True)
        tmp.mkdir()

    _on_rank0(prepare, f"create {tmp}")
    with warnings.catch_warnings():  # "torch.distributed is disabled": a plain process is fine
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_tensors,
                  **{f"extra_{name}": sd for name, sd in extras.items()}},
                 storage_writer=_writer(tmp / "dcp"), no_dist=_no_dist())
    save_file(rng_tensors, str(tmp / f"rng_rank{_rank():05d}.safetensors"), metadata=rng_meta)

    def publish():
        _write_text(tmp / "state.json", meta_text)
        _write_text(tmp / "COMPLETE", f"{step}\n")
        _fsync_dir(tmp)
        _replace_dir(tmp, final)  # the checkpoint now exists, whole
        for s, p in _complete_steps(root):
            if s > step:
                log.warning("checkpoint %s is newer than the step being saved (%d): it belongs "
                            "to an abandoned run; renamed to %s.abandoned", p, step, p.name)
                shutil.rmtree(p.with_name(p.name + ".abandoned"), ignore_errors=True)
                os.replace(p, p.with_name(p.name + ".abandoned"))
        if keep_last > 0:
            for _, old in _complete_steps(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    if dist.is_initialized() and _world() > 1:
        # every rank's files (DCP shards, RNG) are on disk before rank 0 renames the
        # directory: _on_rank0 runs its function *before* its own collective
        dist.barrier()
    _on_rank0(publish, f"complete {final}")
    return final


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler=None,
                    extra_models: dict | None = None) -> dict:
    """Restore a checkpoint written by ``save_checkpoint``; returns the trainer state.

    Collective. Build the model (sharded as for training) and the optimizer first, as the
    saving run did; the optimizer may be fresh (never stepped, gradients or not). Another
    world size is fine for the model and optimizer (DCP reshards); the RNG streams are
    then not restored but re-seeded per rank from (step, rank), with a warning.
    ``extra_models``: name -> module, restored from the ``extra_models`` of the same
    names given to ``save_checkpoint`` (an error names any the checkpoint lacks).
    """
    from safetensors import safe_open

    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise ValueError(f"checkpoint {path} is incomplete or missing (no COMPLETE marker); "
                         "pass a directory returned by latest_checkpoint")
    meta = json.loads((path / "state.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: format {meta.get('format')!r}, expected {FORMAT!r} "
                         "(written by another version of cepo.checkpoint)")

    fresh = meta["optimizer"].get("fresh", False)  # saved before the optimizer's first step
    if fresh:
        model_sd, optim_sd = get_model_state_dict(model), None
    else:
        _ensure_optimizer_state(optimizer)
        model_sd, optim_sd = get_state_dict(model, optimizer)
    unique_sd, aliases = _drop_aliases(model_sd)
    to_load = {"model": unique_sd}
    missing = sorted(set(extra_models or {}) - set(meta.get("extra_models", [])))
    if missing:
        raise ValueError(f"checkpoint {path} holds no {missing} weights (saved by a run "
                         "without them, e.g. another --teacher); resume with the saving "
                         "run's settings or start a new run")
    extra_sd = {}
    for name, m in (extra_models or {}).items():
        extra_sd[name] = _drop_aliases(get_model_state_dict(m))
        to_load[f"extra_{name}"] = extra_sd[name][0]
    if not fresh:
        to_load["optim"], _ = _split_optim(optim_sd)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(to_load, storage_reader=_reader(path / "dcp"),
                     no_dist=_no_dist())
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise RuntimeError(f"checkpoint {path}: could not load the model / optimizer tensors: "
                           f"{e}\nThe model (architecture, LoRA settings) and the optimizer "
                           "(which parameters it trains) must be built as in the saving run"
                           ) from e
    for alias, kept in aliases.items():
        unique_sd[alias] = unique_sd[kept]
    for name, (sd, extra_aliases) in extra_sd.items():
        for alias, kept in extra_aliases.items():
            sd[alias] = sd[kept]
        set_model_state_dict(extra_models[name], sd)
    if fresh:
        set_model_state_dict(model, unique_sd)
        optimizer.state.clear()
        _check_groups(meta["optimizer"]["param_groups"], optimizer.param_groups)
        for group, saved in zip(optimizer.param_groups, meta["optimizer"]["param_groups"]):
            group.update({k: _like(v, group.get(k)) for k, v in saved.items() if k != "params"})
    else:
        set_state_dict(model, optimizer, model_state_dict=unique_sd,
                       optim_state_dict=_merge_optim(to_load["optim"], meta["optimizer"], optim_sd))
    if scheduler is not None:
        if meta["scheduler"] is None:
            raise ValueError(f"checkpoint {path} holds no scheduler state; pass scheduler=None "
                             "or resume from a checkpoint saved with one")
        scheduler.load_state_dict(meta["scheduler"])

    rng_file = path / f"rng_rank{_rank():05d}.safetensors"
    if meta["world_size"] == _world() and rng_file.is_file():
        with safe_open(str(rng_file), framework="pt") as f:
            _set_rng_state({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    else:
        warnings.warn(f"checkpoint {path} was saved by {meta['world_size']} ranks and is loaded "
                      f"by {_world()}: RNG streams are re-seeded per rank, not restored "
                      "(sampling after resume differs from an uninterrupted run)")
        _reseed(int(meta["step"]))
    return meta["trainer_state"]


# ----------------------------------------------------------------------------- export

def __getattr__(name: str):
    """``export_hf`` moved to ``cepo.export``; still importable from here (lazily: export
    imports this module)."""
    if name == "export_hf":
        from cepo.export import export_hf
        return export_hf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
