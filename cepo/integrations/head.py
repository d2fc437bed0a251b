"""The decoder body and LM head of a Hugging Face causal LM, and the hidden states that
predict a padded batch's completion tokens: what the fused kernels take instead of logits.
"""

from __future__ import annotations

import torch

from cepo_kernels import IGNORE_INDEX


def unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected), else model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def body_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body returning last_hidden_state, LM head) of a causal LM.

    Raises ValueError for heads the fused kernels cannot reproduce: a bias, logit
    soft-capping or a logit scale (the kernels compute ``h @ W.T / temperature`` only).
    """
    model = unwrap_peft(model)
    get_decoder = getattr(model, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None:
        raise ValueError(f"{type(model).__name__}: cannot find a decoder body (get_decoder()) and "
                         f"an LM head (get_output_embeddings()); the fused path needs a "
                         f"*ForCausalLM model")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: the LM head has a bias, which the fused kernels "
                         f"do not apply; use trl.GRPOTrainer for this model")
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                 "lm_head_multiplier"):
        if getattr(text_config, name, None) not in (None, 1.0):
            raise ValueError(f"{type(model).__name__}: config.{name}="
                             f"{getattr(text_config, name)} changes the logits, which the fused "
                             f"kernels do not; use trl.GRPOTrainer for this model")
    return body, head


def completion_hidden(body: torch.nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, num_completion: int) -> torch.Tensor:
    """Hidden states [B, T, H] at the positions that predict the last T = num_completion
    tokens of ``input_ids`` [B, S] (left-padded prompt + right-padded completion, as TRL
    builds them). The body is called like the full model would be (ids and attention mask,
    no cache), so the states equal those the LM head would see in ``model(...)``.
    """
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, -num_completion - 1:-1, :]


def completion_targets(completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Targets [B, T] int64: the completion ids, IGNORE_INDEX (-100) where the mask is 0."""
    return completion_ids.long().masked_fill(completion_mask == 0, IGNORE_INDEX)


def head_weight_for(hidden: torch.Tensor, head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden cast to the head's dtype, head weight [V, H]): the kernels want one dtype
    (TRL's ``cast_lm_head_to_fp32`` keeps an fp32 head under a bf16 body)."""
    weight = head.weight
    return hidden.to(weight.dtype), weight
