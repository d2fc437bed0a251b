"""Differentiable ops built from an engine's head_forward / head_backward.

An engine (``chunked`` or ``triton_ops``) computes tempered-logit statistics tile by tile
(``head_forward``) and, given per-row coefficients a, b, c, the gradients
dh = dz W and dW = dz^T h for dz_j = a onehot_j + p_j (b - c (z_j - lse)) without
storing [N, V] (``head_backward``). Every head gradient we need has that form:
  d lp / d z   = onehot - p            ->  a = g_lp, b = -g_lp
  d lse / d z  = p                     ->  b += g_lse
  d H / d z    = -p (log p + H)        ->  b -= g_H H, c = g_H
so one backward serves log-probs, logsumexp and entropy. The PPO loss, whose gradient is
known in the forward, uses ``head_forward_grad`` instead: logits, log-probs and the
gradient products in one pass (three products, no recompute).
"""

from __future__ import annotations

import torch

from . import _math
from ._types import IGNORE_INDEX, LogProbs, PPOStats, SelfDistillStats


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, engine):
        valid = targets != IGNORE_INDEX
        y = torch.where(valid, targets, 0)
        lp, lse, ent = engine.head_forward((hidden,), weight, y, valid, temperature, return_entropy)
        lp, lse = lp[0], lse[0]
        ent = ent[0] if return_entropy else lse.new_zeros(0)  # outputs must be tensors
        ctx.save_for_backward(hidden, weight, y, valid, lse, ent)
        ctx.temperature, ctx.return_entropy, ctx.engine = temperature, return_entropy, engine
        return lp, lse, ent

    @staticmethod
    def backward(ctx, g_lp, g_lse, g_ent):
        hidden, weight, y, valid, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = dw = None
        if need_h or need_w:
            zero = torch.zeros_like(lse)
            a = torch.where(valid, zero if g_lp is None else g_lp.to(lse.dtype), zero)
            b = (zero if g_lse is None else g_lse.to(lse.dtype)) - a
            c = None
            if ctx.return_entropy and g_ent is not None:
                c = g_ent.to(lse.dtype)
                b = b - c * ent
            dh, dw = ctx.engine.head_backward(hidden, weight, y, lse, a, b, c, ctx.temperature,
                                              need_h, need_w)
        return dh, dw, None, None, None, None


def fused_logprobs(engine, hidden, weight, targets, *, temperature, return_entropy) -> LogProbs:
    """LogProbs through ``engine``, differentiable w.r.t. hidden and weight."""
    lp, lse, ent = _LogProbs.apply(hidden, weight, targets, float(temperature),
                                   bool(return_entropy), engine)
    return LogProbs(lp, lse, ent if return_entropy else None)


class _PPOLoss(torch.autograd.Function):
    """The loss is a scalar, so its gradient w.r.t. hidden and weight is known in the
    forward up to grad_output: the engine computes it there in three products (logits
    chunk, dh, dW: no recompute) and backward only scales it."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, old_logprobs, token_advantages, mask, options,
                engine):
        valid = targets != IGNORE_INDEX
        y = torch.where(valid, targets, 0)
        keep = mask & valid
        want_entropy = options["return_entropy"]
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        denom = _math.ppo_denominator(keep, options["normalizer"], acc, weight.device)
        ref = options["ref_logprobs"]
        weights = options["token_weights"]
        dual = options["clip_dual"]

        def coef(r0, r1, lp_chunk):
            return _math.ppo_grad_coef(
                lp_chunk, None if old_logprobs is None else old_logprobs[r0:r1],
                token_advantages[r0:r1], keep[r0:r1], denom, clip_low=options["clip_low"],
                clip_high=options["clip_high"], ref_logprobs=None if ref is None else ref[r0:r1],
                kl_coef=options["kl_coef"], clip_dual=options["clip_dual"],
                token_weights=None if weights is None else weights[r0:r1])

        # needs_input_grad ignores no_grad mode: a forward-only call computes no gradient
        grad_on = options["grad_enabled"]
        need_h, need_w = grad_on and ctx.needs_input_grad[0], grad_on and ctx.needs_input_grad[1]
        if need_h or need_w:
            lp, lse, ent, dh, dw = engine.head_forward_grad(
                hidden, weight, y, valid, options["temperature"], want_entropy, coef, need_h, need_w)
        else:  # no gradient (no_grad, evaluation): the log-prob forward, which reads each chunk
            # fewer times than the gradient's statistics (CPU) or keeps no chunk at all (CUDA)
            lp, lse, ent = engine.head_forward((hidden,), weight, y, valid, options["temperature"],
                                               want_entropy)
            lp, lse, ent = lp[0], lse[0], None if ent is None else ent[0]
            dh = dw = None
        loss, _, stats = _math.ppo_token_terms(
            lp, old_logprobs, token_advantages, keep, clip_low=options["clip_low"],
            clip_high=options["clip_high"], normalizer=options["normalizer"],
            ref_logprobs=ref, kl_coef=options["kl_coef"], entropy=ent, clip_dual=dual,
            token_weights=weights)
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.has = (dh is not None, dw is not None)
        stats = torch.stack([
            stats.clip_frac_low, stats.clip_frac_high, stats.approx_kl, stats.ratio_mean,
            stats.entropy if want_entropy else torch.zeros_like(loss), stats.num_tokens,
            stats.clip_frac_dual])
        lp_out = torch.where(valid, lp, torch.zeros_like(lp)).float()
        ctx.mark_non_differentiable(stats, lp_out)
        return loss, stats, lp_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_lp):
        saved = iter(ctx.saved_tensors)
        dh = _scale(next(saved), grad_loss) if ctx.has[0] else None
        dw = _scale(next(saved), grad_loss) if ctx.has[1] else None
        return dh, dw, None, None, None, None, None, None


def _scale(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad * grad_output in grad's dtype: one rounding of the exact product for bf16 /
    fp16 (no fp32 copy of a [V, H] gradient: that was most of the loss's extra memory)."""
    return grad * grad_output.to(grad.dtype)


def fused_linear_ppo_loss(engine, hidden, weight, targets, old_logprobs, token_advantages, mask,
                          **options) -> tuple[torch.Tensor, PPOStats]:
    """(loss, PPOStats) through ``engine``; options as in cepo_kernels.fused_linear_ppo_loss."""
    options["temperature"] = float(options["temperature"])
    options["grad_enabled"] = torch.is_grad_enabled()
    loss, st, lp = _PPOLoss.apply(hidden, weight, targets, old_logprobs, token_advantages, mask,
                                  options, engine)
    return loss, PPOStats(st[0], st[1], st[2], st[3],
                          st[4] if options["return_entropy"] else None, st[5], lp, st[6])


class _SelfDistillLoss(torch.autograd.Function):
    """Like _PPOLoss: the loss is a scalar whose gradient w.r.t. the student's hidden
    states and the head is known in the forward; backward only scales it. No gradient
    reaches h_teacher (stop-gradient) and the head gets only the student's path."""

    @staticmethod
    def forward(ctx, h_student, h_teacher, weight, targets, mask, token_weights, options, engine):
        valid = targets != IGNORE_INDEX
        y = torch.where(valid, targets, 0)
        keep = mask & valid
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        denom = _math.ppo_denominator(keep, options["normalizer"], acc, weight.device)
        coef = 1.0 / denom if token_weights is None else token_weights.to(acc) / denom
        coef = torch.where(keep, coef, torch.zeros((), dtype=acc, device=keep.device))
        grad_on = options["grad_enabled"]
        need_h, need_w = grad_on and ctx.needs_input_grad[0], grad_on and ctx.needs_input_grad[2]
        div, lp, ent, dh, dw = engine.head_distill_grad(
            h_student, h_teacher, weight, y, keep, options["temperature"], options["kind"],
            options["beta"], coef, need_h, need_w)
        loss = (div * coef).sum()
        k = keep.to(acc)
        count = k.sum()
        n = count.clamp(min=1.0)
        stats = torch.stack([div.sum() / n, (ent * k).sum() / n, count])
        lp_out = torch.where(valid, lp, torch.zeros_like(lp)).float()
        div_out = div.float()
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.has = (dh is not None, dw is not None)
        ctx.mark_non_differentiable(stats, lp_out, div_out)
        return loss, stats, lp_out, div_out

    @staticmethod
    def backward(ctx, grad_loss, _g_stats, _g_lp, _g_div):
        saved = iter(ctx.saved_tensors)
        dh = _scale(next(saved), grad_loss) if ctx.has[0] else None
        dw = _scale(next(saved), grad_loss) if ctx.has[1] else None
        return dh, None, dw, None, None, None, None, None


def fused_linear_self_distill_loss(engine, h_student, h_teacher, weight, targets, mask,
                                   token_weights, **options) -> tuple[torch.Tensor, SelfDistillStats]:
    """(loss, SelfDistillStats) through ``engine``; options as in
    cepo_kernels.fused_linear_self_distill_loss (plus kind, from _math.distill_kind)."""
    options["temperature"] = float(options["temperature"])
    options["grad_enabled"] = torch.is_grad_enabled()
    loss, st, lp, div = _SelfDistillLoss.apply(h_student, h_teacher, weight, targets, mask,
                                               token_weights, options, engine)
    return loss, SelfDistillStats(st[0], st[1], st[2], lp, div)
