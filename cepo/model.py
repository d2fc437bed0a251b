"""Loading Hugging Face causal LMs and running their decoder body on packed rows.

The trainer applies the LM head itself (fused kernels), so it only accepts architectures
whose logits are exactly ``final_hidden @ lm_head.weight.T``: no soft-capping, no logit
scaling, no head bias.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from cepo.packing import PackedBatch

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")


def check_supported(config, model: nn.Module | None = None) -> None:
    """Raise ValueError unless the fused head reproduces this model's logits exactly.

    config: a transformers PretrainedConfig. model (optional): the loaded causal LM, to
    also check that its LM head has no bias (not visible in the config alone).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (others need a check that their "
                         "logits are exactly hidden @ lm_head.weight.T)")
    for attr in ("final_logit_softcapping", "attn_logit_softcapping"):
        value = getattr(config, attr, None)
        if value:
            raise ValueError(f"model: config {attr}={value}; logit soft-capping (Gemma 2 style) "
                             "is not reproduced by the fused head: use a model without it")
    for attr in ("logits_scaling", "logit_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"model: config {attr}={value} rescales the logits (Granite / Cohere "
                             "style); not reproduced by the fused head")
    if model is not None:
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise ValueError(f"model: {type(model).__name__} has no LM head weight")
        if getattr(head, "bias", None) is not None:
            raise ValueError("model: the LM head has a bias; the fused head computes "
                             "hidden @ W.T only")


def default_attn_implementation(device: torch.device | str) -> str:
    """"flash_attention_2" when flash-attn is installed and importable and ``device`` is
    CUDA, else "sdpa". Both are exact on packed rows (see body_hidden_states)."""
    if torch.device(device).type != "cuda":
        return "sdpa"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "sdpa"
    try:  # installed but built against another torch / CUDA: fall back, don't crash later
        import flash_attn  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return "sdpa"
    return "flash_attention_2"


def load_causal_lm(path: str, *, dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None) -> nn.Module:
    """Load a local Hugging Face causal LM directory (safetensors only; never the hub).

    The config is checked (check_supported) before any weight is read, the LM head
    after. Returns the model in eval mode as transformers leaves it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model: no model directory at {path!r} (models are never "
                                "downloaded; pass a local Hugging Face checkpoint directory)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model: {path!r} has no config.json; expected a Hugging Face "
                                "checkpoint directory (save_pretrained layout)")
    if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json")
               for f in os.listdir(path)):
        raise FileNotFoundError(f"model: {path!r} has no *.safetensors weights (pickled .bin "
                                "checkpoints are not loaded); convert with "
                                "model.save_pretrained(dir, safe_serialization=True)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True,
        local_files_only=True)
    check_supported(model.config, model)
    return model


def decoder_body(model: nn.Module) -> nn.Module:
    """The base model of a causal LM: embeddings, decoder blocks, final norm, no head
    (``model.model`` for Qwen2/3, Llama, Mistral; found via ``get_decoder()``)."""
    body = model.get_decoder()
    if body is model or not hasattr(body, "layers"):
        raise ValueError(f"model: cannot find the decoder body of {type(model).__name__} "
                         "(get_decoder() returned no module with .layers)")
    return body


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head weight [V, H]; when tied, the very embedding Parameter."""
    return model.get_output_embeddings().weight


def _is_flash(config) -> bool:
    impl = getattr(config, "_attn_implementation", None)
    return impl is not None and "flash" in impl


def body_hidden_states(body: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """[T, H] final hidden states (after the final norm) of one packed row.

    Runs the body with ``position_ids``, ``use_cache=False`` and no attention mask:
    transformers 5.23 then derives the sequence boundaries from the position ids and
    attention stays within each sequence (with a mask, or with the default cache, it
    silently leaks across sequences). Flash-attention implementations also get the
    varlen kwargs (cu_seq_lens_q/k, max_length_q/k), which skips transformers'
    per-layer boundary inference from position ids.
    """
    if batch.input_ids.dim() != 2 or batch.input_ids.shape[0] != 1:
        raise ValueError(f"body_hidden_states: input_ids must be one packed row [1, T], got "
                         f"{tuple(batch.input_ids.shape)} (use pack_sequences)")
    if batch.position_ids.shape != batch.input_ids.shape:
        raise ValueError("body_hidden_states: position_ids must have the shape of input_ids")
    kwargs = {}
    if _is_flash(body.config):
        cu = batch.cu_seqlens.to(batch.input_ids.device, torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(batch.max_seqlen),
                      max_length_k=int(batch.max_seqlen))
    out = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
               **kwargs)
    return out.last_hidden_state[0]
