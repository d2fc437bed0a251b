"""The public ops: validate, then dispatch to Triton, chunked PyTorch or the reference."""

from __future__ import annotations

import torch

from . import _autograd, _validate, reference
from . import backend as _backend
from ._types import Evidence, LogProbs, PPOStats


def _engine(device: torch.device, requested: str | None):
    """The engine module for the resolved backend, or None for the reference."""
    name = _backend.resolve(device, requested)
    if name == "triton":
        from . import triton_ops
        return triton_ops
    if name == "torch":
        from . import chunked
        return chunked
    return None


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, return_entropy: bool = False,
                   backend: str | None = None) -> LogProbs:
    """Per-token log p(target) through the LM head without materialising [N, V] logits.

    hidden [N, H] (fp32 / bf16 / fp16), weight [V, H] (the LM head, same dtype; tied or
    not), targets [N] int64 in [0, V) or -100 (ignored: log-prob 0, no gradient).
    Returns LogProbs(logprobs [N], logsumexp [N], entropy [N] or None), float32 (float64
    for float64 inputs), computed from the logits hidden @ weight.T / temperature with
    fp32 accumulation. Differentiable w.r.t. hidden and weight (through logprobs,
    logsumexp and entropy); the backward recomputes vocabulary tiles.
    """
    _validate.check_head(hidden, weight, targets, temperature)
    engine = _engine(weight.device, backend)
    if engine is None:
        return reference.fused_logprobs(hidden, weight, targets, temperature=temperature,
                                        return_entropy=return_entropy)
    return _autograd.fused_logprobs(engine, hidden, weight, targets, temperature=temperature,
                                    return_entropy=return_entropy)


def contrastive_evidence(h_policy: torch.Tensor, h_pos: torch.Tensor, h_neg: torch.Tensor,
                         weight: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                         has_negative: torch.Tensor, *, lam: float, eps_w: float,
                         temperature: float = 1.0, backend: str | None = None) -> Evidence:
    """Log-probs of the same tokens under three contexts and the CEPO token advantages.

    h_policy, h_pos, h_neg [N, H]: hidden states of the same response tokens under the
    policy context, the correct-answer teacher and the wrong-answer teacher. advantages [N]:
    the sequence advantage A broadcast to its tokens; has_negative [N] bool: False where
    the group had no wrong answer (RLSD fallback delta = lp_pos - lp_policy). Computes
    docs/algorithm.md steps 3-5: delta = lp_pos - lp_neg, w = clip(exp(sign(A) delta), 1 +- eps_w),
    token_advantages = A ((1 - lam) + lam w). No gradient. On CUDA: one Triton launch in
    which each weight tile is loaded once and multiplied against all three contexts.
    """
    _validate.check_head(h_policy, weight, targets, temperature, hidden_name="h_policy")
    _validate.check_same_as("h_pos", h_pos, h_policy, "h_policy")
    _validate.check_same_as("h_neg", h_neg, h_policy, "h_policy")
    _validate.check_same_rows("advantages", advantages, h_policy)
    _validate.check_same_rows("has_negative", has_negative, h_policy, kind="bool")
    _validate.check_range("lam", lam, 0.0, 1.0)
    _validate.check_range("eps_w", eps_w, 0.0, 1.0)
    engine = _engine(weight.device, backend)
    return (engine or reference).contrastive_evidence(
        h_policy, h_pos, h_neg, weight, targets, advantages, has_negative,
        lam=float(lam), eps_w=float(eps_w), temperature=temperature)


def fused_linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          old_logprobs: torch.Tensor | None, token_advantages: torch.Tensor,
                          mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.28,
                          temperature: float = 1.0, normalizer: float | None = None,
                          ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                          return_entropy: bool = False, backend: str | None = None,
                          ) -> tuple[torch.Tensor, PPOStats]:
    """Token-mean PPO clipped surrogate through the LM head, with its backward fused.

    hidden [N, H], weight [V, H], targets [N] int64; old_logprobs [N] (log-probs under the
    policy that sampled, at the same temperature), or None for the on-policy case (one
    update per rollout batch: old = the current log-probs, detached, so r = 1 and no
    separate pass is needed), token_advantages [N], mask [N] bool
    (False, or target -100, contributes nothing). loss = sum_t m_t * -min(r_t A_t,
    clip(r_t, 1 - clip_low, 1 + clip_high) A_t) / normalizer with r_t = exp(lp_t - old_t);
    normalizer defaults to the number of kept tokens (pass the global token count when
    micro-batching or sharding so that gradients add up to the token mean of the whole
    batch). Optional k3 KL to a frozen reference: + kl_coef * (exp(ref - lp) - (ref - lp) - 1).
    Returns (loss 0-dim float32, PPOStats). Gradients w.r.t. hidden and weight are
    computed in the forward pass without storing [N, V]; backward scales them.
    """
    _validate.check_head(hidden, weight, targets, temperature)
    if old_logprobs is not None:
        _validate.check_same_rows("old_logprobs", old_logprobs, hidden)
    _validate.check_same_rows("token_advantages", token_advantages, hidden)
    _validate.check_same_rows("mask", mask, hidden, kind="bool")
    if ref_logprobs is not None:
        _validate.check_same_rows("ref_logprobs", ref_logprobs, hidden)
    _validate.check_range("clip_low", clip_low, 0.0, 1.0)
    _validate.check_range("clip_high", clip_high, 0.0, 100.0)
    _validate.check_range("kl_coef", kl_coef, 0.0, float("inf"))
    if normalizer is not None:
        _validate.check_range("normalizer", normalizer, 1e-12, float("inf"))
    options = dict(clip_low=clip_low, clip_high=clip_high, temperature=temperature,
                   normalizer=normalizer, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
                   return_entropy=return_entropy)
    engine = _engine(weight.device, backend)
    if engine is None:
        return reference.fused_linear_ppo_loss(hidden, weight, targets, old_logprobs,
                                               token_advantages, mask, **options)
    return _autograd.fused_linear_ppo_loss(engine, hidden, weight, targets, old_logprobs,
                                           token_advantages, mask, **options)
