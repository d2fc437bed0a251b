"""Triton kernels: tiled LM-head log-probs for K contexts, and the tile-recomputing backward.

Forward (``logprob_fwd_kernel``): the grid is (row blocks, vocabulary splits). A program
owns BLOCK_N rows of each of the K contexts and a contiguous slice of the vocabulary.
For each vocabulary tile it walks the hidden dimension, loading each weight tile ONCE
and multiplying it against the K hidden-state tiles, then folds the K logits tiles into
online logsumexp statistics (running max m, sum s, entropy numerator t, target logit).
With one split the program finalises directly. With several (needed when N is small,
to fill the GPU), each program writes its partial statistics, and the last program to
finish a row block (an atomic ticket) combines them and runs the epilogue, so the whole
op is still one launch. The epilogue writes log-probs, logsumexp, entropy and, for the
contrastive op (K = 3), delta, the token advantages and the clip flags.

Backward (``logprob_bwd_kernel``): grid (row blocks, vocabulary blocks). Each program
recomputes its logits tile, forms d loss / d z = a onehot + p (b - c (z - lse)) in
registers, and accumulates dh += dz W and dW += dz^T h with fp32 atomics. Nothing of
size [N, V] is ever stored.

UPCAST (a constexpr) casts tiles to fp32 before tl.dot: Triton's CPU interpreter
computes bf16 / fp16 dots wrongly, so the tests run the interpreter that way.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _online_update(z, cols, col_ok, y, m, s, t, z_target, WITH_ENTROPY: tl.constexpr):
    """Fold one [BLOCK_N, BLOCK_V] tile of tempered logits into the running statistics."""
    z = tl.where(col_ok[None, :], z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=1))
    scale = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])
    s = s * scale + tl.sum(e, axis=1)
    if WITH_ENTROPY:
        t = t * scale + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), axis=1)
    hit = cols[None, :] == y[:, None]
    z_target += tl.sum(tl.where(hit, z, 0.0), axis=1)
    return m_new, s, t, z_target


@triton.jit
def _load_tile(ptr, rows, row_ok, stride, ds, d_ok, UPCAST: tl.constexpr):
    # int64 row offsets: V x H exceeds 2^31 elements for the largest heads
    x = tl.load(ptr + rows.to(tl.int64)[:, None] * stride + ds[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_partials(part_ptr, split, k, rows, row_ok, N, m, s, t, z_target, K: tl.constexpr):
    """part[split, k, j, row] for j in (max, sum, entropy numerator, target logit)."""
    base = part_ptr + ((split * K + k) * 4) * N + rows
    tl.store(base, m, mask=row_ok)
    tl.store(base + N, s, mask=row_ok)
    tl.store(base + 2 * N, t, mask=row_ok)
    tl.store(base + 3 * N, z_target, mask=row_ok)


@triton.jit
def _combine_partials(part_ptr, k, rows, row_ok, N, K: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Online combination of the NUM_SPLITS partial statistics of context k."""
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    z_target = tl.zeros([BLOCK_N], tl.float32)
    for split in range(NUM_SPLITS):
        base = part_ptr + ((split * K + k) * 4) * N + rows
        m_p = tl.load(base, mask=row_ok, other=0.0, cache_modifier=".cg")
        s_p = tl.load(base + N, mask=row_ok, other=1.0, cache_modifier=".cg")
        t_p = tl.load(base + 2 * N, mask=row_ok, other=0.0, cache_modifier=".cg")
        zt_p = tl.load(base + 3 * N, mask=row_ok, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, m_p)
        a = tl.exp(m - m_new)
        b = tl.exp(m_p - m_new)
        s = s * a + s_p * b
        t = t * a + t_p * b
        z_target += zt_p
        m = m_new
    return m, s, t, z_target


@triton.jit
def _finalize_context(k, m, s, t, z_target, valid, rows, row_ok, N, lp_ptr, lse_ptr, ent_ptr,
                      WITH_ENTROPY: tl.constexpr):
    """Write lp, lse (and entropy) of context k; return lp for the epilogue."""
    lse = m + tl.log(s)
    lp = tl.where(valid, z_target - lse, 0.0)
    tl.store(lp_ptr + k * N + rows, lp, mask=row_ok)
    tl.store(lse_ptr + k * N + rows, lse, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + k * N + rows, lse - t / s, mask=row_ok)
    return lp


@triton.jit
def _evidence_epilogue(lp_pol, lp_pos, lp_neg, valid, rows, row_ok, adv_ptr, has_neg_ptr,
                       delta_ptr, tok_adv_ptr, clipped_ptr, lam, eps_w):
    """DESIGN.md steps 3-5 on the three log-probs of BLOCK_N tokens."""
    adv = tl.load(adv_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    has_neg = tl.load(has_neg_ptr + rows, mask=row_ok, other=0) != 0
    delta = tl.where(has_neg, lp_pos - lp_neg, lp_pos - lp_pol)
    sign = tl.where(adv > 0, 1.0, tl.where(adv < 0, -1.0, 0.0))
    raw = tl.exp(sign * delta)
    w = tl.minimum(tl.maximum(raw, 1.0 - eps_w), 1.0 + eps_w)
    tok_adv = adv * ((1.0 - lam) + lam * w)
    clipped = ((raw < 1.0 - eps_w) | (raw > 1.0 + eps_w)) & valid
    tl.store(delta_ptr + rows, tl.where(valid, delta, 0.0), mask=row_ok)
    tl.store(tok_adv_ptr + rows, tl.where(valid, tok_adv, 0.0), mask=row_ok)
    tl.store(clipped_ptr + rows, clipped.to(tl.int8), mask=row_ok)


@triton.jit
def _finalize_all(m0, s0, t0, zt0, m1, s1, t1, zt1, m2, s2, t2, zt2, m3, s3, t3, zt3,
                  valid, rows, row_ok, N, lp_ptr, lse_ptr, ent_ptr, adv_ptr, has_neg_ptr,
                  delta_ptr, tok_adv_ptr, clipped_ptr, lam, eps_w,
                  K: tl.constexpr, WITH_ENTROPY: tl.constexpr, EPILOGUE: tl.constexpr):
    lp0 = _finalize_context(0, m0, s0, t0, zt0, valid, rows, row_ok, N, lp_ptr, lse_ptr, ent_ptr,
                            WITH_ENTROPY)
    if K > 1:
        lp1 = _finalize_context(1, m1, s1, t1, zt1, valid, rows, row_ok, N, lp_ptr, lse_ptr,
                                ent_ptr, WITH_ENTROPY)
    if K > 2:
        lp2 = _finalize_context(2, m2, s2, t2, zt2, valid, rows, row_ok, N, lp_ptr, lse_ptr,
                                ent_ptr, WITH_ENTROPY)
    if K > 3:
        _finalize_context(3, m3, s3, t3, zt3, valid, rows, row_ok, N, lp_ptr, lse_ptr, ent_ptr,
                          WITH_ENTROPY)
    if EPILOGUE:
        _evidence_epilogue(lp0, lp1, lp2, valid, rows, row_ok, adv_ptr, has_neg_ptr, delta_ptr,
                           tok_adv_ptr, clipped_ptr, lam, eps_w)


@triton.jit
def logprob_fwd_kernel(
    h0_ptr, h1_ptr, h2_ptr, h3_ptr, stride_h0, stride_h1, stride_h2, stride_h3,
    w_ptr, stride_w, y_ptr,
    part_ptr, ticket_ptr,
    lp_ptr, lse_ptr, ent_ptr,
    adv_ptr, has_neg_ptr, delta_ptr, tok_adv_ptr, clipped_ptr,
    N, V, D, inv_temp, lam, eps_w, vocab_per_split,
    K: tl.constexpr, NUM_SPLITS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    EPILOGUE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Log-probs of targets y under K <= 4 hidden-state blocks sharing one LM head."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-100)
    valid = y != -100

    m0 = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s0 = tl.zeros([BLOCK_N], tl.float32)
    t0 = tl.zeros([BLOCK_N], tl.float32)
    zt0 = tl.zeros([BLOCK_N], tl.float32)
    m1, s1, t1, zt1 = m0, s0, t0, zt0
    m2, s2, t2, zt2 = m0, s0, t0, zt0
    m3, s3, t3, zt3 = m0, s0, t0, zt0

    v_lo = split * vocab_per_split
    v_hi = tl.minimum(v_lo + vocab_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        acc0 = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        acc3 = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            # the weight tile, transposed [BLOCK_D, BLOCK_V]: loaded once for all K contexts
            wt = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_w + ds[:, None],
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST:
                wt = wt.to(tl.float32)
            acc0 = tl.dot(_load_tile(h0_ptr, rows, row_ok, stride_h0, ds, d_ok, UPCAST), wt, acc0,
                          input_precision="ieee")
            if K > 1:
                acc1 = tl.dot(_load_tile(h1_ptr, rows, row_ok, stride_h1, ds, d_ok, UPCAST), wt,
                              acc1, input_precision="ieee")
            if K > 2:
                acc2 = tl.dot(_load_tile(h2_ptr, rows, row_ok, stride_h2, ds, d_ok, UPCAST), wt,
                              acc2, input_precision="ieee")
            if K > 3:
                acc3 = tl.dot(_load_tile(h3_ptr, rows, row_ok, stride_h3, ds, d_ok, UPCAST), wt,
                              acc3, input_precision="ieee")
        m0, s0, t0, zt0 = _online_update(acc0 * inv_temp, cols, col_ok, y, m0, s0, t0, zt0,
                                         WITH_ENTROPY)
        if K > 1:
            m1, s1, t1, zt1 = _online_update(acc1 * inv_temp, cols, col_ok, y, m1, s1, t1, zt1,
                                             WITH_ENTROPY)
        if K > 2:
            m2, s2, t2, zt2 = _online_update(acc2 * inv_temp, cols, col_ok, y, m2, s2, t2, zt2,
                                             WITH_ENTROPY)
        if K > 3:
            m3, s3, t3, zt3 = _online_update(acc3 * inv_temp, cols, col_ok, y, m3, s3, t3, zt3,
                                             WITH_ENTROPY)

    if NUM_SPLITS == 1:
        _finalize_all(m0, s0, t0, zt0, m1, s1, t1, zt1, m2, s2, t2, zt2, m3, s3, t3, zt3,
                      valid, rows, row_ok, N, lp_ptr, lse_ptr, ent_ptr, adv_ptr, has_neg_ptr,
                      delta_ptr, tok_adv_ptr, clipped_ptr, lam, eps_w, K, WITH_ENTROPY, EPILOGUE)
    else:
        _store_partials(part_ptr, split, 0, rows, row_ok, N, m0, s0, t0, zt0, K)
        if K > 1:
            _store_partials(part_ptr, split, 1, rows, row_ok, N, m1, s1, t1, zt1, K)
        if K > 2:
            _store_partials(part_ptr, split, 2, rows, row_ok, N, m2, s2, t2, zt2, K)
        if K > 3:
            _store_partials(part_ptr, split, 3, rows, row_ok, N, m3, s3, t3, zt3, K)
        # make this program's partials visible before taking a ticket (release), and see
        # every other program's partials after the last ticket (acquire)
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel")
        if ticket == NUM_SPLITS - 1:
            m0, s0, t0, zt0 = _combine_partials(part_ptr, 0, rows, row_ok, N, K, NUM_SPLITS,
                                                BLOCK_N)
            if K > 1:
                m1, s1, t1, zt1 = _combine_partials(part_ptr, 1, rows, row_ok, N, K, NUM_SPLITS,
                                                    BLOCK_N)
            if K > 2:
                m2, s2, t2, zt2 = _combine_partials(part_ptr, 2, rows, row_ok, N, K, NUM_SPLITS,
                                                    BLOCK_N)
            if K > 3:
                m3, s3, t3, zt3 = _combine_partials(part_ptr, 3, rows, row_ok, N, K, NUM_SPLITS,
                                                    BLOCK_N)
            _finalize_all(m0, s0, t0, zt0, m1, s1, t1, zt1, m2, s2, t2, zt2, m3, s3, t3, zt3,
                          valid, rows, row_ok, N, lp_ptr, lse_ptr, ent_ptr, adv_ptr, has_neg_ptr,
                          delta_ptr, tok_adv_ptr, clipped_ptr, lam, eps_w, K, WITH_ENTROPY,
                          EPILOGUE)


@triton.jit
def logprob_bwd_kernel(
    h_ptr, stride_h, w_ptr, stride_w, y_ptr, lse_ptr, a_ptr, b_ptr, c_ptr,
    dh_ptr, stride_dh, dw_ptr, stride_dw,
    N, V, D, inv_temp,
    HAS_C: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dh [N, D] += dz W, dW [V, D] += dz^T h for dz = (a onehot + p (b - c (z - lse))) / T."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V

    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        wt = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_w + ds[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            wt = wt.to(tl.float32)
        acc = tl.dot(_load_tile(h_ptr, rows, row_ok, stride_h, ds, d_ok, UPCAST), wt, acc,
                     input_precision="ieee")

    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    b = tl.load(b_ptr + rows, mask=row_ok, other=0.0)
    zc = acc * inv_temp - lse[:, None]
    p = tl.exp(zc)
    if HAS_C:
        c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
        g = p * (b[:, None] - c[:, None] * zc)
    else:
        g = p * b[:, None]
    g += tl.where(cols[None, :] == y[:, None], a[:, None], 0.0)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0) * inv_temp
    g = g.to(h_ptr.dtype.element_ty)
    if UPCAST:
        g = g.to(tl.float32)

    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        if COMPUTE_DH:
            w = _load_tile(w_ptr, cols, col_ok, stride_w, ds, d_ok, UPCAST)
            dh = tl.dot(g, w, input_precision="ieee")
            tl.atomic_add(dh_ptr + rows.to(tl.int64)[:, None] * stride_dh + ds[None, :], dh,
                          mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
        if COMPUTE_DW:
            h = _load_tile(h_ptr, rows, row_ok, stride_h, ds, d_ok, UPCAST)
            dw = tl.dot(tl.trans(g), h, input_precision="ieee")
            tl.atomic_add(dw_ptr + cols.to(tl.int64)[:, None] * stride_dw + ds[None, :], dw,
                          mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")
