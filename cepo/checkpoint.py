"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically, and the final
export in Hugging Face layout (safetensors).

Layout: ``<root>/step_000042/`` holds the DCP shards of model + optimizer, the
scheduler and trainer state (JSON), one RNG file per rank and a ``COMPLETE`` marker.
Everything is written into ``step_000042.tmp`` first; rank 0 renames it after every
rank has finished. A crash before the rename leaves the previous checkpoint the newest
complete one; stale ``.tmp`` directories are ignored and removed by the next save.
Nothing is pickled: tensors via DCP / safetensors, the rest as JSON.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(),
             "python": torch.tensor(list(json.dumps(random.getstate()).encode()), dtype=torch.uint8)}
    try:
        import numpy as np
        np_state = np.random.get_state()
        state["numpy"] = torch.tensor(list(json.dumps(
            [np_state[0], np_state[1].tolist(), *np_state[2:]]).encode()), dtype=torch.uint8)
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = json.loads(bytes(state["numpy"].tolist()).decode())
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").exists()]
    return max(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), default=None)


def save_checkpoint(root: str | Path, step: int, *, model, optimizer, scheduler=None,
                    trainer_state: dict, keep_last: int = 2) -> Path:
    """Save model, optimizer, scheduler, trainer state and RNG atomically; returns the path.

    Collective: every rank calls it. Works with FSDP2-sharded and plain modules.
    """
    from safetensors.torch import save_file

    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    save_file(_rng_state(), str(tmp / f"rng_rank{_rank():05d}.safetensors"))
    if _rank() == 0:
        meta = {"trainer_state": trainer_state, "world_size": _world(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    _barrier()
    if _rank() == 0:
        (tmp / "COMPLETE").write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # atomic on one filesystem: the checkpoint now exists, whole
        complete = sorted((p for p in root.iterdir()
                           if _STEP_DIR.match(p.name) and (p / "COMPLETE").exists()),
                          key=lambda p: int(_STEP_DIR.match(p.name).group(1)))
        for old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler=None) -> dict:
    """Restore a checkpoint written by save_checkpoint; returns the trainer state.

    Works on a freshly built optimizer that has never stepped (get_state_dict creates
    its state). RNG states are restored per rank; with a different world size the ranks'
    generators are re-seeded from rank 0's state plus the rank (said in a warning).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "COMPLETE").exists():
        raise ValueError(f"checkpoint {path} is incomplete (no COMPLETE marker)")
    meta = json.loads((path / "state.json").read_text())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / f"rng_rank{_rank():05d}.safetensors"
    if meta["world_size"] == _world() and rng_file.exists():
        _set_rng_state(load_file(str(rng_file)))
    else:
        import warnings
        warnings.warn(f"checkpoint saved with {meta['world_size']} ranks, loading with {_world()}: "
                      "RNG streams are re-seeded, not restored")
        torch.manual_seed(int(meta["trainer_state"].get("step", 0)) * 7919 + _rank())
    return meta["trainer_state"]


def export_hf(model, tokenizer, out_dir: str | Path, *, merge_lora: bool = True) -> Path | None:
    """Write the model in Hugging Face layout (safetensors), atomically; collective.

    ``model`` is the trainer's root module (``.lm`` is the HF or peft model) or an HF
    model. The weights are gathered one parameter at a time and kept on CPU; rank 0
    writes them. LoRA adapters are merged into plain
    weights so ``AutoModelForCausalLM.from_pretrained(out_dir)`` gives the trained model.
    """
    from cepo.weight_sync import iter_full_weights

    out_dir = Path(out_dir)
    lm = getattr(model, "lm", model)
    is_peft = hasattr(lm, "get_base_model")
    if is_peft and not merge_lora:
        raise ValueError("export_hf: merge_lora=False is not supported; export the adapter "
                         "with peft's save_pretrained instead")
    # one parameter gathered at a time (collective), kept on CPU, LoRA merged
    full = {name: t.detach().cpu() for name, t in iter_full_weights(lm)}
    base = lm.get_base_model() if is_peft else lm
    if _rank() == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if getattr(base.config, "tie_word_embeddings", False):
            full.pop("lm_head.weight", None)
        base.config.save_pretrained(tmp)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(tmp)
        _save_safetensors(full, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    _barrier()
    return out_dir if _rank() == 0 else None


def _save_safetensors(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = 5 << 30):
    """model.safetensors, or shards + index past max_shard_bytes (the Hugging Face layout)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards, current, size = [], {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += n
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
