"""Streaming the policy's weights to a sampler: full tensors, one gathered at a time.

Under FSDP2 each parameter is a DTensor shard; ``full_tensor()`` all-gathers one
parameter. The stream groups the gathered tensors into buckets of at most
``bucket_bytes`` (a larger single tensor is a bucket of its own) and yields a bucket
before gathering the next parameter, so the extra memory held is one bucket. LoRA
adapters are merged into the base weights (W + B A * scaling) on the fly, so the
sampler only ever sees plain Hugging Face weights. Every rank must iterate the whole
stream (the gathers are collective), whether or not it keeps the tensors.
"""

from __future__ import annotations

from typing import Iterator

import torch

DEFAULT_BUCKET_BYTES = 256 << 20


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def iter_full_weights(lm: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) for every parameter of a HF or peft model."""
    if not hasattr(lm, "get_base_model"):
        for name, p in lm.named_parameters():
            yield name, _full(p.detach())
        return
    base = lm.get_base_model()
    modules = dict(base.named_modules())
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        weight = _full(p.detach())
        if name.endswith(".base_layer.weight"):
            module = modules[name[: -len(".base_layer.weight")]]
            for adapter in module.active_adapters:
                a = _full(module.lora_A[adapter].weight.detach()).float()
                b = _full(module.lora_B[adapter].weight.detach()).float()
                weight = (weight.float() + (b @ a) * module.scaling[adapter]).to(weight.dtype)
        yield name.replace(".base_layer", ""), weight


def iter_weight_buckets(lm: torch.nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES
                        ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets (lists of (name, tensor)) of at most bucket_bytes each, gathered lazily."""
    bucket, size = [], 0
    for name, tensor in iter_full_weights(lm):
        n = tensor.numel() * tensor.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += n
    if bucket:
        yield bucket
