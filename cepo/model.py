"""Loading Hugging Face causal LMs and running their decoder body on packed rows.

The trainer applies the LM head itself (fused kernels), so it only accepts architectures
whose logits are exactly ``hidden @ lm_head.weight.T``: no soft-capping, no logit
scaling, no head bias.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from cepo.packing import PackedBatch

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")


def check_supported(config) -> None:
    """Raise ValueError for architectures the fused head cannot reproduce exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    for attr in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, attr, None):
            raise ValueError(f"model: {attr} is set ({getattr(config, attr)}); logit soft-capping "
                             "is not supported by the fused head")
    for attr in ("logits_scaling", "logit_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"model: {attr}={value} rescales the logits; not supported by the "
                             "fused head")


def default_attn_implementation(device: torch.device | str) -> str:
    """flash_attention_2 when flash-attn is installed and the device is CUDA, else sdpa."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(path: str, *, dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None) -> nn.Module:
    """Load a local Hugging Face causal LM (safetensors only; never the hub)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model: no model directory at {path!r} (models are never "
                                "downloaded; pass a local Hugging Face checkpoint)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True,
        local_files_only=True)
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("model: the LM head has a bias; not supported by the fused head")
    return model


def decoder_body(model: nn.Module) -> nn.Module:
    """The base model (embeddings, decoder blocks, final norm) of a causal LM."""
    return model.get_decoder()


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head weight [V, H] (the embedding matrix when tied)."""
    return model.get_output_embeddings().weight


def body_hidden_states(body: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """[T, H] final hidden states (after the final norm) of a packed row.

    No attention mask and no cache: transformers then finds sequence boundaries from the
    position ids (packed rows are attended sequence by sequence). flash-attn varlen
    additionally gets the cumulative lengths.
    """
    kwargs = {}
    if getattr(body.config, "_attn_implementation", None) == "flash_attention_2":
        cu = batch.cu_seqlens.to(batch.input_ids.device)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.max_seqlen,
                      max_length_k=batch.max_seqlen)
    out = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
               **kwargs)
    return out.last_hidden_state[0]
