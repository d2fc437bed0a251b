"""Result types of the cepo_kernels ops.

All per-token outputs are float32 tensors of shape [N] (bool for masks), on the
device of the inputs; float64 when the inputs are float64 (reference / gradcheck).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE_INDEX = -100
"""A target equal to this contributes nothing (log-prob 0, no gradient), as in torch."""


class LogProbs(NamedTuple):
    """Output of :func:`cepo_kernels.fused_logprobs`.

    logprobs:  [N] log p(target) at the given temperature (0 where target is ignored).
    logsumexp: [N] logsumexp of the tempered logits (the log partition function).
    entropy:   [N] entropy of the tempered distribution, or None if not requested.
    """

    logprobs: torch.Tensor
    logsumexp: torch.Tensor
    entropy: torch.Tensor | None


class Evidence(NamedTuple):
    """Output of :func:`cepo_kernels.contrastive_evidence` (all [N]).

    lp_policy, lp_pos, lp_neg: log-probs of the same tokens under the policy context,
        the correct-answer teacher and the wrong-answer teacher.
    delta: D_t, the contrastive evidence lp_pos - lp_neg (lp_pos - lp_policy where the
        group has no wrong answer: the RLSD fallback).
    token_advantages: A_t * ((1 - lam) + lam * w_t), w_t = clip(exp(sign(A) D_t), 1 +- eps_w).
    clipped: bool, whether exp(sign(A) D_t) fell outside [1 - eps_w, 1 + eps_w].
    """

    lp_policy: torch.Tensor
    lp_pos: torch.Tensor
    lp_neg: torch.Tensor
    delta: torch.Tensor
    token_advantages: torch.Tensor
    clipped: torch.Tensor


class PPOStats(NamedTuple):
    """Diagnostics of :func:`cepo_kernels.fused_linear_ppo_loss`, 0-dim tensors (no sync).

    Means are over the tokens the mask keeps. ``clip_frac_low``: fraction with A < 0 and
    ratio < 1 - clip_low (the lower clip binds); ``clip_frac_high``: A > 0 and ratio >
    1 + clip_high; ``approx_kl``: k3 estimate of KL(old || new), mean of (r - 1) - log r;
    ``ratio_mean``: mean ratio; ``entropy``: mean entropy (None unless requested);
    ``num_tokens``: how many tokens the mask keeps; ``clip_frac_dual``: with ``clip_dual``
    set, fraction with A < 0 where the dual-clip bound c binds (max(-A r, -A clip(r)) > -A c:
    verl's and EasyR1's ``pg_clipfrac_lower``), 0 without it; ``logprobs``: [N] float32, detached,
    the per-token log p(target) under the current weights (0 where the target is
    IGNORE_INDEX), free from the forward: with one update per rollout batch these are
    the old log-probs, and comparing them with the sampler's guards weight sync.
    """

    clip_frac_low: torch.Tensor
    clip_frac_high: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    entropy: torch.Tensor | None
    num_tokens: torch.Tensor
    logprobs: torch.Tensor | None = None
    clip_frac_dual: torch.Tensor | None = None


class SelfDistillStats(NamedTuple):
    """Diagnostics of :func:`cepo_kernels.fused_linear_self_distill_loss` (no sync).

    divergence: 0-dim, mean per-token divergence over the kept tokens (unweighted by
        token_weights, not divided by the normalizer).
    entropy: 0-dim, mean entropy of the student's tempered distribution over kept tokens.
    num_tokens: 0-dim, how many tokens the mask keeps.
    logprobs: [N] float32, detached: the student's log p(target) (0 where the target is
        IGNORE_INDEX), free from the forward.
    token_divergence: [N] float32, detached: the per-token divergence (0 where not kept),
        e.g. for token-credit maps.
    """

    divergence: torch.Tensor
    entropy: torch.Tensor
    num_tokens: torch.Tensor
    logprobs: torch.Tensor
    token_divergence: torch.Tensor
