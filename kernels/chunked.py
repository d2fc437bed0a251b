"""Chunked pure-PyTorch engine: any device, never allocates [N, V].

Rows are processed in chunks of ``rows_per_chunk`` rows against the WHOLE vocabulary, so
the largest temporaries are a few [rows, V] buffers (at most ``TILE_ELEMENTS`` elements
each, rounded up to one row), allocated once per op call and reused by every chunk
(``_Scratch``). Each chunk is one library matmul in the compute dtype (bf16 operands stay
bf16, with the BLAS's fp32 accumulation; fp16 is computed in fp32 on CPU) written into
its buffer, and the exact fp32 softmax of the chunk gives the log-probs, logsumexp and
entropy. Every exponential goes through the softmax kernel (vectorised; ``exp_`` is about
4x slower on CPU), and the gradient tile is formed in place in the probabilities.

Products per op (the floor is the count of [N, V, H] products the op cannot avoid):

- ``head_forward`` (log-probs, three contexts): one product per context.
- ``head_forward_grad`` (the PPO loss, whose gradient is known in the forward): THREE.
  Per chunk: the logits once, the per-token gradient coefficient from its log-probs,
  dz formed in place, then dh = dz W and dW += dz^T h as plain matmuls.
- ``head_backward`` (the log-prob op, whose upstream gradient arrives later): FOUR (the
  logits are recomputed, never stored).
- ``head_distill_grad`` (the self-distillation loss): FOUR, the student's and the
  teacher's logits, then dh = dz W and dW += dz^T h with dz formed from both
  log-softmaxes (``_math.distill_rows``).

Rows whose gradient coefficient is zero (masked, ignored, clipped, A = 0) are dropped
from the two gradient products on CPU (finding them reads the data, which on CUDA would
be a host synchronisation, so there they stay in, with dz = 0). All loops are sequential,
so results (dW included) are deterministic.
"""

from __future__ import annotations

import os

import torch

from . import _math
from ._types import Evidence

TILE_ELEMENTS = 1 << 23
"""Largest logits chunk, in elements (262 rows at V = 32k): rows per chunk = TILE_ELEMENTS
// V. Each chunk's products stream (and the BLAS packs) the whole weight once, so smaller
chunks cost time: on 2 CPU cores at V = 32k, H 256, fp32, the forward product of 128-row
chunks took 1.5x one [N, V] product, 256-row chunks 1.2x, 512-row chunks 1.1x. The rows
are then scaled to the scratch's bytes per logit (:class:`_Scratch`: 4 to 12, bf16 logits
counted as 4), so the scratch never exceeds 8 x TILE_ELEMENTS bytes (64 MiB); the extra peak
is that plus dW and dh. Lower it to trade speed for memory."""

SKIP_ZERO_ROWS = "auto"
"""Drop rows with a zero gradient coefficient from the dh / dW products: 'auto' (on CPU
only: on CUDA it would need a host sync), True or False."""


DW_ACCUMULATION = os.environ.get("CEPO_KERNELS_DW_ACCUMULATION", "fp32")
"""Where dW accumulates across row chunks for a bf16 weight: 'fp32' (default) in an fp32
[V, H] buffer, rounded to bf16 once at the end; 'weight' in the bf16 gradient itself, one
rounding per chunk (each chunk's product still accumulates in fp32 inside the GEMM). 'weight'
saves the fp32 buffer, 4 V H bytes: 1.24 GB at V 151,936, H 2048, where the issue's GPU
memory target (2% of naive, ~0.57 GB at N 16k) cannot hold it; the price is a gradient
error that grows with the chunk count (PPO dW against float64, N 1024, H 64, V 4000: 0.33%
at 4 chunks, 0.44% at 16, 0.54% at 64; fp32 accumulation 0.31%). fp32 and fp64 weights
accumulate in their own dtype and fp16 always in fp32 (its scaled gradient tile), whatever
this says."""


def dw_accumulation_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype dW accumulates in across chunks for a weight of ``weight_dtype``."""
    if DW_ACCUMULATION not in ("fp32", "weight"):
        raise ValueError(f"cepo_kernels: DW_ACCUMULATION (CEPO_KERNELS_DW_ACCUMULATION) must be "
                         f"'fp32' or 'weight', got {DW_ACCUMULATION!r}")
    if weight_dtype == torch.bfloat16 and DW_ACCUMULATION == "weight":
        return weight_dtype
    return acc_dtype(weight_dtype)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs (reference checks), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


FP16_COMPUTE_ON_CPU = False
"""Multiply fp16 inputs in fp16 on CPU too (slow; tests use it to exercise the scaled
fp16 gradient tile that CUDA uses)."""


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Operand dtype of the products: the input dtype, except fp16 off CUDA (fp32: the CPU
    fp16 GEMM is slow)."""
    if dtype == torch.float16 and device.type != "cuda" and not FP16_COMPUTE_ON_CPU:
        return torch.float32
    return dtype


def grad_scale(a, b, c, dtype):
    """Scale for an fp16 gradient tile, or None for other dtypes: a power of two (0-dim
    tensor, no host sync) that brings the largest possible |dz| of the chunk to about 1.

    dz_j = a onehot_j + p_j (b - c log p_j) is bounded by |a| + |b| + |c| / e (p |log p|
    <= 1/e). A PPO coefficient is A r / (kept tokens) ~ 1e-4, times p_j ~ 1 / V: far
    below fp16's smallest subnormal (6e-8) unscaled. dh and dW are divided back in fp32.
    """
    if dtype != torch.float16:
        return None
    bound = a.abs() + b.abs()
    if c is not None:
        bound = bound + c.abs()
    top = bound.amax().clamp_min(1e-30) if bound.numel() else bound.new_ones(())
    return torch.exp2(torch.floor(-torch.log2(top)))


def _mm(x, y):
    """x @ y, in fp32 output for low-precision operands where the library offers it
    (CUDA: bf16 / fp16 operands, fp32 accumulation and output); else in x's dtype."""
    if x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda:
        try:
            return torch.mm(x, y, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return x @ y


def gradient_products(gd, h_c, w, scale, dw32, need_dh=True, scratch=None):
    """The two gradient products of one chunk: returns dh_c = dz W [r, H] and adds
    dz^T h to dw32 [V, H]. gd: dz [r, V] in the compute dtype, multiplied by scale
    (fp16) or not (scale None); dw32: the fp32 (or weight-dtype) accumulator, or None.
    Returns None instead of dh_c when need_dh is False. scratch (a ``_Scratch`` or
    None): holds the buffer where a block of the low-precision dW product waits for its
    fp32 accumulation (CPU).
    """
    dh_c = None
    if need_dh:
        dh_c = _mm(gd, w)
        if scale is not None:
            dh_c = dh_c.float().div_(scale)
    if dw32 is not None:
        if dw32.dtype == gd.dtype and scale is None:
            dw32.addmm_(gd.T, h_c)
        elif scale is None and gd.is_cuda and _addmm_fp32_into(dw32, gd.T, h_c):
            pass  # low-precision operands accumulated by the GEMM straight into fp32 dW
        elif scale is None and not gd.is_cuda and scratch is not None:
            _accumulate_product(dw32, gd, h_c, scratch)
        else:  # low-precision product, fp32 accumulation across chunks
            part = _mm(gd.T, h_c)
            dw32.add_(part if scale is None else part.float().div_(scale))
    return dh_c


DW_BLOCK_ROWS = 2048
"""Rows of dW per low-precision product block on CPU (:func:`_accumulate_product`)."""


def _accumulate_product(dw32, gd, h_c, scratch) -> None:
    """dw32 += gd^T h_c for low-precision gd [r, V], h_c [r, H] into fp32 dw32 [V, H] on
    CPU, DW_BLOCK_ROWS rows of dW at a time: each block's product lands in a small reused
    buffer (the CPU BLAS has no bf16 GEMM with fp32 output) and is added while it is in
    cache. A whole [V, H] product would be a 16 MiB buffer plus, in a mixed-dtype add_,
    a 32 MiB fp32 temporary (V 32k, H 256), and 1.5x slower to add."""
    vocab = gd.shape[1]
    block = min(DW_BLOCK_ROWS, vocab)
    if scratch.part is None:
        scratch.part = torch.empty(block, h_c.shape[1], dtype=gd.dtype, device=gd.device)
    for v0 in range(0, vocab, block):
        v1 = min(v0 + block, vocab)
        part = torch.mm(gd[:, v0:v1].T, h_c, out=scratch.part[:v1 - v0])
        dw32[v0:v1].add_(part)


def _addmm_fp32_into(acc, x, y) -> bool:
    """acc += x @ y with bf16 / fp16 operands and fp32 acc in one GEMM (beta = 1, no
    [V, H] temporary); False where this torch / device does not offer it."""
    try:
        torch.ops.aten.addmm.dtype_out(acc, x, y, torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return False


def rows_per_chunk(num_rows: int, vocab: int, bytes_per_logit: int = 8) -> int:
    """Rows per chunk (>= 1): one [rows, V] chunk holds at most TILE_ELEMENTS logits when
    its scratch takes 8 bytes per logit (fp32 logits and probabilities), proportionally
    fewer or more rows for a scratch of ``bytes_per_logit`` (see :class:`_Scratch`)."""
    return max(1, min(num_rows, (8 * TILE_ELEMENTS) // (max(1, vocab) * bytes_per_logit)))


def _skip_rows(device: torch.device) -> bool:
    if SKIP_ZERO_ROWS == "auto":
        return device.type == "cpu"
    return bool(SKIP_ZERO_ROWS)


def _log_softmax(z: torch.Tensor, inv_temp: float, acc: torch.dtype) -> torch.Tensor:
    """Exact log-softmax [rows, V] in acc of the tempered chunk z (any float dtype)."""
    if inv_temp != 1.0:
        z = z.to(acc).mul_(inv_temp) if z.dtype != acc else z.mul_(inv_temp)
    return torch.log_softmax(z, dim=1, dtype=acc)


def _target_logits(h, w, y, acc):
    """z_y = h . W_y [r] in acc, exactly (O(r H)): a low-precision chunk rounds its logits,
    and the target logit enters the log-prob directly."""
    return torch.linalg.vecdot(h.to(acc), w.index_select(0, y).to(acc))


class _Head:
    """The weight and hidden states in the compute dtype (upcast once per op if needed)."""

    def __init__(self, hidden, weight):
        self.dtype = compute_dtype(weight.dtype, weight.device)
        self.acc = acc_dtype(weight.dtype)
        self.w = weight if weight.dtype == self.dtype else weight.to(self.dtype)
        self.h = hidden if hidden.dtype == self.dtype else hidden.to(self.dtype)


class _Scratch:
    """The [rows, V] buffers one op call reuses for every row chunk.

    A fresh 16 MiB tensor per chunk costs its page faults on every CPU call (about a sixth
    of an fp32 product at V = 32k), so each chunk writes into these instead:
    ``z`` the logits in the compute dtype (the GEMM's output; later the low-precision
    gradient tile); ``u`` the tempered logits in the accumulation dtype (``z`` itself when
    the compute dtype is the accumulation dtype); ``p`` the probabilities, then the
    accumulation-dtype gradient. On CPU, where nothing needs u once p is formed (no
    entropy, no entropy gradient), p IS u: the softmax runs in place (the kernel reads a
    row before writing it), which halves the scratch and so doubles the rows per chunk.
    ``spare``: an accumulation-dtype buffer that is free once p is formed (for compacting
    a tile's active rows), or None. ``part``: a block of the low-precision dW product
    awaiting fp32 accumulation (CPU, :func:`_accumulate_product`), made on first use.
    ``need_log_p``: keep p apart from u (entropy, its gradient). ``compacts``: the op
    compacts active rows (CPU row skipping); fp32 then keeps p apart from the logits too,
    so that the compaction goes into the logits' buffer (a low-precision tile goes into
    the free fp32 p). ``logits_only``: z alone (``_bf16_tile``).
    """

    def __init__(self, num_rows, head, need_log_p, compacts=False, logits_only=False):
        vocab, dev = head.w.shape[0], head.w.device
        low = head.dtype != head.acc
        in_place = dev.type == "cpu" and not need_log_p and (low or not compacts)
        asize = torch.empty((), dtype=head.acc).element_size()
        # rows are counted as if low-precision logits took the accumulation dtype's bytes:
        # the bf16 GEMMs run as fast at 256 rows as at 1024 (unlike fp32), and the memory
        # left over holds the BLAS's own temporaries (its reordered copy of the weight)
        if logits_only:
            bytes_per_logit = asize
        else:
            bytes_per_logit = (asize if low else 0) + asize * (1 if in_place else 2)
        self.rows = rows = rows_per_chunk(num_rows, vocab, bytes_per_logit)
        self.z = torch.empty(rows, vocab, dtype=head.dtype, device=dev)
        self.u = self.p = self.spare = None
        if not logits_only:
            acc_buffer = lambda: torch.empty(rows, vocab, dtype=head.acc, device=dev)  # noqa: E731
            self.u = acc_buffer() if low else self.z
            self.p = self.u if in_place else acc_buffer()
            self.spare = None if in_place else self.u
        self.part = None


def _softmax_into(u: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """softmax(u, dim=1) written into out (same shape and dtype). Every exponential of the
    engine goes through this kernel: it vectorises its exp, where ``Tensor.exp_`` is
    about 4x slower on CPU."""
    return torch.ops.aten._softmax.out(u, 1, False, out=out)


def _chunk_logits(s: _Scratch, h_c, head, inv_temp):
    """The tempered logits u = h_c W^T / T of one chunk: (z [r, V] compute dtype,
    u [r, V] acc), views of the scratch buffers (u is z for fp32 / fp64)."""
    r = h_c.shape[0]
    z = s.z[:r]
    torch.mm(h_c, head.w.T, out=z)
    u = s.u[:r]
    if u.data_ptr() != z.data_ptr():
        u.copy_(z)
    if inv_temp != 1.0:
        u.mul_(inv_temp)
    return z, u


def _chunk_stats(s, h_c, head, y_c, valid_c, inv_temp, with_entropy):
    """Logits of one chunk and their exact statistics.

    Returns (p [r, V], lp [r], lse [r], entropy [r] | None), p a view of the scratch:
    p = softmax(u) (in place where the scratch's p is its u; with_entropy needs them
    apart, ``need_log_p``, and leaves log p in u). lse = max u - log max p (both maxima
    at the same column, where p = 1 / sum exp(u - max u) up to rounding); the log-prob
    of the target is its exact logit minus lse (for low-precision logits, the target
    logit is computed in fp32 from h and W, O(r H): a rounded logit would enter the
    log-prob directly).
    """
    _, u = _chunk_logits(s, h_c, head, inv_temp)
    u_y = u.gather(1, y_c[:, None])[:, 0]  # before the softmax, which may overwrite u
    u_max = u.amax(dim=1)  # amax: 10x faster than max(dim) on CPU
    p = s.p[:u.shape[0]]
    _softmax_into(u, p)
    lse = u_max - p.amax(dim=1).log()
    ent = None
    if with_entropy:  # -sum p log p, every term <= 0 (no cancellation against lse)
        u.sub_(lse[:, None])
        ent = -torch.linalg.vecdot(p, u)
    return p, _target_log_probs(u_y - lse, lse, h_c, head, y_c, valid_c, inv_temp), lse, ent


def _target_log_probs(lp, lse, h_c, head, y_c, valid_c, inv_temp):
    """The chunk's log-probs of its targets [r], 0 where not valid: ``lp`` as the chunk's
    logits give them, except for low-precision logits, whose target logit is recomputed
    exactly in fp32 (h . W_y, O(r H)): a rounded logit would enter the log-prob directly."""
    if head.dtype != head.acc:
        lp = _target_logits(h_c, head.w, y_c, head.acc) * inv_temp - lse
    return torch.where(valid_c, lp, torch.zeros_like(lse))


def _chunk_log_probs(s, h_c, head, y_c, valid_c, inv_temp):
    """Logits of one chunk, their log-softmax in place, and its statistics: (lp [r], lse [r]).

    The forward without entropy needs no probabilities: one in-place log-softmax (a read
    and a write of the chunk) gives log p_y, where ``_chunk_stats`` reads the chunk twice
    more for its two maxima. lse = u_y - log p_y (u_y the tempered logit read before the
    pass); the target's log-prob through ``_target_log_probs``, as there.
    """
    _, u = _chunk_logits(s, h_c, head, inv_temp)
    u_y = u.gather(1, y_c[:, None])[:, 0]
    torch.ops.aten._log_softmax.out(u, 1, False, out=u)
    log_p_y = u.gather(1, y_c[:, None])[:, 0]
    lse = u_y - log_p_y
    return _target_log_probs(log_p_y, lse, h_c, head, y_c, valid_c, inv_temp), lse


def head_forward(hiddens, weight, y, valid, temperature, with_entropy):
    """Log-probs of y under each hidden block [N, H]: (lp [K, N], lse [K, N], entropy [K, N] | None).

    y [N] holds valid token ids (ignored positions replaced by 0); valid [N] bool. One
    [rows, V] product per chunk per block, then the exact statistics of the chunk (an
    in-place log-softmax without entropy, the softmax with it).
    """
    acc = acc_dtype(weight.dtype)
    k, n = len(hiddens), y.shape[0]
    inv_temp = 1.0 / temperature
    dev = weight.device
    lp = torch.zeros(k, n, dtype=acc, device=dev)
    lse = torch.zeros(k, n, dtype=acc, device=dev)
    ent = torch.zeros(k, n, dtype=acc, device=dev) if with_entropy else None
    if n == 0:
        return lp, lse, ent
    s = None
    for i, hidden in enumerate(hiddens):
        head = _Head(hidden, weight)
        s = s or _Scratch(n, head, need_log_p=with_entropy)
        rows = s.rows
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            if not with_entropy:
                lp[i, r0:r1], lse[i, r0:r1] = _chunk_log_probs(
                    s, head.h[r0:r1], head, y[r0:r1], valid[r0:r1], inv_temp)
                continue
            _, lp_c, lse_c, ent_c = _chunk_stats(s, head.h[r0:r1], head, y[r0:r1],
                                                 valid[r0:r1], inv_temp, with_entropy)
            lp[i, r0:r1], lse[i, r0:r1], ent[i, r0:r1] = lp_c, lse_c, ent_c
    return lp, lse, ent


def _add_at_targets(g: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """g[i, y_i] += a_i in place (the onehot term of a gradient tile g [r, V]); returns g."""
    g[torch.arange(g.shape[0], device=g.device), y] += a.to(g.dtype)
    return g


def _grad_tile(s, g, active, head, scale):
    """The gradient tile in the compute dtype, for the GEMMs: g [r, V] (acc, in s.p), only
    its ``active`` rows when active is not None (compacted into s.spare, or last, into a
    new tensor, where the scratch has none), times the fp16 scale, then rounded into s.z
    where the compute dtype is low precision."""
    if active is not None and s.spare is not None:
        g = torch.index_select(g, 0, active, out=s.spare[:active.shape[0]])
    if scale is not None:
        g.mul_(scale)
    if g.dtype != head.dtype:
        g = s.z[:g.shape[0]].copy_(g)
    if active is not None and s.spare is None:
        if g.data_ptr() == s.z.data_ptr() and s.p is not None:  # p is free once g is in z
            g = torch.index_select(g, 0, active, out=_reinterpret(s.p, g.dtype, active.shape[0]))
        else:
            g = g.index_select(0, active)
    return g


def _reinterpret(buffer: torch.Tensor, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """[rows, V] of ``dtype`` over the storage of a free contiguous [R, V] ``buffer`` of an
    element size at least dtype's (the low-precision tile compacted into the fp32 p)."""
    vocab = buffer.shape[1]
    return buffer.view(-1).view(dtype)[:rows * vocab].view(rows, vocab)


def _grad_products(s, gd, h_c, head, dh, r0, r1, active, dw32, scale):
    """dh[rows] = gd W and dW += gd^T h_c for one chunk's gradient tile gd [r', V]
    (compute dtype; r' = the active rows when active is not None)."""
    dh_c = gradient_products(gd, h_c, head.w, scale, dw32, need_dh=dh is not None, scratch=s)
    if dh is not None:
        if active is None:
            dh[r0:r1] = dh_c
        else:
            dh[r0:r1].index_copy_(0, active, dh_c.to(dh.dtype))


def _select(active, *tensors):
    """The rows ``active`` of each tensor (all of them when active is None)."""
    if active is None:
        return tensors
    return tuple(t.index_select(0, active) for t in tensors)


def _active_rows(coef: torch.Tensor, device, min_skip: float = 0.0) -> torch.Tensor | None:
    """Indices of the rows whose coefficient is nonzero, or None (keep every row): also
    None when fewer than ``min_skip`` of the rows could be dropped (dropping them then
    costs a pass over the chunk that the products they would save do not repay)."""
    if not _skip_rows(device):
        return None
    nz = coef != 0
    kept = int(nz.sum())
    if kept == nz.numel() or (kept and nz.numel() - kept < min_skip * nz.numel()):
        return None
    return torch.nonzero(nz)[:, 0]


SKIP_MIN_FRACTION = 1 / 16
"""Drop inactive rows from a chunk's gradient tile only when at least this fraction of
the chunk is inactive: compacting the tile is one pass over it, about what the two
gradient products spend on 1/20 of the rows (fp32, CPU)."""


def _grad_buffers(hidden, weight, head, need_h, need_w):
    dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    dw32 = None
    if need_w:
        dw32 = torch.zeros(weight.shape, dtype=dw_accumulation_dtype(weight.dtype),
                           device=weight.device)
    return dh, dw32


def _finish_dw(dw32, weight):
    return None if dw32 is None else (dw32 if dw32.dtype == weight.dtype else dw32.to(weight.dtype))


def head_forward_grad(hidden, weight, y, valid, temperature, with_entropy, coef_fn,
                      need_h, need_w):
    """Forward and gradient in three products: (lp, lse, entropy | None, dh | None, dW | None).

    coef_fn(r0, r1, lp_chunk [r]) -> d loss / d lp for those rows ([r], acc dtype; 0 for
    rows that contribute nothing). Per chunk: logits once, the exact softmax statistics,
    the coefficient, dz = coef (onehot - p) / T in place, dh = dz W, dW += dz^T h.
    lp, lse, entropy are [N] (acc dtype); dh, dW in the input dtypes.
    """
    acc = acc_dtype(weight.dtype)
    n = y.shape[0]
    inv_temp = 1.0 / temperature
    dev = weight.device
    head = _Head(hidden, weight)
    lp = torch.zeros(n, dtype=acc, device=dev)
    lse = torch.zeros(n, dtype=acc, device=dev)
    ent = torch.zeros(n, dtype=acc, device=dev) if with_entropy else None
    dh, dw32 = _grad_buffers(hidden, weight, head, need_h, need_w)
    s = _Scratch(n, head, need_log_p=with_entropy, compacts=_skip_rows(dev)) if n else None
    rows = s.rows if n else 1
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        p, lp_c, lse_c, ent_c = _chunk_stats(s, head.h[r0:r1], head, y[r0:r1],
                                             valid[r0:r1], inv_temp, with_entropy)
        lp[r0:r1], lse[r0:r1] = lp_c, lse_c
        if with_entropy:
            ent[r0:r1] = ent_c
        if dh is None and dw32 is None:
            continue
        coef = coef_fn(r0, r1, lp_c).to(acc) * inv_temp  # d loss / d lp, / T folded in
        coef = torch.where(valid[r0:r1], coef, torch.zeros_like(coef))
        active = _active_rows(coef, dev, SKIP_MIN_FRACTION)
        if active is not None and active.numel() == 0:
            continue
        g = _add_at_targets(p.mul_(-coef[:, None]), y[r0:r1], coef)  # coef (onehot - p)
        scale = grad_scale(coef, coef, None, head.dtype)
        gd = _grad_tile(s, g, active, head, scale)
        h_c = _select(active, head.h[r0:r1])[0]
        _grad_products(s, gd, h_c, head, dh, r0, r1, active, dw32, scale)
    return lp, lse, ent, dh, _finish_dw(dw32, weight)


def _bf16_tile(head, c, inv_temp) -> bool:
    """Whether the log-prob backward forms its gradient tile b p + a onehot in bf16
    straight from the bf16 logits (softmax in place, bf16 out, fp32 math inside): bf16
    logits on CPU, no entropy term (which needs log p) and nothing to temper. The tile is
    rounded to bf16 for its GEMMs anyway, so this adds one rounding of p (2^-9) to the
    logits' own (|z| 2^-9), and saves two conversion passes and the fp32 buffer."""
    return (head.dtype == torch.bfloat16 and head.w.device.type == "cpu" and c is None
            and inv_temp == 1.0)


def head_backward(hidden, weight, y, lse, a, b, c, temperature, need_h, need_w):
    """(dh, dW) in the input dtypes (None where not needed) for d loss / d z_j =
    a onehot_j + p_j (b - c (z_j - lse)), z the tempered logits, per-row a, b, c [N]
    (c may be None). Chunk by chunk: the logits recomputed once, dz formed in place,
    dh = dz W, dW += dz^T h: four products with the forward, never storing [N, V].
    p is the softmax of the recomputed logits (it sums to 1 whatever the rounding of this
    GEMM against the forward's), and log p = u - logsumexp of the same logits.
    """
    n = hidden.shape[0]
    inv_temp = 1.0 / temperature
    dev = weight.device
    head = _Head(hidden, weight)
    dh, dw32 = _grad_buffers(hidden, weight, head, need_h, need_w)
    # fold 1/T into the per-row coefficients (O(N), not O(N V))
    a, b = a * inv_temp, b * inv_temp
    c = None if c is None else c * inv_temp
    bf16_tile = _bf16_tile(head, c, inv_temp)
    s = _Scratch(n, head, need_log_p=c is not None, logits_only=bf16_tile) if n else None
    rows = s.rows if n else 1
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        nz = (a[r0:r1] != 0) | (b[r0:r1] != 0)
        if c is not None:
            nz = nz | (c[r0:r1] != 0)
        active = _active_rows(nz, dev)
        if active is not None and active.numel() == 0:
            continue
        # rows without a gradient are not even recomputed (CPU)
        h_c, y_c, a_c, b_c = _select(active, head.h[r0:r1], y[r0:r1], a[r0:r1], b[r0:r1])
        c_c = None if c is None else _select(active, c[r0:r1])[0]
        if bf16_tile:
            z = s.z[:h_c.shape[0]]
            g = _softmax_into(torch.mm(h_c, head.w.T, out=z), z)
            g.mul_(b_c.to(g.dtype)[:, None])  # a bf16 factor: a mixed-dtype mul_ upcasts all
            _add_at_targets(g, y_c, a_c)
            _grad_products(s, g, h_c, head, dh, r0, r1, active, dw32, None)
            continue
        _, u = _chunk_logits(s, h_c, head, inv_temp)
        p = _softmax_into(u, s.p[:u.shape[0]])
        if c_c is not None:  # p (b - c log p), log p = u - lse of these logits
            lse_c = u.amax(dim=1) - p.amax(dim=1).log()
            u.sub_(lse_c[:, None]).mul_(-c_c[:, None]).add_(b_c[:, None])
            g = p.mul_(u)
        else:
            g = p.mul_(b_c[:, None])
        _add_at_targets(g, y_c, a_c)
        scale = grad_scale(a_c, b_c, c_c, head.dtype)
        gd = _grad_tile(s, g, None, head, scale)
        _grad_products(s, gd, h_c, head, dh, r0, r1, active, dw32, scale)
    return dh, _finish_dw(dw32, weight)


def _logits_fp32(h_c, w):
    """h_c @ w.T [rows, V]: fp32 output from bf16 / fp16 operands on CUDA (the library GEMM,
    fp32 accumulation); elsewhere in the compute dtype (bf16 CPU logits round to bf16)."""
    return _mm(h_c, w.T)


def fp16_tile_scale(g, dtype):
    """Power-of-two scale (0-dim, no host sync) bringing max |g| of an fp16 gradient tile
    to about 1, or None for other dtypes (see :func:`grad_scale`)."""
    if dtype != torch.float16:
        return None
    top = g.abs().amax().clamp_min(1e-30) if g.numel() else g.new_ones(())
    return torch.exp2(torch.floor(-torch.log2(top)))


def head_distill_grad(h_student, h_teacher, weight, y, keep, temperature, kind, beta, coef,
                      need_h, need_w, rows=None):
    """Self-distillation forward and gradient in FOUR products per row chunk:
    (divergence [N], student lp [N], student entropy [N], dh | None, dW | None).

    Per chunk: the student and the teacher logits (two products), their exact fp32
    log-softmax, the divergence D and dz = coef dD/du / T (``_math.distill_rows``, u the
    tempered student logits), then dh = dz W and dW += dz^T h_student. coef [N] (acc) is
    d loss / d D per row (keep w / normalizer; 0 for rows that contribute nothing). The
    teacher is stop-gradient: it enters only through p. y [N]: valid token ids (ignored
    rows replaced by 0), used for the log-prob statistic only.
    """
    acc = acc_dtype(weight.dtype)
    n, vocab = y.shape[0], weight.shape[0]
    inv_temp = 1.0 / temperature
    dev = weight.device
    head = _Head(h_student, weight)
    h_t = h_teacher if h_teacher.dtype == head.dtype else h_teacher.to(head.dtype)
    div = torch.zeros(n, dtype=acc, device=dev)
    lp = torch.zeros(n, dtype=acc, device=dev)
    ent = torch.zeros(n, dtype=acc, device=dev)
    dh, dw32 = _grad_buffers(h_student, weight, head, need_h, need_w)
    want_grad = dh is not None or dw32 is not None
    coef = coef.to(acc) * inv_temp  # / T folded in
    rows = rows_per_chunk(n, vocab) if rows is None else max(1, min(rows, n))
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        ls_s = _log_softmax(_logits_fp32(head.h[r0:r1], head.w), inv_temp, acc)
        ls_t = _log_softmax(_logits_fp32(h_t[r0:r1], head.w), inv_temp, acc)
        lp[r0:r1] = ls_s.gather(1, y[r0:r1, None])[:, 0]
        ent[r0:r1] = -torch.linalg.vecdot(ls_s.exp(), ls_s)
        d, g = _math.distill_rows(ls_s, ls_t, kind, beta, want_grad)
        del ls_s, ls_t
        div[r0:r1] = torch.where(keep[r0:r1], d, torch.zeros_like(d))
        if g is None:
            continue
        c = coef[r0:r1]
        active = _active_rows(c, dev)
        if active is not None and active.numel() == 0:
            continue
        g, c, h_c = _select(active, g, c, head.h[r0:r1])
        g = g.mul_(c[:, None])
        scale = fp16_tile_scale(g, head.dtype)
        if scale is not None:
            g.mul_(scale)
        gd = g if g.dtype == head.dtype else g.to(head.dtype)
        del g
        dh_c = gradient_products(gd, h_c, head.w, scale, dw32, need_dh=dh is not None)
        del gd
        if dh is not None:
            if active is None:
                dh[r0:r1] = dh_c
            else:
                dh[r0:].index_copy_(0, active, dh_c.to(dh.dtype))
    return div, lp, ent, dh, _finish_dw(dw32, weight)


def contrastive_evidence(h_policy, h_pos, h_neg, weight, targets, advantages, has_negative, *,
                         lam, eps_w, temperature=1.0) -> Evidence:
    """Three-context log-probs plus the contrastive epilogue (no gradient)."""
    with torch.no_grad():
        valid = targets != -100
        y = torch.where(valid, targets, 0)
        lp, _, _ = head_forward((h_policy, h_pos, h_neg), weight, y, valid, temperature, False)
        delta, token_adv, clipped = _math.evidence_epilogue(
            lp[0], lp[1], lp[2], advantages, has_negative, valid, lam=lam, eps_w=eps_w)
    return Evidence(lp[0], lp[1], lp[2], delta, token_adv, clipped)
