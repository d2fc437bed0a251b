"""Triton engine: launches the kernels of ``triton_kernels`` (CUDA, or CPU under the interpreter).

Provides ``head_forward`` / ``head_backward`` for the generic autograd wrappers, and
``contrastive_evidence`` as ONE launch (three contexts + epilogue).

Determinism: the backward accumulates dh and dW with fp32 atomics, whose order varies
from run to run. When ``torch.use_deterministic_algorithms(True)`` is set, the backward
runs the chunked engine instead (sequential tile loops: bitwise reproducible).
"""

from __future__ import annotations

import functools

import torch
import triton

from . import backend, chunked
from ._types import Evidence
from .triton_kernels import logprob_bwd_kernel, logprob_fwd_kernel

FORCE_NUM_SPLITS: int | None = None
"""Tests set this to exercise the multi-split (atomic ticket) path of the forward kernel."""


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _blocks(device: torch.device, k: int, kind: str) -> dict:
    """Tile sizes and launch options; small tiles under the CPU interpreter."""
    if device.type != "cuda":
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16)
    if kind == "fwd":
        return dict(BLOCK_N=64, BLOCK_V=128 if k == 1 else 64, BLOCK_D=64, num_warps=8,
                    num_stages=3)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)


def _upcast(dtype: torch.dtype) -> bool:
    # the interpreter's tl.dot is wrong for bf16 / fp16 operands: compute those in fp32
    return backend.interpreting() and dtype != torch.float32


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"cepo_kernels: backend 'triton' takes float32, bfloat16 or float16 "
                         f"hidden states and weight, got {dtype}; use backend='torch' for {dtype}")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_splits(device: torch.device, n_row_blocks: int, vocab: int, block_v: int) -> int:
    """Vocabulary splits so that rows x splits programs fill the GPU (about 2 waves)."""
    if FORCE_NUM_SPLITS is not None:
        return max(1, min(FORCE_NUM_SPLITS, triton.cdiv(vocab, block_v)))
    if device.type != "cuda":
        return 1
    target = 2 * _num_sms(device.index or 0)
    return max(1, min(triton.cdiv(vocab, block_v), triton.cdiv(target, n_row_blocks)))


def _launch_forward(hiddens, weight, y_raw, temperature, with_entropy, epilogue=None):
    """One launch for K = len(hiddens) <= 4 contexts. y_raw keeps -100 for ignored rows.

    epilogue: None, or (advantages [N], has_negative [N] bool, lam, eps_w) for K = 3.
    Returns (lp [K, N], lse [K, N], entropy [K, N] | None, (delta, token_adv, clipped) | None).
    """
    k = len(hiddens)
    n, d = hiddens[0].shape
    vocab = weight.shape[0]
    device = weight.device
    _check_dtype(weight.dtype)
    hiddens = [_row_major(h) for h in hiddens]
    weight = _row_major(weight)
    cfg = _blocks(device, k, "fwd")
    n_row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    splits = _num_splits(device, n_row_blocks, vocab, cfg["BLOCK_V"])
    vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    splits = triton.cdiv(vocab, vocab_per_split)  # no empty split

    f32 = dict(dtype=torch.float32, device=device)
    lp = torch.empty(k, n, **f32)
    lse = torch.empty(k, n, **f32)
    ent = torch.empty(k, n, **f32) if with_entropy else lse
    part = torch.empty(splits * k * 4 * n if splits > 1 else 1, **f32)
    ticket = torch.zeros(n_row_blocks if splits > 1 else 1, dtype=torch.int32, device=device)
    if epilogue is not None:
        adv, has_neg, lam, eps_w = epilogue
        adv = adv.contiguous()
        has_neg = has_neg.contiguous().view(torch.int8)
        delta = torch.empty(n, **f32)
        tok_adv = torch.empty(n, **f32)
        clipped = torch.empty(n, dtype=torch.int8, device=device)
    else:
        adv = has_neg = delta = tok_adv = clipped = lp
        lam = eps_w = 0.0
    hs = hiddens + [hiddens[0]] * (4 - k)
    logprob_fwd_kernel[(n_row_blocks, splits)](
        hs[0], hs[1], hs[2], hs[3], hs[0].stride(0), hs[1].stride(0), hs[2].stride(0),
        hs[3].stride(0), weight, weight.stride(0), y_raw.contiguous(), part, ticket,
        lp, lse, ent, adv, has_neg, delta, tok_adv, clipped,
        n, vocab, d, 1.0 / temperature, float(lam), float(eps_w), vocab_per_split,
        K=k, NUM_SPLITS=splits, WITH_ENTROPY=with_entropy, EPILOGUE=epilogue is not None,
        UPCAST=_upcast(weight.dtype), **cfg)
    extra = (delta, tok_adv, clipped.view(torch.bool)) if epilogue is not None else None
    return lp, lse, (ent if with_entropy else None), extra


def head_forward(hiddens, weight, y, valid, temperature, with_entropy):
    """Engine API (see chunked.head_forward): (lp [K, N], lse [K, N], entropy | None)."""
    n = y.shape[0]
    if n == 0:
        return chunked.head_forward(hiddens, weight, y, valid, temperature, with_entropy)
    y_raw = torch.where(valid, y, torch.full_like(y, -100))
    lp, lse, ent, _ = _launch_forward(list(hiddens), weight, y_raw, temperature, with_entropy)
    return lp, lse, ent


def head_backward(hidden, weight, y, lse, a, b, c, temperature, need_h, need_w):
    """Engine API (see chunked.head_backward): (dh, dW) via the atomic tile kernel."""
    if torch.are_deterministic_algorithms_enabled() or hidden.shape[0] == 0:
        return chunked.head_backward(hidden, weight, y, lse, a, b, c, temperature, need_h, need_w)
    _check_dtype(weight.dtype)
    n, d = hidden.shape
    vocab = weight.shape[0]
    hidden, weight = _row_major(hidden), _row_major(weight)
    f32 = dict(dtype=torch.float32, device=weight.device)
    dh = torch.zeros(n, d, **f32) if need_h else lse
    dw = torch.zeros(vocab, d, **f32) if need_w else lse
    cfg = _blocks(weight.device, 1, "bwd")
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(vocab, cfg["BLOCK_V"]))
    logprob_bwd_kernel[grid](
        hidden, hidden.stride(0), weight, weight.stride(0), y.contiguous(),
        lse.float().contiguous(), a.float().contiguous(), b.float().contiguous(),
        (c if c is not None else a).float().contiguous(),
        dh, d if need_h else 0, dw, d if need_w else 0,
        n, vocab, d, 1.0 / temperature,
        HAS_C=c is not None, COMPUTE_DH=need_h, COMPUTE_DW=need_w,
        UPCAST=_upcast(weight.dtype), **cfg)
    return (dh.to(hidden.dtype) if need_h else None), (dw.to(weight.dtype) if need_w else None)


def head_forward_grad(hidden, weight, y, valid, temperature, with_entropy, coef_fn,
                      need_h, need_w):
    """Engine API (see chunked.head_forward_grad)."""
    lp, lse, ent = head_forward((hidden,), weight, y, valid, temperature, with_entropy)
    lp, lse = lp[0], lse[0]
    ent = ent[0] if with_entropy else None
    dh = dw = None
    if need_h or need_w:
        coef = coef_fn(0, y.shape[0], lp)
        coef = torch.where(valid, coef, torch.zeros_like(coef))
        dh, dw = head_backward(hidden, weight, y, lse, coef, -coef, None, temperature,
                               need_h, need_w)
    return lp, lse, ent, dh, dw


def contrastive_evidence(h_policy, h_pos, h_neg, weight, targets, advantages, has_negative, *,
                         lam, eps_w, temperature=1.0) -> Evidence:
    """Three contexts and the CEPO epilogue in one kernel launch (no gradient)."""
    if targets.shape[0] == 0:
        return chunked.contrastive_evidence(h_policy, h_pos, h_neg, weight, targets, advantages,
                                            has_negative, lam=lam, eps_w=eps_w,
                                            temperature=temperature)
    with torch.no_grad():
        lp, _, _, (delta, tok_adv, clipped) = _launch_forward(
            [h_policy, h_pos, h_neg], weight, targets, temperature, False,
            epilogue=(advantages.float(), has_negative, lam, eps_w))
    return Evidence(lp[0], lp[1], lp[2], delta, tok_adv, clipped)
