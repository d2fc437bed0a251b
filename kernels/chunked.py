"""Chunked pure-PyTorch engine: any device, never allocates [N, V].

Rows are processed in chunks of ``rows_per_chunk`` rows against the WHOLE vocabulary, so
the largest temporary is one [rows, V] logits chunk (at most ``TILE_ELEMENTS`` elements,
rounded up to one row). Each chunk is one library matmul in the compute dtype (bf16
operands stay bf16, with the BLAS's fp32 accumulation; fp16 is computed in fp32 on CPU),
and the exact fp32 log-softmax of the chunk gives the log-probs, logsumexp and entropy.

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

import torch

from . import _math
from ._types import Evidence

TILE_ELEMENTS = 1 << 22
"""Largest logits chunk, in elements (16 MiB in fp32; 131 rows at V = 32k): rows per chunk
= TILE_ELEMENTS // V. Each chunk streams the whole weight once per product, so smaller
chunks cost time; the extra peak is about three chunks plus dW. Lower it to trade speed
for memory."""

SKIP_ZERO_ROWS = "auto"
"""Drop rows with a zero gradient coefficient from the dh / dW products: 'auto' (on CPU
only: on CUDA it would need a host sync), True or False."""


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


def gradient_products(gd, h_c, w, scale, dw32, need_dh=True):
    """The two gradient products of one chunk: returns dh_c = dz W [r, H] and adds
    dz^T h to dw32 [V, H]. gd: dz [r, V] in the compute dtype, multiplied by scale
    (fp16) or not (scale None); dw32: the fp32 (or weight-dtype) accumulator, or None.
    Returns None instead of dh_c when need_dh is False."""
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
        else:  # low-precision product, fp32 accumulation across chunks
            part = _mm(gd.T, h_c)
            dw32.add_(part if scale is None else part.float().div_(scale))
    return dh_c


def _addmm_fp32_into(acc, x, y) -> bool:
    """acc += x @ y with bf16 / fp16 operands and fp32 acc in one GEMM (beta = 1, no
    [V, H] temporary); False where this torch / device does not offer it."""
    try:
        torch.ops.aten.addmm.dtype_out(acc, x, y, torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return False


def rows_per_chunk(num_rows: int, vocab: int) -> int:
    """Rows per chunk so that one [rows, V] chunk holds at most TILE_ELEMENTS (>= 1 row)."""
    return max(1, min(num_rows, TILE_ELEMENTS // max(1, vocab)))


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


def _chunk_stats(z, y, valid, inv_temp, with_entropy, acc, z_target=None):
    """(log-softmax [r, V] acc, lp [r], lse [r], entropy [r] | None) of one logits chunk.

    z_target: the exact untempered target logits [r] when z is low precision, else None.
    """
    if z_target is None:
        z_target = z.gather(1, y[:, None])[:, 0].to(acc)
    z_target = z_target * inv_temp
    z_max = z.amax(dim=1).to(acc) * inv_temp  # amax: 10x faster than max(dim) on CPU
    ls = _log_softmax(z, inv_temp, acc)
    # lse = max_j z_j - max_j log p_j: both terms exact or nearly (|max log p| <= log V)
    lse = z_max - ls.amax(dim=1)
    lp_all = z_target - lse
    ent = None
    if with_entropy:
        ent = -torch.linalg.vecdot(ls.exp(), ls)
    lp = torch.where(valid, lp_all, torch.zeros_like(lp_all))
    return ls, lp, lse, ent


class _Head:
    """The weight and hidden states in the compute dtype (upcast once per op if needed)."""

    def __init__(self, hidden, weight):
        self.dtype = compute_dtype(weight.dtype, weight.device)
        self.acc = acc_dtype(weight.dtype)
        self.w = weight if weight.dtype == self.dtype else weight.to(self.dtype)
        self.h = hidden if hidden.dtype == self.dtype else hidden.to(self.dtype)


def head_forward(hiddens, weight, y, valid, temperature, with_entropy):
    """Log-probs of y under each hidden block [N, H]: (lp [K, N], lse [K, N], entropy [K, N] | None).

    y [N] holds valid token ids (ignored positions replaced by 0); valid [N] bool. One
    [rows, V] product per chunk per block, then the exact log-softmax of the chunk.
    """
    acc = acc_dtype(weight.dtype)
    k, n, vocab = len(hiddens), y.shape[0], weight.shape[0]
    inv_temp = 1.0 / temperature
    dev = weight.device
    lp = torch.zeros(k, n, dtype=acc, device=dev)
    lse = torch.zeros(k, n, dtype=acc, device=dev)
    ent = torch.zeros(k, n, dtype=acc, device=dev) if with_entropy else None
    rows = rows_per_chunk(n, vocab)
    for i, hidden in enumerate(hiddens):
        head = _Head(hidden, weight)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            z = head.h[r0:r1] @ head.w.T  # [rows, V], compute dtype
            zt = _target_logits(head.h[r0:r1], head.w, y[r0:r1], acc) if z.dtype != acc else None
            ls, lp_c, lse_c, ent_c = _chunk_stats(z, y[r0:r1], valid[r0:r1], inv_temp,
                                                  with_entropy, acc, zt)
            del z, ls
            lp[i, r0:r1], lse[i, r0:r1] = lp_c, lse_c
            if with_entropy:
                ent[i, r0:r1] = ent_c
    return lp, lse, ent


def _grad_products(g, h_c, y_c, a_c, head, dh, r0, active, dw32, scale=None):
    """dh[r0 + rows] = dz W and dW += dz^T h for one chunk. g [r, V] (acc) holds
    p (b - c (z - lse)) / T for the chunk's rows (only the ``active`` ones, with h_c, y_c,
    a_c selected alike, when active is not None); a_c [r] (already / T) is added at the
    targets here. scale: the fp16 gradient scale (:func:`grad_scale`) or None.
    """
    g[torch.arange(g.shape[0], device=g.device), y_c] += a_c
    if scale is not None:
        g.mul_(scale)
    gd = g if g.dtype == head.dtype else g.to(head.dtype)
    del g
    dh_c = gradient_products(gd, h_c, head.w, scale, dw32, need_dh=dh is not None)
    if dh is not None:
        if active is None:
            dh[r0:r0 + dh_c.shape[0]] = dh_c
        else:
            dh[r0:].index_copy_(0, active, dh_c.to(dh.dtype))


def _select(active, *tensors):
    """The rows ``active`` of each tensor (all of them when active is None)."""
    if active is None:
        return tensors
    return tuple(t.index_select(0, active) for t in tensors)


def _active_rows(coef: torch.Tensor, device) -> torch.Tensor | None:
    """Indices of the rows whose coefficient is nonzero, or None (keep every row)."""
    if not _skip_rows(device):
        return None
    nz = coef != 0
    if bool(nz.all()):
        return None
    return torch.nonzero(nz)[:, 0]


def _grad_buffers(hidden, weight, head, need_h, need_w):
    dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    dw32 = None
    if need_w:
        dw_dtype = head.acc if weight.dtype != head.acc else weight.dtype
        dw32 = torch.zeros(weight.shape, dtype=dw_dtype, device=weight.device)
    return dh, dw32


def _finish_dw(dw32, weight):
    return None if dw32 is None else (dw32 if dw32.dtype == weight.dtype else dw32.to(weight.dtype))


def head_forward_grad(hidden, weight, y, valid, temperature, with_entropy, coef_fn,
                      need_h, need_w):
    """Forward and gradient in three products: (lp, lse, entropy | None, dh | None, dW | None).

    coef_fn(r0, r1, lp_chunk [r]) -> d loss / d lp for those rows ([r], acc dtype; 0 for
    rows that contribute nothing). Per chunk: logits once, exact log-softmax, the
    coefficient, dz = coef (onehot - p) / T in place, dh = dz W, dW += dz^T h.
    lp, lse, entropy are [N] (acc dtype); dh, dW in the input dtypes.
    """
    acc = acc_dtype(weight.dtype)
    n, vocab = y.shape[0], weight.shape[0]
    inv_temp = 1.0 / temperature
    dev = weight.device
    head = _Head(hidden, weight)
    lp = torch.zeros(n, dtype=acc, device=dev)
    lse = torch.zeros(n, dtype=acc, device=dev)
    ent = torch.zeros(n, dtype=acc, device=dev) if with_entropy else None
    dh, dw32 = _grad_buffers(hidden, weight, head, need_h, need_w)
    rows = rows_per_chunk(n, vocab)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        z = head.h[r0:r1] @ head.w.T
        zt = _target_logits(head.h[r0:r1], head.w, y[r0:r1], acc) if z.dtype != acc else None
        ls, lp_c, lse_c, ent_c = _chunk_stats(z, y[r0:r1], valid[r0:r1], inv_temp,
                                              with_entropy, acc, zt)
        del z
        lp[r0:r1], lse[r0:r1] = lp_c, lse_c
        if with_entropy:
            ent[r0:r1] = ent_c
        if dh is None and dw32 is None:
            continue
        coef = coef_fn(r0, r1, lp_c).to(acc) * inv_temp  # d loss / d lp, / T folded in
        coef = torch.where(valid[r0:r1], coef, torch.zeros_like(coef))
        active = _active_rows(coef, dev)
        if active is not None and active.numel() == 0:
            continue
        # only the rows with a gradient go on (CPU), before any further pass over the chunk
        ls, coef, y_c, h_c = _select(active, ls, coef, y[r0:r1], head.h[r0:r1])
        g = ls.exp_().mul_(-coef[:, None])  # -coef p, in place
        scale = grad_scale(coef, coef, None, head.dtype)
        _grad_products(g, h_c, y_c, coef, head, dh, r0, active, dw32, scale)
        del g, ls
    return lp, lse, ent, dh, _finish_dw(dw32, weight)


def head_backward(hidden, weight, y, lse, a, b, c, temperature, need_h, need_w):
    """(dh, dW) in the input dtypes (None where not needed) for d loss / d z_j =
    a onehot_j + p_j (b - c (z_j - lse)), z the tempered logits, per-row a, b, c [N]
    (c may be None). Chunk by chunk: the logits recomputed once, dz formed in place,
    dh = dz W, dW += dz^T h: four products with the forward, never storing [N, V].
    """
    acc = lse.dtype
    n, vocab = hidden.shape[0], weight.shape[0]
    inv_temp = 1.0 / temperature
    dev = weight.device
    head = _Head(hidden, weight)
    dh, dw32 = _grad_buffers(hidden, weight, head, need_h, need_w)
    # fold 1/T into the per-row coefficients (O(N), not O(N V))
    a, b = a * inv_temp, b * inv_temp
    c = None if c is None else c * inv_temp
    rows = rows_per_chunk(n, vocab)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        nz = (a[r0:r1] != 0) | (b[r0:r1] != 0)
        if c is not None:
            nz = nz | (c[r0:r1] != 0)
        active = _active_rows(nz, dev)
        if active is not None and active.numel() == 0:
            continue
        # rows without a gradient are not even recomputed (CPU)
        h_c, y_c, lse_c, a_c, b_c = _select(active, head.h[r0:r1], y[r0:r1], lse[r0:r1],
                                            a[r0:r1], b[r0:r1])
        c_c = None if c is None else _select(active, c[r0:r1])[0]
        z = h_c @ head.w.T
        zc = z.to(acc) if z.dtype != acc else z
        if inv_temp != 1.0:
            zc = zc.mul_(inv_temp)
        zc = zc.sub_(lse_c[:, None])  # z - lse = log p
        del z
        if c_c is not None:  # p (b - c log p)
            g = zc.mul(-c_c[:, None]).add_(b_c[:, None]).mul_(zc.exp_())
        else:
            g = zc.exp_().mul_(b_c[:, None])
        del zc
        scale = grad_scale(a_c, b_c, c_c, head.dtype)
        _grad_products(g, h_c, y_c, a_c, head, dh, r0, active, dw32, scale)
        del g
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
