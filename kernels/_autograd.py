"""Differentiable ops built from an engine's head_forward / head_backward, registered as
``torch.library`` custom ops.

An engine (``chunked`` or ``triton_ops``) computes tempered-logit statistics tile by tile
(``head_forward``) and, given per-row coefficients a, b, c, the gradients
dh = dz W and dW = dz^T h for dz_j = a onehot_j + p_j (b - c (z_j - lse)) without
storing [N, V] (``head_backward``). Every head gradient we need has that form:
  d lp / d z   = onehot - p            ->  a = g_lp, b = -g_lp
  d lse / d z  = p                     ->  b += g_lse
  d H / d z    = -p (log p + H)        ->  b -= g_H H, c = g_H
so one backward serves log-probs, logsumexp and entropy. The PPO and self-distillation
losses, whose gradients are known in the forward, use ``head_forward_grad`` /
``head_distill_grad`` instead: logits, log-probs and the gradient products in one pass
(no recompute); their backward only scales the gradients by grad_output.

Each op is a custom op (``cepo_kernels::logprobs`` and the others below) with a fake
(shape-only) implementation and its autograd formula, so torch.compile sees one opaque
call, with a symbolic N, instead of tracing the engines' chunk loops and Triton
launches: ``fullgraph=True`` works, a new N needs no recompile under dynamic shapes, and
the compiled backward calls the same engines. Outputs a call does not need (an entropy
not asked for, a gradient nobody wants) are empty [0] tensors: custom ops return tensors.
Eager calls skip the custom op's dispatch (about 20 us a call, 50 us with its backward,
measured on CPU) and run the same implementation and autograd formula through one
``torch.autograd.Function`` (``_call``).
"""

from __future__ import annotations

import importlib
import typing

import torch
from torch import Tensor

from . import _math, _validate
from ._types import IGNORE_INDEX, Evidence, LogProbs, PPOStats, SelfDistillStats

if __package__ != "cepo_kernels":  # see __init__.py: the ops register once, as cepo_kernels
    raise ImportError(f"{__name__}: import the kernels as cepo_kernels (pip install -e .), "
                      f"not as {__package__}")

ENGINES = ("chunked", "triton_ops")
"""The engine modules an op can name (``ops._engine`` picks one per call)."""


def _engine(name: str):
    if name not in ENGINES:
        raise ValueError(f"cepo_kernels: unknown engine {name!r}; one of {ENGINES}")
    return importlib.import_module(f"{__package__}.{name}")


def engine_name(engine) -> str:
    """The name a custom op takes for an engine module."""
    return engine.__name__.rsplit(".", 1)[-1]


def _acc(weight: Tensor) -> torch.dtype:
    """The dtype of the per-token statistics: float64 for float64 heads, else float32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _grad_or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    return grad if grad is not None else like.new_empty(0)


def _fake_grads(hidden: Tensor, weight: Tensor, need_h: bool, need_w: bool):
    """The fake (dh, dW) outputs: like hidden / weight where wanted, else empty [0]."""
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0))


def _ids(targets: Tensor) -> tuple[Tensor, Tensor]:
    """(y, valid): valid token ids (ignored positions set to 0) and where targets are kept."""
    valid = targets != IGNORE_INDEX
    return torch.where(valid, targets, 0), valid


class _Spec(typing.NamedTuple):
    """One op: its custom op, its implementation, and its autograd formula (None: none)."""
    op: typing.Any
    impl: typing.Callable
    setup: typing.Callable | None = None
    grad: typing.Callable | None = None


def _register(name, impl, fake, setup=None, grad=None) -> _Spec:
    """impl as the custom op ``cepo_kernels::name`` with its fake implementation and, if
    given, its autograd formula (setup_context, backward)."""
    op = torch.library.custom_op(f"cepo_kernels::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if grad is not None:
        op.register_autograd(grad, setup_context=setup)
    return _Spec(op, impl, setup, grad)


class _EagerOp(torch.autograd.Function):
    """An op's implementation and autograd formula called directly: what its custom op
    runs, without the custom op's dispatch."""

    @staticmethod
    def forward(ctx, spec, *args):
        out = spec.impl(*args)
        ctx.spec = spec
        spec.setup(ctx, args, out)
        return out

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[1:]  # as the op's formula sees them (no ``spec``)
        try:
            return (None, *ctx.spec.grad(ctx, *grads))
        finally:  # a retained graph runs backward again
            ctx.needs_input_grad = needs


def _call(spec: _Spec, *args):
    """The custom op under torch.compile (one opaque node); eagerly, its implementation
    (through ``_EagerOp`` where a gradient may be wanted)."""
    if torch.compiler.is_compiling():
        return spec.op(*args)
    if spec.grad is None or not torch.is_grad_enabled():
        return spec.impl(*args)
    return _EagerOp.apply(spec, *args)


# --------------------------------------------------------------------------- log-probs

def _logprobs_impl(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                   return_entropy: bool, engine: str) -> tuple[Tensor, Tensor, Tensor]:
    _validate.check_target_values(targets, weight.shape[0])
    y, valid = _ids(targets)
    lp, lse, ent = _engine(engine).head_forward((hidden,), weight, y, valid, temperature,
                                                return_entropy)
    return lp[0], lse[0], ent[0] if return_entropy else lse.new_empty(0)


def _logprobs_fake(hidden, weight, targets, temperature, return_entropy, engine):
    n, acc = hidden.shape[0], _acc(weight)
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc),
            hidden.new_empty(n if return_entropy else 0, dtype=acc))


def _logprobs_backward_impl(hidden: Tensor, weight: Tensor, y: Tensor, lse: Tensor, a: Tensor,
                            b: Tensor, c: Tensor | None, temperature: float, engine: str,
                            need_h: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    dh, dw = _engine(engine).head_backward(hidden, weight, y, lse, a, b, c, temperature,
                                           need_h, need_w)
    return _grad_or_empty(dh, hidden), _grad_or_empty(dw, weight)


def _logprobs_backward_fake(hidden, weight, y, lse, a, b, c, temperature, engine, need_h, need_w):
    return _fake_grads(hidden, weight, need_h, need_w)


LOGPROBS_BACKWARD = _register("logprobs_backward", _logprobs_backward_impl,
                              _logprobs_backward_fake)


def _logprobs_setup(ctx, inputs, output):
    hidden, weight, targets, temperature, return_entropy, engine = inputs
    _, lse, ent = output
    ctx.save_for_backward(hidden, weight, targets, lse, ent)
    ctx.temperature, ctx.return_entropy, ctx.engine = temperature, return_entropy, engine


def _logprobs_grad(ctx, g_lp, g_lse, g_ent):
    hidden, weight, targets, lse, ent = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_h or need_w):
        return None, None, None, None, None, None
    y, valid = _ids(targets)
    zero = torch.zeros_like(lse)
    a = torch.where(valid, zero if g_lp is None else g_lp.to(lse.dtype), zero)
    b = (zero if g_lse is None else g_lse.to(lse.dtype)) - a
    c = None
    if ctx.return_entropy and g_ent is not None:
        c = g_ent.to(lse.dtype)
        b = b - c * ent
    # the custom op itself, eager too: AOTAutograd traces this formula with fake tensors
    # outside dynamo (``torch.compiler.is_compiling()`` is False there)
    dh, dw = LOGPROBS_BACKWARD.op(hidden, weight, y, lse, a, b, c, ctx.temperature, ctx.engine,
                                  need_h, need_w)
    return (dh if need_h else None), (dw if need_w else None), None, None, None, None


LOGPROBS = _register("logprobs", _logprobs_impl, _logprobs_fake, _logprobs_setup, _logprobs_grad)


def fused_logprobs(engine, hidden, weight, targets, *, temperature, return_entropy) -> LogProbs:
    """LogProbs through ``engine``, differentiable w.r.t. hidden and weight."""
    lp, lse, ent = _call(LOGPROBS, hidden, weight, targets, float(temperature),
                         bool(return_entropy), engine_name(engine))
    return LogProbs(lp, lse, ent if return_entropy else None)


# --------------------------------------------------------------------------- evidence

def _evidence_impl(h_policy: Tensor, h_pos: Tensor, h_neg: Tensor, weight: Tensor,
                   targets: Tensor, advantages: Tensor, has_negative: Tensor, lam: float,
                   eps_w: float, temperature: float, engine: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _validate.check_target_values(targets, weight.shape[0])
    out = _engine(engine).contrastive_evidence(h_policy, h_pos, h_neg, weight, targets, advantages,
                                               has_negative, lam=lam, eps_w=eps_w,
                                               temperature=temperature)
    # the three log-probs may be rows of one [3, N] tensor: outputs must not share storage
    return tuple(t.clone() if i < 3 else t for i, t in enumerate(out))


def _evidence_fake(h_policy, h_pos, h_neg, weight, targets, advantages, has_negative, lam, eps_w,
                   temperature, engine):
    n, acc = h_policy.shape[0], _acc(weight)
    vec = [h_policy.new_empty(n, dtype=acc) for _ in range(5)]
    return (*vec, h_policy.new_empty(n, dtype=torch.bool))


EVIDENCE = _register("contrastive_evidence", _evidence_impl, _evidence_fake)


def contrastive_evidence(engine, h_policy, h_pos, h_neg, weight, targets, advantages,
                         has_negative, *, lam, eps_w, temperature) -> Evidence:
    """Evidence through ``engine`` (no gradient: the outputs never require one)."""
    with torch.no_grad():
        return Evidence(*_call(EVIDENCE, h_policy, h_pos, h_neg, weight, targets, advantages,
                               has_negative, float(lam), float(eps_w), float(temperature),
                               engine_name(engine)))


# --------------------------------------------------------------------------- PPO loss

def _ppo_loss_impl(hidden: Tensor, weight: Tensor, targets: Tensor, old_logprobs: Tensor | None,
                   token_advantages: Tensor, mask: Tensor, ref_logprobs: Tensor | None,
                   token_weights: Tensor | None, clip_low: float, clip_high: float,
                   temperature: float, normalizer: float | None, kl_coef: float,
                   return_entropy: bool, clip_dual: float | None, engine: str, need_h: bool,
                   need_w: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, stats [7], log-probs [N], dh or [0], dW or [0]): the gradients of the loss
    are computed here, in three products per row chunk (no recompute); backward scales."""
    _validate.check_target_values(targets, weight.shape[0])
    y, valid = _ids(targets)
    keep = mask & valid
    denom = _math.ppo_denominator(keep, normalizer, _acc(weight), weight.device)
    clips = dict(clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef, clip_dual=clip_dual)

    def coef(r0, r1, lp_chunk):
        return _math.ppo_grad_coef(
            lp_chunk, None if old_logprobs is None else old_logprobs[r0:r1],
            token_advantages[r0:r1], keep[r0:r1], denom,
            ref_logprobs=None if ref_logprobs is None else ref_logprobs[r0:r1],
            token_weights=None if token_weights is None else token_weights[r0:r1], **clips)

    eng = _engine(engine)
    if need_h or need_w:
        lp, lse, ent, dh, dw = eng.head_forward_grad(hidden, weight, y, valid, temperature,
                                                     return_entropy, coef, need_h, need_w)
    else:  # no gradient (no_grad, evaluation): the log-prob forward, which reads each chunk
        # fewer times than the gradient's statistics (CPU) or keeps no chunk at all (CUDA)
        lp, lse, ent = eng.head_forward((hidden,), weight, y, valid, temperature, return_entropy)
        lp, lse, ent = lp[0], lse[0], None if ent is None else ent[0]
        dh = dw = None
    loss, _, stats = _math.ppo_token_terms(
        lp, old_logprobs, token_advantages, keep, normalizer=normalizer,
        ref_logprobs=ref_logprobs, entropy=ent, token_weights=token_weights, **clips)
    stats = torch.stack([
        stats.clip_frac_low, stats.clip_frac_high, stats.approx_kl, stats.ratio_mean,
        stats.entropy if return_entropy else torch.zeros_like(loss), stats.num_tokens,
        stats.clip_frac_dual])
    lp_out = torch.where(valid, lp, torch.zeros_like(lp)).float()
    return loss, stats, lp_out, _grad_or_empty(dh, hidden), _grad_or_empty(dw, weight)


def _ppo_loss_fake(hidden, weight, targets, old_logprobs, token_advantages, mask, ref_logprobs,
                   token_weights, clip_low, clip_high, temperature, normalizer, kl_coef,
                   return_entropy, clip_dual, engine, need_h, need_w):
    acc = _acc(weight)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(7, dtype=acc),
            hidden.new_empty(hidden.shape[0], dtype=torch.float32),
            *_fake_grads(hidden, weight, need_h, need_w))


def _scale(grad: Tensor, grad_output: Tensor) -> Tensor:
    """grad * grad_output in grad's dtype: one rounding of the exact product for bf16 /
    fp16 (no fp32 copy of a [V, H] gradient: that was most of the loss's extra memory)."""
    return grad * grad_output.to(grad.dtype)


def _save_gradients(ctx, dh: Tensor, dw: Tensor, need_h: bool, need_w: bool) -> None:
    ctx.has = (need_h, need_w)
    ctx.save_for_backward(dh, dw)


def _scaled_gradients(ctx, grad_loss):
    dh, dw = ctx.saved_tensors
    return (_scale(dh, grad_loss) if ctx.has[0] else None,
            _scale(dw, grad_loss) if ctx.has[1] else None)


def _ppo_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])  # stats, log-probs
    _save_gradients(ctx, output[3], output[4], inputs[-2], inputs[-1])


def _ppo_grad(ctx, grad_loss, *_):
    dh, dw = _scaled_gradients(ctx, grad_loss)
    return (dh, dw) + (None,) * 16


PPO_LOSS = _register("ppo_loss", _ppo_loss_impl, _ppo_loss_fake, _ppo_setup, _ppo_grad)


def fused_linear_ppo_loss(engine, hidden, weight, targets, old_logprobs, token_advantages, mask,
                          **options) -> tuple[Tensor, PPOStats]:
    """(loss, PPOStats) through ``engine``; options as in cepo_kernels.fused_linear_ppo_loss."""
    grad_on = torch.is_grad_enabled()  # requires_grad ignores no_grad mode: check both
    loss, st, lp, _, _ = _call(
        PPO_LOSS, hidden, weight, targets, old_logprobs, token_advantages, mask, options["ref_logprobs"],
        options["token_weights"], float(options["clip_low"]), float(options["clip_high"]),
        float(options["temperature"]),
        None if options["normalizer"] is None else float(options["normalizer"]),
        float(options["kl_coef"]), bool(options["return_entropy"]), options["clip_dual"],
        engine_name(engine), grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return loss, PPOStats(st[0], st[1], st[2], st[3],
                          st[4] if options["return_entropy"] else None, st[5], lp, st[6])


# --------------------------------------------------------------------------- self-distillation

def _self_distill_loss_impl(h_student: Tensor, h_teacher: Tensor, weight: Tensor,
                            targets: Tensor, mask: Tensor, token_weights: Tensor | None,
                            temperature: float, normalizer: float | None, beta: float, kind: str,
                            engine: str, need_h: bool, need_w: bool
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, stats [3], log-probs [N], divergence [N], dh or [0], dW or [0]). No gradient
    reaches h_teacher (stop-gradient); the head gets only the student's path."""
    _validate.check_target_values(targets, weight.shape[0])
    y, valid = _ids(targets)
    keep = mask & valid
    acc = _acc(weight)
    denom = _math.ppo_denominator(keep, normalizer, acc, weight.device)
    coef = 1.0 / denom if token_weights is None else token_weights.to(acc) / denom
    coef = torch.where(keep, coef, torch.zeros((), dtype=acc, device=keep.device))
    div, lp, ent, dh, dw = _engine(engine).head_distill_grad(
        h_student, h_teacher, weight, y, keep, temperature, kind, beta, coef, need_h, need_w)
    loss = (div * coef).sum()
    k = keep.to(acc)
    count = k.sum()
    n = count.clamp(min=1.0)
    stats = torch.stack([div.sum() / n, (ent * k).sum() / n, count])
    lp_out = torch.where(valid, lp, torch.zeros_like(lp)).float()
    return (loss, stats, lp_out, div.float(), _grad_or_empty(dh, h_student),
            _grad_or_empty(dw, weight))


def _self_distill_loss_fake(h_student, h_teacher, weight, targets, mask, token_weights,
                            temperature, normalizer, beta, kind, engine, need_h, need_w):
    acc, n = _acc(weight), h_student.shape[0]
    return (h_student.new_empty((), dtype=acc), h_student.new_empty(3, dtype=acc),
            h_student.new_empty(n, dtype=torch.float32), h_student.new_empty(n, dtype=torch.float32),
            *_fake_grads(h_student, weight, need_h, need_w))


def _distill_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2], output[3])  # stats, log-probs, divergence
    _save_gradients(ctx, output[4], output[5], inputs[-2], inputs[-1])


def _distill_grad(ctx, grad_loss, *_):
    dh, dw = _scaled_gradients(ctx, grad_loss)
    return (dh, None, dw) + (None,) * 10


SELF_DISTILL_LOSS = _register("self_distill_loss", _self_distill_loss_impl, _self_distill_loss_fake,
                              _distill_setup, _distill_grad)


def fused_linear_self_distill_loss(engine, h_student, h_teacher, weight, targets, mask,
                                   token_weights, **options) -> tuple[Tensor, SelfDistillStats]:
    """(loss, SelfDistillStats) through ``engine``; options as in
    cepo_kernels.fused_linear_self_distill_loss (plus kind, from _math.distill_kind)."""
    grad_on = torch.is_grad_enabled()
    normalizer = options["normalizer"]
    loss, st, lp, div, _, _ = _call(
        SELF_DISTILL_LOSS, h_student, h_teacher, weight, targets, mask, token_weights,
        float(options["temperature"]), None if normalizer is None else float(normalizer),
        float(options["beta"]),
        options["kind"], engine_name(engine), grad_on and h_student.requires_grad,
        grad_on and weight.requires_grad)
    return loss, SelfDistillStats(st[0], st[1], st[2], lp, div)
