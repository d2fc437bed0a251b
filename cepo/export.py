"""The final export: the trained model in Hugging Face layout (safetensors), atomically.

The weights come from ``cepo.weight_sync.iter_full_weights``, the same stream the
sampler is updated from, so LoRA is merged by one function for both (and the exported
model is the one the sampler ran).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch

from cepo.checkpoint import _fsync_dir, _on_rank0, _rank, _replace_dir
from cepo.weight_sync import is_peft_model, iter_full_weights_with_params

log = logging.getLogger(__name__)

_PEFT_WRAPPER = re.compile(r"\.(base_layer|original_module|modules_to_save\.[^.]+)\.")


def hf_name(name: str) -> str:
    """A peft base model's parameter name as the plain Hugging Face model names it."""
    return _PEFT_WRAPPER.sub(".", name)


def _module_prefix(root: torch.nn.Module, sub: torch.nn.Module) -> str:
    for name, m in root.named_modules():
        if m is sub:
            return f"{name}." if name else ""
    raise ValueError("export_hf: the Hugging Face model is not a submodule of 'model'")


def _persistent_buffers(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that belong in the state dict (not sharded by FSDP2: every rank has them)."""
    out = {}
    for name, module in base.named_modules():
        for bname, b in module._buffers.items():
            if b is not None and bname not in module._non_persistent_buffers_set:
                out[hf_name(f"{name}.{bname}" if name else bname)] = b.detach().cpu()
    return out


def _tie(base: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Names that share one parameter in the live model share one tensor in ``sd`` (the
    stream yields a tied parameter once), so that transformers' save drops the duplicate."""
    groups: dict[int, list[str]] = {}
    for name, param in base.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(hf_name(name))
    for names in groups.values():
        kept = [n for n in names if n in sd]
        if kept:
            for n in names:
                sd.setdefault(n, sd[kept[0]])


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full Hugging Face state dict (CPU) of ``model`` (a HF or peft model, FSDP2 or
    not), LoRA merged; collective under FSDP2. Rank 0 gets it; other ranks get {}."""
    keep = _rank() == 0
    sd = {}
    for name, tensor, _ in iter_full_weights_with_params(model):
        if keep:
            sd[name] = tensor.detach().cpu()
    if keep:
        base = model.get_base_model() if is_peft_model(model) else model
        for name, b in _persistent_buffers(base).items():
            sd.setdefault(name, b)
        _tie(base, sd)
    return sd


PROCESSOR_FILES = ("processor_config.json", "video_preprocessor_config.json")
"""Processor files of a vision-language checkpoint copied into the export as they are (the
image processor itself is saved from the run's, with its pixel bounds)."""


def export_hf(model, tokenizer, out_dir: str | Path, *, merge_lora: bool = True,
              image_processor=None, source_dir: str | Path | None = None) -> Path:
    """Write the model in Hugging Face layout (safetensors), atomically; collective.

    ``model`` is the trainer's root module (``.lm`` is the Hugging Face or peft model) or
    a Hugging Face / peft model, sharded with FSDP2 or not. Every rank takes part in the
    gathers; rank 0 holds the full weights in CPU memory and writes ``config.json``,
    ``generation_config.json``, ``model.safetensors`` (sharded with an index past 5 GB)
    and the tokenizer, via the model's own ``save_pretrained`` (tied weights dropped,
    weight-name conversions reverted). A peft LoRA model is merged into plain weights
    (``cepo.weight_sync.merge_lora_weight``, as for the sampler) so that
    ``from_pretrained(out_dir)`` is the trained model; with ``merge_lora=False`` the
    adapter alone is written in peft's layout (``adapter_config.json`` +
    ``adapter_model.safetensors``). Vision-language models: ``image_processor`` is saved
    too (preprocessor_config.json) and the other processor files of ``source_dir``
    (PROCESSOR_FILES) are copied, so ``AutoModelForImageTextToText`` /
    ``AutoProcessor.from_pretrained(out_dir)`` load the export. Written into
    ``<out_dir>.tmp`` and renamed. Returns ``out_dir`` on every rank.
    """
    out_dir = Path(out_dir)
    lm = getattr(model, "lm", model)
    is_peft = is_peft_model(lm)
    base = lm.get_base_model() if is_peft else lm
    if getattr(base, "_hf_peft_config_loaded", False):
        raise ValueError("export_hf: adapters added with transformers' add_adapter are not "
                         "supported; wrap the model with peft.get_peft_model instead")
    if not hasattr(base, "save_pretrained"):
        raise ValueError(f"export_hf: {type(base).__name__} is not a Hugging Face model "
                         "(no save_pretrained); pass the trainer's policy or the HF model")
    prefix = _module_prefix(model, lm)
    inside = {id(p) for p in lm.parameters()}
    outside = [n for n, p in model.named_parameters() if id(p) not in inside]
    if outside and _rank() == 0:
        log.warning("export_hf: %d tensors outside the Hugging Face model are not exported "
                    "(e.g. %s)", len(outside), outside[0])

    if merge_lora or not is_peft:
        sd = merged_state_dict(lm)
    else:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
        sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}

    def write():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if merge_lora or not is_peft:
            base.save_pretrained(tmp, state_dict=sd, max_shard_size="5GB")
        else:
            lm.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if image_processor is not None:
            image_processor.save_pretrained(tmp)
        if source_dir is not None:
            for name in PROCESSOR_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copyfile(Path(source_dir) / name, tmp / name)
        _fsync_dir(tmp)
        _replace_dir(tmp, out_dir)

    _on_rank0(write, f"export to {out_dir}")
    return out_dir
