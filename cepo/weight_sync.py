"""Plain Hugging Face weights from the policy, full tensors, one gathered at a time.

One place turns the trained model into the weights a Hugging Face model holds: the
sampler's weight sync (``iter_weight_buckets``) and the export (``cepo.export``) both
read ``iter_full_weights``, so the sampler and the exported model cannot disagree.

Under FSDP2 each parameter is a DTensor shard; ``full_tensor()`` all-gathers one
parameter (a shard that CPU offloading keeps in host memory is first moved to the
mesh's device, so the gather runs on the GPU backend). A peft LoRA model is merged on
the fly with ``merge_lora_weight`` (what peft's ``merge_and_unload`` computes, done on
gathered tensors because peft's merge cannot run on FSDP2 shards). The bucketed stream
groups the gathered tensors into buckets of at most ``bucket_bytes`` (a larger single
tensor is a bucket of its own) and yields a bucket before gathering the next parameter,
so the extra memory held is one bucket. Every rank must iterate the whole stream (the
gathers are collective), whether or not it keeps the tensors.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

DEFAULT_BUCKET_BYTES = 256 << 20


def gather_full(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a parameter (a DTensor is all-gathered; others returned as is).

    A DTensor whose local shard is not on its mesh's device (FSDP2 with CPU offload: a
    CUDA mesh, shards in host memory) is moved to that device first, so the all-gather
    runs there (NCCL) and the full tensor lands on the GPU, where the sampler reads it.
    """
    if not hasattr(t, "full_tensor"):
        return t
    local = t.to_local()
    mesh_type = t.device_mesh.device_type
    if local.device.type != mesh_type:
        from torch.distributed.tensor import DTensor

        module = getattr(torch, mesh_type)
        device = torch.device(mesh_type, module.current_device())
        t = DTensor.from_local(local.to(device, non_blocking=True), t.device_mesh,
                               t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return t.full_tensor()


def is_peft_model(lm: nn.Module) -> bool:
    return hasattr(lm, "get_base_model") and hasattr(lm, "peft_config")


def merge_lora_weight(layer: nn.Module, weight: torch.Tensor,
                      gather: Callable[[torch.Tensor], torch.Tensor] = gather_full,
                      where: str = "") -> torch.Tensor:
    """The base weight of one peft LoRA layer with its active adapters merged in.

    ``weight`` is the (gathered) base weight; the adapters' A and B are read from the
    layer through ``gather``. Linear: ``W + (B @ A) * scaling`` (transposed when the
    layer is ``fan_in_fan_out``, e.g. GPT-2's Conv1D, W [in, out]); Embedding:
    ``W + (B @ A).T * scaling`` (W [num_embeddings, dim]). Summed over the active
    adapters this layer has and that are not merged already, in float32, cast back to
    ``weight.dtype``; disabled adapters leave W as is (what ``merge_and_unload`` gives).
    Raises NotImplementedError for what it does not merge: LoRA variants (DoRA, ...),
    LoRA biases, and other peft layers (conv, attention, parameter wrappers).
    """
    from peft.tuners.lora import layer as lora_layer

    kind = type(layer).__name__
    if not isinstance(layer, (lora_layer.Linear, lora_layer.Embedding)):
        raise NotImplementedError(f"LoRA merge: cannot merge the peft layer {kind} at {where!r} "
                                  "(only Linear and Embedding LoRA layers are merged); target "
                                  "Linear or Embedding modules ('lora_target_modules')")
    if layer.disable_adapters:
        return weight
    is_linear = isinstance(layer, lora_layer.Linear)
    own = layer.lora_A if is_linear else layer.lora_embedding_A
    adapters = [a for a in layer.active_adapters if a in own and a not in layer.merged_adapters]
    delta = None
    for a in adapters:
        if getattr(layer, "lora_variant", {}).get(a) is not None or \
                getattr(layer, "use_dora", {}).get(a, False):
            raise NotImplementedError(f"LoRA merge: adapter {a!r} at {where!r} is a LoRA variant "
                                      "(e.g. DoRA), which is not merged; use plain LoRA")
        if getattr(layer, "lora_bias", {}).get(a, False):
            raise NotImplementedError(f"LoRA merge: adapter {a!r} at {where!r} has a LoRA bias "
                                      "(lora_bias=True), which is not merged; use lora_bias=False")
        if is_linear:
            A = gather(layer.lora_A[a].weight.detach()).float()
            B = gather(layer.lora_B[a].weight.detach()).float()
            d = B @ A
            d = d.T if layer.fan_in_fan_out else d
        else:
            A = gather(layer.lora_embedding_A[a].detach()).float()
            B = gather(layer.lora_embedding_B[a].detach()).float()
            d = (B @ A).T
        d = d.to(weight.device) * layer.scaling[a]
        delta = d if delta is None else delta + d
    if delta is None:
        return weight
    return (weight.float() + delta).to(weight.dtype)


def _peft_weights(base: nn.Module, gather) -> Iterator[tuple[str, torch.Tensor, nn.Parameter]]:
    """(HF name, full tensor, source parameter) of a peft model's base model, merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    seen: set[int] = set()
    skip: list[str] = []  # module prefixes already handled by a wrapper above

    def plain(prefix: str, module: nn.Module, recurse: bool):
        for pname, p in module.named_parameters(recurse=recurse):
            if id(p) not in seen:
                seen.add(id(p))
                yield prefix + pname, gather(p.detach()), p

    for name, module in base.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        p = f"{name}." if name else ""
        if isinstance(module, ModulesToSaveWrapper):  # the active copy replaces the original
            skip.append(p)
            active = [] if module.disable_adapters else [
                a for a in module.active_adapters if a in module.modules_to_save]
            chosen = module.modules_to_save[active[0]] if active else module.original_module
            yield from plain(p, chosen, recurse=True)
            for q in module.parameters():
                seen.add(id(q))
        elif isinstance(module, BaseTunerLayer):
            skip.append(p)
            inner = module.get_base_layer()
            for pname, q in inner.named_parameters(recurse=False):
                seen.add(id(q))
                t = gather(q.detach())
                if pname == "weight":
                    t = merge_lora_weight(module, t, gather, where=name)
                yield p + pname, t, q
            for q in module.parameters():
                seen.add(id(q))
        else:
            yield from plain(p, module, recurse=False)


def iter_full_weights_with_params(lm: nn.Module, gather=gather_full
                                  ) -> Iterator[tuple[str, torch.Tensor, nn.Parameter]]:
    """(HF name, full tensor, the live parameter it came from) for a HF or peft model.

    Each parameter once (tied weights under their first name); LoRA merged, adapters
    dropped, ``modules_to_save`` copies under the original names. Collective under FSDP2.
    """
    if not is_peft_model(lm):
        for name, p in lm.named_parameters():
            yield name, gather(p.detach()), p
        return
    yield from _peft_weights(lm.get_base_model(), gather)


def iter_full_weights(lm: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) for every parameter of a HF or peft model."""
    for name, tensor, _ in iter_full_weights_with_params(lm):
        yield name, tensor


def iter_weight_buckets(lm: nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES
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
