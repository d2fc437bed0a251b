"""Loading Hugging Face causal LMs and running their decoder body on packed rows.

The trainer applies the LM head itself (fused kernels), so it only accepts architectures
whose logits are exactly ``final_hidden @ lm_head.weight.T``: no soft-capping, no logit
scaling, no head bias.
"""

from __future__ import annotations

import itertools
import os

import torch
from torch import nn

from cepo import varlen_attention
from cepo.packing import PackedBatch

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")


def check_supported(config, model: nn.Module | None = None) -> None:
    """Raise ValueError unless the fused head reproduces this model's logits exactly.

    config: a transformers PretrainedConfig. model (optional): the loaded causal LM, to
    also check that its LM head has no bias (not visible in the config alone).
    """
    from cepo.vision import VL_MODEL_TYPES

    model_type = getattr(config, "model_type", None)
    if model_type in VL_MODEL_TYPES:  # the head reads the language model's hidden states
        config = config.text_config
    elif model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES + VL_MODEL_TYPES)} (others need a "
                         "check that their logits are exactly hidden @ lm_head.weight.T)")
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


_HALF_DTYPES = (torch.bfloat16, torch.float16)


def default_attn_implementation(device: torch.device | str,
                                compute_dtype: torch.dtype | None = None) -> str:
    """The attention implementation to load a model with, given where and in which dtype
    its attention will run.

    "flash_attention_2" only when ``device`` is CUDA, ``compute_dtype`` is bfloat16 or
    float16 (flash-attn refuses float32) and flash-attn imports; else "sdpa". Under an
    FSDP2 bf16 mixed-precision policy the compute dtype is bfloat16 even though the
    model is loaded in float32: pass the dtype attention runs in, not the load dtype.
    ``compute_dtype=None`` counts as float32 (the safe choice: SDPA runs every dtype).
    Both are exact on packed rows (see body_hidden_states).
    """
    if torch.device(device).type != "cuda" or compute_dtype not in _HALF_DTYPES:
        return "sdpa"
    return "flash_attention_2" if _flash_attn_importable() else "sdpa"


def _flash_attn_importable() -> bool:
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return False
    try:  # installed but built against another torch / CUDA: fall back, don't crash later
        import flash_attn  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def check_attn_implementation(attn_implementation: str, compute_dtype: torch.dtype) -> None:
    """Raise ValueError when an explicitly requested implementation cannot run in
    ``compute_dtype``: flash-attention kernels take bfloat16 / float16 only."""
    if "flash" in attn_implementation and compute_dtype not in _HALF_DTYPES:
        raise ValueError(f"config: attn_implementation={attn_implementation!r} needs bfloat16 "
                         f"or float16 compute, but attention runs in {compute_dtype}; use "
                         "attn_implementation 'sdpa' or dtype bfloat16")


def load_causal_lm(path: str, *, dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None) -> nn.Module:
    """Load a local Hugging Face causal LM directory (safetensors only; never the hub); a
    Qwen3-VL / Qwen2.5-VL checkpoint (detected from its config) loads with
    ``AutoModelForImageTextToText``.

    The config is checked (check_supported) before any weight is read, the LM head
    after. Returns the model in eval mode as transformers leaves it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from cepo.vision import VL_MODEL_TYPES

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
    auto = (AutoModelForImageTextToText if config.model_type in VL_MODEL_TYPES
            else AutoModelForCausalLM)
    model = auto.from_pretrained(
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


def block_causal_mask(batch: PackedBatch, device: torch.device | str | None = None) -> torch.Tensor:
    """[T, T] bool: query i may attend key j iff both lie in the same packed sequence and
    j <= i. Built from ``batch.cu_seqlens`` alone (position ids play no part)."""
    t = batch.num_tokens
    device = batch.input_ids.device if device is None else device
    lens = torch.as_tensor(batch.seq_lens, dtype=torch.long, device=device)
    seq = torch.repeat_interleave(torch.arange(len(batch.seq_lens), device=device), lens)
    pos = torch.arange(t, device=device)
    return (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])


def packed_attention_kwargs(config, batch: PackedBatch, compute_dtype: torch.dtype) -> dict:
    """Keyword arguments for the decoder body that confine attention to each packed
    sequence, given explicitly, for every attention implementation transformers >= 5.10
    runs packed rows with:

    - flash-attention ("flash" in the name): ``cu_seq_lens_q/k`` [B + 1] int32 and
      ``max_length_q/k`` (ints), the varlen call; no mask.
    - "sdpa": ``attention_mask`` [1, 1, T, T] bool block-diagonal causal (True = attend);
      run_packed does not use it (SDPA runs per sequence there), the tests compare to it.
    - "eager": the same as an additive mask in ``compute_dtype`` (0 / dtype min).
    - "flex_attention": a BlockMask of the same pattern.

    A 4-D mask is used by transformers as given (no mask building, no boundary
    inference from position ids), so exactness does not depend on its minor version.
    The T x T mask costs what transformers' own packed sdpa / eager mask costs.
    """
    impl = getattr(config, "_attn_implementation", None) or "eager"
    device = batch.input_ids.device
    if "flash" in impl:
        cu = batch.cu_seqlens.to(device, torch.int32)
        return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(batch.max_seqlen),
                    max_length_k=int(batch.max_seqlen))
    if impl == "sdpa":
        return dict(attention_mask=block_causal_mask(batch)[None, None])
    if impl == "eager":
        allowed = block_causal_mask(batch)[None, None]
        additive = torch.zeros(allowed.shape, dtype=compute_dtype, device=device)
        return dict(attention_mask=additive.masked_fill_(~allowed, torch.finfo(compute_dtype).min))
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        lens = torch.as_tensor(batch.seq_lens, dtype=torch.long, device=device)
        seq = torch.repeat_interleave(torch.arange(len(batch.seq_lens), device=device), lens)[None]

        def same_sequence_causal(b, h, q_idx, kv_idx):
            return (seq[b, q_idx] == seq[b, kv_idx]) & (kv_idx <= q_idx)

        t = batch.num_tokens
        return dict(attention_mask=create_block_mask(same_sequence_causal, B=1, H=None,
                                                     Q_LEN=t, KV_LEN=t, device=device,
                                                     _compile=True))
    raise ValueError(f"model: attn_implementation {impl!r} cannot run packed rows (no way to "
                     "pass sequence boundaries to it); use 'sdpa', 'eager', 'flex_attention' "
                     "or 'flash_attention_2'")


def supports_shared_contexts(model: nn.Module) -> bool:
    """True when packed passes of this model (the plain HF causal LM or vision-language
    model) can run shared-context batches (cepo.shared_context): its (language model's)
    packed attention is cepo's varlen SDPA (implementation "sdpa") and every layer is
    attention (full or sliding)."""
    config = model.config.get_text_config()
    impl = getattr(config, "_attn_implementation", None)
    if impl != "sdpa" or getattr(model.config, "_attn_implementation", impl) != "sdpa":
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return set(layer_types) <= {"full_attention", "sliding_attention"}


def body_hidden_states(body: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """[T, H] final hidden states (after the final norm) of one packed row.

    The sequence boundaries are passed explicitly (packed_attention_kwargs: varlen
    cu_seqlens for flash-attention, a 4-D block-diagonal causal mask for eager and flex;
    for "sdpa", the model's default, attention runs per sequence through
    cepo.varlen_attention, with no T x T mask at all), so
    attention stays within each sequence whatever transformers would infer from the
    position ids; ``position_ids`` restart per sequence for the rotary embedding, and
    ``use_cache=False`` (a cache would change the mask path).
    """
    if batch.input_ids.dim() != 2 or batch.input_ids.shape[0] != 1:
        raise ValueError(f"body_hidden_states: input_ids must be one packed row [1, T], got "
                         f"{tuple(batch.input_ids.shape)} (use pack_sequences)")
    if batch.position_ids.shape != batch.input_ids.shape:
        raise ValueError("body_hidden_states: position_ids must have the shape of input_ids")
    if int(batch.cu_seqlens[-1]) != batch.num_tokens or sum(batch.seq_lens) != batch.num_tokens:
        raise ValueError(f"body_hidden_states: cu_seqlens / seq_lens cover "
                         f"{int(batch.cu_seqlens[-1])} / {sum(batch.seq_lens)} tokens, the row "
                         f"has {batch.num_tokens} (use pack_sequences)")
    out = run_packed(body, batch, input_ids=batch.input_ids, position_ids=batch.position_ids)
    return out.last_hidden_state[0]


def run_packed(module: nn.Module, batch: PackedBatch, **inputs):
    """``module(**inputs)`` on one packed row (a decoder body, or a vision-language model's
    language model), attention confined to each sequence of ``batch``, no cache.

    "sdpa" (the default) runs attention per sequence (cepo.varlen_attention: no T x T
    mask); the other implementations get the boundaries from packed_attention_kwargs.
    """
    if getattr(module.config, "_attn_implementation", None) == "sdpa":
        extra = {} if batch.prefix_of is None else {"cepo_prefix_of": batch.prefix_of}
        with varlen_attention.packed_forward(module.config):
            return module(**inputs, use_cache=False,
                          cepo_seq_bounds=[0, *itertools.accumulate(batch.seq_lens)], **extra)
    if batch.prefix_of is not None:
        raise ValueError(f"run_packed: a shared-context batch needs the 'sdpa' attention "
                         f"implementation (cepo.varlen_attention), not "
                         f"{module.config._attn_implementation!r}; check "
                         "supports_shared_contexts before building one")
    # the dtype attention scores are computed in: the embedding's, which under an FSDP2
    # mixed-precision policy is the unsharded (bf16) parameter during the forward
    compute_dtype = module.get_input_embeddings().weight.dtype
    return module(**inputs, use_cache=False,
                  **packed_attention_kwargs(module.config, batch, compute_dtype))
