"""The decoder body and LM head of a Hugging Face causal LM, and a forward hook that runs
a fused-head function on the body's hidden states *inside* the model's forward.

Running inside ``model(...)`` matters: the call goes through whatever wraps the model
(PEFT, DDP), so adapters apply and gradients are synchronised as for any forward; only
the ``[tokens x vocab]`` logits are never built. The head weight is read directly (never
through ``lm_head(...)``), so sharding that gathers it per module (ZeRO-3) is unsupported.
"""

from __future__ import annotations

import functools
import types
from typing import Callable

import torch

from cepo_kernels import IGNORE_INDEX

HEAD_FN_KWARG = "cepo_head_fn"


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


def install_head_hook(model) -> None:
    """Let ``model(..., cepo_head_fn=fn)`` return ``fn(last_hidden_state [B, S, H], lm_head)``.

    The causal LM inside any PEFT wrapper gets a forward that, given ``cepo_head_fn``, runs
    the decoder body only and hands its final hidden states and the LM head to ``fn``;
    without it the previous forward runs unchanged (generation is untouched). Idempotent.
    """
    target = unwrap_peft(model)
    if getattr(target, "_cepo_head_hook", False):
        return
    body, head = body_and_head(target)
    previous = target.forward

    @functools.wraps(type(target).forward)
    def forward(self, *args, cepo_head_fn: Callable | None = None, **kwargs):
        if cepo_head_fn is None:
            return previous(*args, **kwargs)
        out = body(*args, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return cepo_head_fn(hidden, head)

    target.forward = types.MethodType(forward, target)
    target._cepo_head_hook = True


def run_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, fn: Callable):
    """``fn(hidden [B, S, H], lm_head)`` computed inside ``model``'s forward (see
    install_head_hook), with the same inputs TRL's own forward gets (ids, mask, no cache)."""
    kwargs = {HEAD_FN_KWARG: fn}
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)


def completion_targets(completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Targets [B, T] int64: the completion ids, IGNORE_INDEX (-100) where the mask is 0."""
    return completion_ids.long().masked_fill(completion_mask == 0, IGNORE_INDEX)


def completion_rows(hidden: torch.Tensor, head: torch.nn.Module, num_completion: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [B * T, H] that predict the last T = num_completion tokens, in the
    head's dtype; the head weight [V, H]). TRL's batches are a left-padded prompt then a
    right-padded completion, so these are positions S - T - 1 .. S - 2. The cast keeps one
    dtype for the kernels (TRL's ``cast_lm_head_to_fp32`` keeps an fp32 head)."""
    weight = head.weight
    rows = hidden[:, -num_completion - 1:-1, :]
    return rows.reshape(-1, rows.shape[-1]).to(weight.dtype), weight


def no_autocast(device: torch.device):
    """The fused kernels accumulate in fp32 themselves: keep autocast out of their matmuls."""
    return torch.autocast(device_type=device.type, enabled=False)
