"""Triton engine: launches the kernels of ``triton_kernels`` (CUDA, or CPU under the interpreter).

- ``head_forward`` / ``contrastive_evidence``: ONE launch of ``stacked_fwd_kernel`` for
  the K contexts (three plus the CEPO epilogue for the evidence), grouped rasterisation,
  the split count a runtime argument; a small autotune list on CUDA (keyed on V and H,
  not N), one fixed small configuration under the interpreter.
- ``head_forward_grad`` (the PPO loss) in THREE products per row chunk: the logits chunk
  from the library GEMM (fp32 output, bf16 / fp16 operands on CUDA), ``row_stats_kernel``
  (log-prob, logsumexp, entropy), the gradient coefficient in PyTorch ([rows] vectors),
  ``dz_kernel`` (dz in the compute dtype, scaled for fp16), then dh = dz W and
  dW += dz^T h as library GEMMs (``chunked.gradient_products``). No atomics, so the
  result is deterministic.
- ``head_distill_grad`` (the self-distillation loss) in FOUR products per row chunk: the
  student's and the teacher's logits from the library GEMM, ``row_stats_kernel`` on each,
  ``distill_row_kernel`` (the divergence), ``distill_dz_kernel`` (dz), then the two
  gradient GEMMs.
- ``head_backward`` (the log-prob op): the same, with the logits recomputed (four products)
  and their logsumexp re-reduced (one more read of the chunk) so p is consistent with them.

No op reads device data on the host (no synchronisation).

On Hopper and later (compute capability 9+), bf16 / fp16 forward tiles come through
tensor descriptors (TMA: one bulk copy per tile instead of per-thread address arithmetic),
where the rows are 16-byte aligned; ``CEPO_KERNELS_TMA=0`` turns that off (``use_tma``).
"""

from __future__ import annotations

import functools
import math
import os
import typing

import torch
import triton

try:  # host-side tensor descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

from . import backend, chunked
from ._types import Evidence
from .triton_kernels import (distill_dz_kernel, distill_row_kernel, dz_kernel, row_stats_kernel,
                             stacked_fwd_kernel)

FORCE_NUM_SPLITS: int | None = None
"""Tests set this to exercise the multi-split (atomic ticket) path of the forward kernel."""


def _env_mib(name: str, default: int) -> int:
    """A positive whole number of MiB from the environment, in bytes (a named error else)."""
    raw = os.environ.get(name, str(default))
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"cepo_kernels: {name} must be a positive whole number of MiB, got {raw!r}")
    return int(raw) << 20


GPU_CHUNK_BYTES = _env_mib("CEPO_KERNELS_GPU_CHUNK_MB", 2048)
"""Logits chunk budget of the three-product path on CUDA (fp32 chunk plus its dz):
a few thousand rows at V = 152k, so the dW accumulator is read and written a few times only.
Lower it (``CEPO_KERNELS_GPU_CHUNK_MB``) with ``chunked.DW_ACCUMULATION = 'weight'`` where
memory is tighter than time: 512 MiB holds ~590 rows at V 151,936."""

INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_D=16, GROUP_M=2)
CUDA_CONFIGS = [  # (BLOCK_M, BLOCK_V, BLOCK_D, warps, stages): 128-row MMAs and smaller fallbacks
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 2), (64, 128, 64, 4, 4),
]
ROW_BLOCK = dict(BLOCK_R=4, BLOCK_V=1024)
ROW_BLOCK_INTERPRET = dict(BLOCK_R=4, BLOCK_V=32)

FORCE_TMA: bool | None = None
"""Tensor descriptors for the forward's tiles: None lets ``use_tma`` decide; True / False
forces them on (where the tensors allow: tests run them under the interpreter) or off."""


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Whether 2-D tensors can back tensor descriptors: Triton has them, the last dimension
    is contiguous, and the base and the row stride are 16-byte aligned (TMA's rule)."""
    if TensorDescriptor is None:
        return False
    return all(t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
               and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def use_tma(device: torch.device, h2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the forward loads its tiles through tensor descriptors: compiled CUDA with
    compute capability 9+ (Hopper's TMA), bf16 / fp16 operands, ``tma_compatible`` tensors,
    and ``CEPO_KERNELS_TMA`` not 0. FORCE_TMA overrides all but the tensors' layout."""
    if FORCE_TMA is not None:
        return FORCE_TMA and tma_compatible(h2, weight)
    if os.environ.get("CEPO_KERNELS_TMA", "1") == "0" or not _compiled(device):
        return False
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index)[0] >= 9 and tma_compatible(h2, weight)


def _set_tma_blocks(nargs) -> None:
    """Autotuner pre-hook: the descriptors' block shapes follow each configuration's tiles."""
    if nargs.get("h_desc") is not None:
        nargs["h_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_D"]]
        nargs["w_desc"].block_shape = [nargs["BLOCK_V"], nargs["BLOCK_D"]]


def _descriptors(h2, weight, meta):
    """(h_desc, w_desc) over h2 [K * N, H] and W [V, H], blocked as ``meta``'s tiles (the
    largest configuration's when autotuning: its pre-hook sets each trial's)."""
    bm = meta.get("BLOCK_M", max(c[0] for c in CUDA_CONFIGS))
    bv = meta.get("BLOCK_V", max(c[1] for c in CUDA_CONFIGS))
    bd = meta.get("BLOCK_D", max(c[2] for c in CUDA_CONFIGS))
    return (TensorDescriptor.from_tensor(h2, [bm, bd]),
            TensorDescriptor.from_tensor(weight, [bv, bd]))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _upcast(dtype: torch.dtype) -> bool:
    # the interpreter's tl.dot is wrong for bf16 / fp16 operands: compute those in fp32
    return backend.interpreting() and dtype != torch.float32


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"cepo_kernels: backend 'triton' takes float32, bfloat16 or float16 "
                         f"hidden states and weight, got {dtype}; use backend='torch' for {dtype}")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _compiled(device: torch.device) -> bool:
    return device.type == "cuda" and not backend.interpreting()


@functools.cache
def _autotuned_forward():
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_V=v, BLOCK_D=d, GROUP_M=8), num_warps=w,
                             num_stages=st, pre_hook=_set_tma_blocks)
               for m, v, d, w, st in CUDA_CONFIGS]
    # the ticket counters must start at zero on every autotuning trial
    return triton.autotune(configs=configs, key=["V", "D"], reset_to_zero=["ticket_ptr"])(
        stacked_fwd_kernel)


def _forward_kernel(device: torch.device):
    """(kernel, explicit meta-parameters, largest BLOCK_V, smallest BLOCK_M)."""
    if _compiled(device):
        return (_autotuned_forward(), {}, max(c[1] for c in CUDA_CONFIGS),
                min(c[0] for c in CUDA_CONFIGS))
    cfg = INTERPRETER_CONFIG
    return stacked_fwd_kernel, dict(cfg), cfg["BLOCK_V"], cfg["BLOCK_M"]


def num_splits(device: torch.device, row_blocks: int, vocab: int, block_v: int) -> int:
    """Vocabulary splits so that row blocks x splits programs fill the GPU (about 2 waves)."""
    if FORCE_NUM_SPLITS is not None:
        return max(1, min(FORCE_NUM_SPLITS, triton.cdiv(vocab, block_v)))
    if device.type != "cuda":
        return 1
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(vocab, block_v), triton.cdiv(target, max(1, row_blocks))))


def _launch_forward(hiddens, weight, y_raw, temperature, with_entropy, epilogue=None, z_out=None,
                    z_off=(None, 1)):
    """One launch for K = len(hiddens) <= 4 contexts. y_raw keeps -100 for ignored rows.

    epilogue: None, or (advantages [N], has_negative [N] bool, lam, eps_w) for K = 3.
    z_out: None, or a row-major [N, V] buffer (K = 1) that receives the untempered logits
    in its dtype (``LOGITS_GEMM``); z_off: (off [N, cdiv(V, block)] fp32 or None, block):
    with an fp16 z_out, z_out gets z - off and off each tile's row maximum (Z_OFFSET).
    Returns (lp [K, N], lse [K, N], entropy [K, N] | None, (delta, token_adv, clipped) | None).
    """
    k = len(hiddens)
    n, d = hiddens[0].shape
    vocab = weight.shape[0]
    device = weight.device
    _check_dtype(weight.dtype)
    h = _row_major(hiddens[0])[None] if k == 1 else torch.stack(hiddens)  # [K, N, H]
    weight = _row_major(weight)
    kernel, meta, max_block_v, min_block_m = _forward_kernel(device)
    h2 = h[0] if k == 1 else h.view(k * n, d)  # stacked contexts are contiguous
    tma = n > 0 and use_tma(device, h2, weight)
    h_desc, w_desc = _descriptors(h2, weight, meta) if tma else (None, None)
    row_blocks = k * triton.cdiv(n, 128 if _compiled(device) else min_block_m)
    splits = num_splits(device, row_blocks, vocab, max_block_v)
    vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), max_block_v) * max_block_v
    splits = triton.cdiv(vocab, vocab_per_split)  # no empty split
    direct = splits == 1 and epilogue is None

    f32 = dict(dtype=torch.float32, device=device)
    lp = torch.empty(k, n, **f32)
    lse = torch.empty(k, n, **f32)
    ent = torch.empty(k, n, **f32) if with_entropy else lse
    n_pad = triton.cdiv(n, min_block_m) * min_block_m  # the largest padding any BLOCK_M needs
    part = torch.empty(1 if direct else splits * k * 4 * (n_pad + 128), **f32)
    ticket = torch.zeros(triton.cdiv(n, min_block_m), dtype=torch.int32, device=device)
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

    if z_out is not None and (k != 1 or z_out.shape != (n, vocab) or z_out.stride(1) != 1):
        raise ValueError("cepo_kernels: z_out must be a row-major [N, V] buffer, one context")
    off, off_block = z_off
    if off is not None and (z_out is None or z_out.dtype != torch.float16
                            or off.shape != (n, triton.cdiv(vocab, off_block))
                            or off.stride(1) != 1 or max_block_v % off_block
                            or meta.get("BLOCK_V", off_block) % off_block):
        raise ValueError("cepo_kernels: z_off needs an fp16 z_out and a row-major [N, cdiv(V, "
                         "block)] offset buffer whose block divides every BLOCK_V")

    def grid(m):
        return (k * triton.cdiv(n, m["BLOCK_M"]) * splits,)

    kernel[grid](
        h, h.stride(0), h.stride(1), weight, weight.stride(0), h_desc, w_desc, y_raw.contiguous(),
        part, ticket,
        lp, lse, ent, adv, has_neg, delta, tok_adv, clipped,
        lp if z_out is None else z_out, 0 if z_out is None else z_out.stride(0),
        lp if off is None else off, 0 if off is None else off.stride(0),
        n, vocab, d, 1.0 / temperature, float(lam), float(eps_w), splits, vocab_per_split,
        K=k, WITH_ENTROPY=with_entropy, EPILOGUE=epilogue is not None, DIRECT=direct,
        UPCAST=_upcast(weight.dtype), USE_TMA=tma, STORE_Z=z_out is not None,
        Z_OFFSET=off is not None, OFF_BLOCK=off_block, **meta)
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


# --------------------------------------------------------------------------- three products

LOGITS_GEMM = os.environ.get("CEPO_KERNELS_LOGITS_GEMM", "library")
"""Where the gradient paths (the PPO loss, the log-prob backward) get each logits chunk:
'library' (default): the library GEMM (cuBLAS) with fp32 output, then ``row_stats_kernel``
reduces it; 'triton': ``stacked_fwd_kernel`` with STORE_Z writes the fp32 chunk and returns
its log-prob, logsumexp and entropy from the same fp32 accumulator (no statistics pass: one
read of the chunk less, our GEMM instead of the library's); 'triton-fp16' (16-bit weights;
fp32 ones take 'triton'): the same kernel writes each logit as fp16 z - (its tile's row
maximum) plus one fp32 offset per row and 128 columns (Z_OFFSET), and dz is formed in place
in it: 2 bytes a logit in memory instead of 6, and ~10 bytes of traffic a logit instead of
~18 ('library') or ~14 ('triton'), so 3x the rows per chunk budget. bench/gpu_check.py
checks and times all three. A plain bf16 chunk (2 bytes, no offsets) put the gradients
1.5-4.7% from float64 at |z| ~ 10-20, T 0.7, against 0.4% in fp32 (p = exp(z / T - lse)
inherits |z| / T 2^-9 of rounding); the offsets bound the rounding by |z - tile max|, small
for every logit that carries probability, at any |z|."""

LOGITS_GEMMS = ("library", "triton", "triton-fp16")

OFFSET_BLOCK: int | None = None
"""Columns per offset of the 'triton-fp16' chunk; None: the smallest BLOCK_V the forward
may run with (each tile then covers one or more whole slots). Tests set it."""


def logits_source(dtype: torch.dtype) -> str:
    """LOGITS_GEMM, validated, as it applies to a head of ``dtype`` (fp32: no fp16 chunk)."""
    if LOGITS_GEMM not in LOGITS_GEMMS:
        raise ValueError(f"cepo_kernels: LOGITS_GEMM (CEPO_KERNELS_LOGITS_GEMM) must be one of "
                         f"{', '.join(LOGITS_GEMMS)}; got {LOGITS_GEMM!r}")
    if LOGITS_GEMM == "triton-fp16" and dtype == torch.float32:
        return "triton"
    return LOGITS_GEMM


def _offset_block(device: torch.device) -> int:
    if OFFSET_BLOCK is not None:
        return OFFSET_BLOCK
    if _compiled(device):
        return min(c[1] for c in CUDA_CONFIGS)
    return INTERPRETER_CONFIG["BLOCK_V"]


class _Chunk(typing.NamedTuple):
    """A gradient chunk's logits: z [r, V] fp32, or fp16 z - off with ``off`` [r,
    cdiv(V, block)] fp32 and ``block`` its columns per offset."""
    z: torch.Tensor
    off: torch.Tensor | None = None
    block: int = 1


def _rows_in_budget(n: int, vocab: int, device: torch.device, bytes_per_logit: int) -> int:
    """Rows per gradient chunk: on CUDA as many as GPU_CHUNK_BYTES holds at
    ``bytes_per_logit``; elsewhere the chunked engine's rows (tests, the interpreter)."""
    if device.type == "cuda":
        return max(1, min(n, GPU_CHUNK_BYTES // (bytes_per_logit * max(1, vocab))))
    return chunked.rows_per_chunk(n, vocab)


def _chunk_rows(n: int, vocab: int, device: torch.device, source: str = "library") -> int:
    """Rows per gradient chunk: the CUDA budget holds fp32 logits plus a 16-bit dz (6 bytes
    a logit), or the fp16 chunk with dz in place (2 bytes, 'triton-fp16')."""
    return _rows_in_budget(n, vocab, device, 2 if source == "triton-fp16" else 6)


def _chunk_stats(head, r0, r1, y_raw, temperature, with_entropy, source):
    """One gradient chunk's logits and their statistics: (``_Chunk``, lp, lse,
    entropy | None), from the forward kernel (statistics from its accumulator; fp32, or
    fp16 with tile offsets) or from the library GEMM and ``row_stats_kernel``."""
    if source == "library":
        z = _logits_chunk(head.h[r0:r1], head.w)
        return (_Chunk(z), *_row_stats(z, y_raw[r0:r1], temperature, with_entropy))
    r, vocab, dev = r1 - r0, head.w.shape[0], head.w.device
    off = None
    if source == "triton-fp16":
        block = _offset_block(dev)
        z = torch.empty(r, vocab, dtype=torch.float16, device=dev)
        off = torch.empty(r, triton.cdiv(vocab, block), dtype=torch.float32, device=dev)
    else:
        block = 1
        z = torch.empty(r, vocab, dtype=torch.float32, device=dev)
    lp, lse, ent, _ = _launch_forward([head.h[r0:r1]], head.w, y_raw[r0:r1], temperature,
                                      with_entropy, z_out=z, z_off=(off, block))
    return _Chunk(z, off, block), lp[0], lse[0], None if ent is None else ent[0]


def _logits_chunk(h_c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h_c @ w.T in fp32 [rows, V]: the library GEMM with fp32 output (CUDA, bf16 / fp16
    operands, fp32 accumulation); on CPU low-precision operands are upcast (tests)."""
    if h_c.dtype == torch.float32:
        return h_c @ w.T
    if h_c.is_cuda:
        try:
            return torch.mm(h_c, w.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            return (h_c @ w.T).float()
    return h_c.float() @ w.float().T


def _row_cfg(device):
    return ROW_BLOCK if _compiled(device) else ROW_BLOCK_INTERPRET


def _row_stats(z, y_raw, temperature, with_entropy):
    r, vocab = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    lp, lse = torch.empty(r, **f32), torch.empty(r, **f32)
    ent = torch.empty(r, **f32) if with_entropy else lse
    cfg = _row_cfg(z.device)
    row_stats_kernel[(triton.cdiv(r, cfg["BLOCK_R"]),)](
        z, z.stride(0), y_raw, lp, lse, ent, r, vocab, 1.0 / temperature,
        WITH_ENTROPY=with_entropy, **cfg)
    return lp, lse, (ent if with_entropy else None)


def _dz_buffer(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where dz [rows, V] in dtype goes: in place in the chunk z when their elements have
    the same size (an fp32 chunk for fp32 dz, the fp16 chunk for bf16 dz; each element is
    read, then written, by the same program), else a new buffer."""
    if z.dtype == dtype:
        return z
    if z.element_size() == dtype.itemsize:
        return z.view(dtype)
    return torch.empty(z.shape, dtype=dtype, device=z.device)


def _dz(chunk, y, lse, a, b, c, temperature, scale, dtype):
    """dz [rows, V] in dtype (in place in the chunk's z when its elements have dtype's
    size: an fp32 chunk for fp32, the fp16 chunk for bf16 / fp16); a, b, c carry 1/T."""
    z = chunk.z
    r, vocab = z.shape
    dz = _dz_buffer(z, dtype)
    cfg = _row_cfg(z.device)
    grid = (triton.cdiv(r, cfg["BLOCK_R"]), triton.cdiv(vocab, cfg["BLOCK_V"]))
    offset = chunk.off is not None
    dz_kernel[grid](z, z.stride(0), dz, dz.stride(0), y, lse, a, b, a if c is None else c,
                    lse if scale is None else scale, r, vocab, 1.0 / temperature,
                    HAS_C=c is not None, HAS_SCALE=scale is not None, **cfg,
                    off_ptr=chunk.off if offset else lse,
                    stride_off=chunk.off.stride(0) if offset else 0,
                    HAS_OFFSET=offset, OFF_BLOCK=chunk.block)
    return dz


def _products(dz, head, r0, r1, scale, dh, dw32):
    dh_c = chunked.gradient_products(dz, head.h[r0:r1], head.w, scale, dw32,
                                     need_dh=dh is not None)
    if dh is not None:
        dh[r0:r1] = dh_c


def head_forward_grad(hidden, weight, y, valid, temperature, with_entropy, coef_fn,
                      need_h, need_w):
    """Engine API (see chunked.head_forward_grad): three products per row chunk."""
    _check_dtype(weight.dtype)
    n, vocab = y.shape[0], weight.shape[0]
    dev = weight.device
    head = chunked._Head(_row_major(hidden), _row_major(weight))
    inv_temp = 1.0 / temperature
    f32 = dict(dtype=torch.float32, device=dev)
    lp, lse = torch.zeros(n, **f32), torch.zeros(n, **f32)
    ent = torch.zeros(n, **f32) if with_entropy else None
    dh, dw32 = chunked._grad_buffers(hidden, weight, head, need_h, need_w)
    y_raw = torch.where(valid, y, torch.full_like(y, -100))
    source = logits_source(head.dtype)
    rows = _chunk_rows(n, vocab, dev, source)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        z, lp_c, lse_c, ent_c = _chunk_stats(head, r0, r1, y_raw, temperature, with_entropy,
                                             source)
        lp[r0:r1], lse[r0:r1] = lp_c, lse_c
        if with_entropy:
            ent[r0:r1] = ent_c
        if dh is None and dw32 is None:
            continue
        coef = coef_fn(r0, r1, lp_c).float() * inv_temp
        coef = torch.where(valid[r0:r1], coef, torch.zeros_like(coef))
        scale = chunked.grad_scale(coef, coef, None, head.dtype)
        dz = _dz(z, y[r0:r1], lse_c, coef, -coef, None, temperature, scale, head.dtype)
        del z
        _products(dz, head, r0, r1, scale, dh, dw32)
        del dz
    return lp, lse, ent, dh, chunked._finish_dw(dw32, weight)


def head_backward(hidden, weight, y, lse, a, b, c, temperature, need_h, need_w):
    """Engine API (see chunked.head_backward): logits recomputed per chunk, then dz and
    the two gradient GEMMs (four products with the forward)."""
    _check_dtype(weight.dtype)
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = weight.device
    head = chunked._Head(_row_major(hidden), _row_major(weight))
    inv_temp = 1.0 / temperature
    dh, dw32 = chunked._grad_buffers(hidden, weight, head, need_h, need_w)
    a = (a * inv_temp).float().contiguous()
    b = (b * inv_temp).float().contiguous()
    c = None if c is None else (c * inv_temp).float().contiguous()
    source = logits_source(head.dtype)
    rows = _chunk_rows(n, vocab, dev, source)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        cc = None if c is None else c[r0:r1]
        scale = chunked.grad_scale(a[r0:r1], b[r0:r1], cc, head.dtype)
        # the logsumexp of THESE logits (not the forward's, from another GEMM's rounding):
        # p then sums to 1 exactly, which matters where |z| ~ 1e4
        z, _, lse_c, _ = _chunk_stats(head, r0, r1, y, temperature, False, source)
        dz = _dz(z, y[r0:r1], lse_c, a[r0:r1], b[r0:r1], cc, temperature, scale, head.dtype)
        del z
        _products(dz, head, r0, r1, scale, dh, dw32)
        del dz
    return dh, chunked._finish_dw(dw32, weight)


def _distill_consts(kind, beta):
    """(KIND constexpr, beta, log beta, log(1 - beta)) for the distillation kernels."""
    code = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}[kind]
    if code != 2:
        return code, 0.0, 0.0, 0.0
    return code, float(beta), math.log(beta), math.log1p(-beta)


def _distill_chunk_rows(n, vocab, device, source, dz_dtype) -> int:
    """Rows per self-distillation chunk: the CUDA budget holds the student's and the
    teacher's chunks (fp32, or fp16 with offsets for 'triton-fp16') and dz where it cannot
    be written in place (dz_dtype None: no gradient)."""
    z_bytes = 2 if source == "triton-fp16" else 4
    dz_bytes = 0 if dz_dtype is None or dz_dtype.itemsize == z_bytes else dz_dtype.itemsize
    return _rows_in_budget(n, vocab, device, 2 * z_bytes + dz_bytes)


def _offset_args(student: _Chunk, teacher: _Chunk, dummy: torch.Tensor) -> dict:
    """The distillation kernels' offset arguments for a pair of chunks."""
    if student.off is None:
        return dict(off_s_ptr=dummy, stride_off_s=0, off_t_ptr=dummy, stride_off_t=0,
                    HAS_OFFSET=False, OFF_BLOCK=1)
    return dict(off_s_ptr=student.off, stride_off_s=student.off.stride(0), off_t_ptr=teacher.off,
                stride_off_t=teacher.off.stride(0), HAS_OFFSET=True, OFF_BLOCK=student.block)


def head_distill_grad(h_student, h_teacher, weight, y, keep, temperature, kind, beta, coef,
                      need_h, need_w):
    """Engine API (see chunked.head_distill_grad): four products per row chunk.

    The divergence needs both distributions element by element (log m = log(beta p +
    (1 - beta) q)), which the K-context forward kernel, reducing each context on its own,
    cannot give. So per row chunk: the student's and the teacher's logits with their
    log-prob, logsumexp and entropy (``_chunk_stats``: the library GEMM and
    ``row_stats_kernel``, or our forward kernel, fp32 or fp16 with tile offsets, as
    ``LOGITS_GEMM`` says), ``distill_row_kernel`` (D, and KL(q || m) for the JSD),
    ``distill_dz_kernel`` (dz in the compute dtype; in place in the student chunk where
    their elements have one size), then dh = dz W and dW += dz^T h as library GEMMs. No
    atomics, no host sync.
    """
    _check_dtype(weight.dtype)
    n, vocab = y.shape[0], weight.shape[0]
    dev = weight.device
    head = chunked._Head(_row_major(h_student), _row_major(weight))
    teacher = chunked._Head(_row_major(h_teacher), head.w)
    inv_temp = 1.0 / temperature
    code, beta_f, log_beta, log_1mbeta = _distill_consts(kind, beta)
    f32 = dict(dtype=torch.float32, device=dev)
    div, lp, ent = torch.zeros(n, **f32), torch.zeros(n, **f32), torch.zeros(n, **f32)
    dh, dw32 = chunked._grad_buffers(h_student, weight, head, need_h, need_w)
    want_grad = dh is not None or dw32 is not None
    coef = (coef.float() * inv_temp).contiguous()
    y_ids = y.contiguous()  # valid ids (0 for ignored rows: their log-prob is masked by the caller)
    source = logits_source(head.dtype)
    # dz in bf16 for bf16 heads; fp32 for fp32, and for fp16 before its scale (found from
    # dz itself: the divergence's gradient has no bound known beforehand)
    dz_dtype = head.dtype if head.dtype == torch.bfloat16 else torch.float32
    rows = _distill_chunk_rows(n, vocab, dev, source, dz_dtype if want_grad else None)
    cfg = _row_cfg(dev)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        r = r1 - r0
        zs, lp_c, lse_s, ent_c = _chunk_stats(head, r0, r1, y_ids, temperature, True, source)
        zt, _, lse_t, _ = _chunk_stats(teacher, r0, r1, y_ids, temperature, False, source)
        offsets = _offset_args(zs, zt, lse_s)
        lp[r0:r1], ent[r0:r1] = lp_c, ent_c
        d_c, k_c = torch.empty(r, **f32), torch.empty(r, **f32)
        distill_row_kernel[(triton.cdiv(r, cfg["BLOCK_R"]),)](
            zs.z, zs.z.stride(0), zt.z, zt.z.stride(0), lse_s, lse_t, d_c, k_c, r, vocab, inv_temp,
            beta_f, log_beta, log_1mbeta, KIND=code, **cfg, **offsets)
        div[r0:r1] = torch.where(keep[r0:r1], d_c, torch.zeros_like(d_c))
        if not want_grad:
            continue
        dz = _dz_buffer(zs.z, dz_dtype)
        distill_dz_kernel[(triton.cdiv(r, cfg["BLOCK_R"]), triton.cdiv(vocab, cfg["BLOCK_V"]))](
            zs.z, zs.z.stride(0), zt.z, zt.z.stride(0), dz, dz.stride(0), lse_s, lse_t, d_c, k_c,
            coef[r0:r1], r, vocab, inv_temp, beta_f, log_beta, log_1mbeta, KIND=code, **cfg,
            **offsets)
        del zt
        scale = chunked.fp16_tile_scale(dz, head.dtype)
        if scale is not None:  # fp16: the fp32 dz scaled to ~1, then rounded to fp16
            dz = dz.mul_(scale).to(torch.float16)
        del zs
        _products(dz, head, r0, r1, scale, dh, dw32)
        del dz
    return div, lp, ent, dh, chunked._finish_dw(dw32, weight)


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
