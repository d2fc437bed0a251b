"""The public ops: validate, then dispatch to Triton or chunked PyTorch (custom ops, see
_autograd) or the reference."""

from __future__ import annotations

import torch

from . import _autograd, _math, _validate, reference
from . import backend as _backend
from ._types import Evidence, LogProbs, PPOStats, SelfDistillStats


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
        _validate.check_target_values(targets, weight.shape[0])
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
    if engine is None:
        _validate.check_target_values(targets, weight.shape[0])
        return reference.contrastive_evidence(h_policy, h_pos, h_neg, weight, targets, advantages,
                                              has_negative, lam=float(lam), eps_w=float(eps_w),
                                              temperature=temperature)
    return _autograd.contrastive_evidence(engine, h_policy, h_pos, h_neg, weight, targets,
                                          advantages, has_negative, lam=lam, eps_w=eps_w,
                                          temperature=temperature)


def fused_linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          old_logprobs: torch.Tensor | None, token_advantages: torch.Tensor,
                          mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.28,
                          temperature: float = 1.0, normalizer: float | None = None,
                          ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                          return_entropy: bool = False, clip_dual: float | None = None,
                          token_weights: torch.Tensor | None = None, backend: str | None = None,
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
    clip_dual = c > 1 (dual-clip PPO, as verl's clip_ratio_c / EasyR1's clip_ratio_dual,
    whose default is 3.0): for A < 0 the per-token loss becomes
    min(max(-A r, -A clip(r)), -A c), so a very large ratio cannot make a negative-advantage
    token's loss unbounded; stats.clip_frac_dual counts where c binds. token_weights [N]:
    loss = sum_t m_t w_t l_t / normalizer; w_t = 1 / len(seq(t)) with normalizer = the
    number of sequences is the sequence-mean aggregation (verl's "seq-mean-token-mean").
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
    if clip_dual is not None:
        _validate.check_above("clip_dual", clip_dual, 1.0, "EasyR1 and verl default to 3.0")
    if token_weights is not None:
        _validate.check_same_rows("token_weights", token_weights, hidden)
    options = dict(clip_low=clip_low, clip_high=clip_high, temperature=temperature,
                   normalizer=normalizer, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
                   return_entropy=return_entropy,
                   clip_dual=None if clip_dual is None else float(clip_dual),
                   token_weights=token_weights)
    engine = _engine(weight.device, backend)
    if engine is None:
        _validate.check_target_values(targets, weight.shape[0])
        return reference.fused_linear_ppo_loss(hidden, weight, targets, old_logprobs,
                                               token_advantages, mask, **options)
    return _autograd.fused_linear_ppo_loss(engine, hidden, weight, targets, old_logprobs,
                                           token_advantages, mask, **options)


def fused_linear_self_distill_loss(h_student: torch.Tensor, h_teacher: torch.Tensor,
                                   weight: torch.Tensor, targets: torch.Tensor,
                                   mask: torch.Tensor, *, divergence: str = "jsd",
                                   beta: float = 0.5, temperature: float = 1.0,
                                   normalizer: float | None = None,
                                   token_weights: torch.Tensor | None = None,
                                   backend: str | None = None,
                                   ) -> tuple[torch.Tensor, SelfDistillStats]:
    """Self-distillation loss between the teacher's and the student's full next-token
    distributions through one LM head, with its backward fused (OPSD, SDPO).

    h_student, h_teacher [N, H]: hidden states predicting the same response tokens under
    the student context and the teacher context (e.g. the prompt plus the answer);
    weight [V, H] the shared head; targets [N] int64 (the sampled tokens: used for the
    log-prob statistic, and -100 drops a row); mask [N] bool. With tempered student and
    teacher distributions q = softmax(h_student W^T / T), p = softmax(h_teacher W^T / T):
      "forward_kl"  D = KL(p || q)            "reverse_kl"  D = KL(q || p)
      "jsd"         D = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
    (OPSD arXiv 2601.18734 and SDPO arXiv 2601.20802's generalized JSD, whose code, like
    TRL's GKD and Liger's JSD, makes beta = 0 forward KL and beta = 1 reverse KL; beta = 0.5
    is the symmetric JSD; beta is ignored by the two KLs). No T^2 factor.
    loss = sum_t m_t w_t D_t / normalizer (w = token_weights, default 1; normalizer
    default: the kept-token count). Gradients reach h_student and weight (the student's
    path only): the teacher is stop-gradient. Returns (loss 0-dim, SelfDistillStats).
    Never materialises [N, V]: per row chunk two logits products, then dh and dW.
    """
    _validate.check_head(h_student, weight, targets, temperature, hidden_name="h_student")
    _validate.check_same_as("h_teacher", h_teacher, h_student, "h_student")
    _validate.check_same_rows("mask", mask, h_student, kind="bool")
    _validate.check_choice("divergence", divergence, _math.DIVERGENCES)
    _validate.check_range("beta", beta, 0.0, 1.0)
    if normalizer is not None:
        _validate.check_range("normalizer", normalizer, 1e-12, float("inf"))
    if token_weights is not None:
        _validate.check_same_rows("token_weights", token_weights, h_student)
    beta = float(beta)
    engine = _engine(weight.device, backend)
    if engine is None:
        _validate.check_target_values(targets, weight.shape[0])
        return reference.fused_linear_self_distill_loss(
            h_student, h_teacher, weight, targets, mask, divergence=divergence, beta=beta,
            temperature=temperature, normalizer=normalizer, token_weights=token_weights)
    return _autograd.fused_linear_self_distill_loss(
        engine, h_student, h_teacher.detach(), weight, targets, mask, token_weights,
        temperature=temperature, normalizer=normalizer, beta=beta,
        kind=_math.distill_kind(divergence, beta))
