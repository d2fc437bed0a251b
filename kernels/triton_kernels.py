"""Triton kernels: the K-context LM-head forward, and the row kernels of the three-product loss.

Forward (``stacked_fwd_kernel``): the K contexts are stacked along M ([K, N, H], one
row block belongs to one context), so each weight tile feeds a BLOCK_M-row MMA for
every context. The grid is one axis of (row block, vocabulary split) programs in
GROUPED order: GROUP_M row blocks take every split in turn, so the programs resident at
one time share the weight tiles of a split (L2) and the hidden rows of a group. A
program walks its vocabulary split tile by tile, multiplies against its rows with fp32
accumulation, and folds the logits into online logsumexp statistics (running max m,
sum s, entropy numerator t, target logit). With one split and no epilogue it finalises
directly; otherwise it writes its partial statistics, and the last program of a token
block (an atomic ticket over the K contexts and all splits) combines them, writes
log-probs, logsumexp, entropy and, for the contrastive op (K = 3), delta, the token
advantages and the clip flags: still one launch. The split count is a runtime argument
(no recompile when N changes).

Three-product loss (``row_stats_kernel``, ``dz_kernel``): the logits chunk comes from a
library GEMM (cuBLAS); ``row_stats_kernel`` reduces each row to log-prob, logsumexp and
entropy, and ``dz_kernel`` forms dz = a onehot + p (b - c log p), times an optional
scale (fp16), in the compute dtype, in place where that is fp32. dh = dz W and
dW += dz^T h are then library GEMMs too: no atomics.

Self-distillation (``distill_row_kernel``, ``distill_dz_kernel``): the same pattern on the
student's and the teacher's logits chunks: per row the divergence (and KL(q || m) for the
JSD), then dz elementwise.

UPCAST (a constexpr) casts tiles to fp32 before tl.dot: Triton's CPU interpreter
computes bf16 / fp16 dots wrongly, so the tests run the interpreter that way.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _online_update(z, cols, col_ok, y, m, s, t, z_target, WITH_ENTROPY: tl.constexpr):
    """Fold one [BLOCK_M, BLOCK_V] tile of tempered logits into the running statistics."""
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
def _store_partials(part_ptr, split, k, toks, tok_ok, N_PAD, m, s, t, z_target,
                    K: tl.constexpr):
    """part[split, k, j, token] for j in (max, sum, entropy numerator, target logit)."""
    base = part_ptr + ((split * K + k) * 4) * N_PAD + toks
    tl.store(base, m, mask=tok_ok)
    tl.store(base + N_PAD, s, mask=tok_ok)
    tl.store(base + 2 * N_PAD, t, mask=tok_ok)
    tl.store(base + 3 * N_PAD, z_target, mask=tok_ok)


@triton.jit
def _combine_partials(part_ptr, k, toks, tok_ok, N_PAD, num_splits, K: tl.constexpr,
                      BLOCK_M: tl.constexpr):
    """Online combination of the num_splits partial statistics of context k."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    z_target = tl.zeros([BLOCK_M], tl.float32)
    for split in range(num_splits):
        base = part_ptr + ((split * K + k) * 4) * N_PAD + toks
        m_p = tl.load(base, mask=tok_ok, other=0.0, cache_modifier=".cg")
        s_p = tl.load(base + N_PAD, mask=tok_ok, other=1.0, cache_modifier=".cg")
        t_p = tl.load(base + 2 * N_PAD, mask=tok_ok, other=0.0, cache_modifier=".cg")
        zt_p = tl.load(base + 3 * N_PAD, mask=tok_ok, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, m_p)
        a = tl.exp(m - m_new)
        b = tl.exp(m_p - m_new)
        s = s * a + s_p * b
        t = t * a + t_p * b
        z_target += zt_p
        m = m_new
    return m, s, t, z_target


@triton.jit
def _finalize_context(k, m, s, t, z_target, valid, toks, tok_ok, N, lp_ptr, lse_ptr, ent_ptr,
                      WITH_ENTROPY: tl.constexpr):
    """Write lp, lse (and entropy) of context k; return lp for the epilogue."""
    lse = m + tl.log(s)
    lp = tl.where(valid, z_target - lse, 0.0)
    tl.store(lp_ptr + k * N + toks, lp, mask=tok_ok)
    tl.store(lse_ptr + k * N + toks, lse, mask=tok_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + k * N + toks, lse - t / s, mask=tok_ok)
    return lp


@triton.jit
def _evidence_epilogue(lp_pol, lp_pos, lp_neg, valid, toks, tok_ok, adv_ptr, has_neg_ptr,
                       delta_ptr, tok_adv_ptr, clipped_ptr, lam, eps_w):
    """docs/algorithm.md steps 3-5 on the three log-probs of BLOCK_M tokens."""
    adv = tl.load(adv_ptr + toks, mask=tok_ok, other=0.0).to(tl.float32)
    has_neg = tl.load(has_neg_ptr + toks, mask=tok_ok, other=0) != 0
    delta = tl.where(has_neg, lp_pos - lp_neg, lp_pos - lp_pol)
    sign = tl.where(adv > 0, 1.0, tl.where(adv < 0, -1.0, 0.0))
    raw = tl.exp(sign * delta)
    w = tl.minimum(tl.maximum(raw, 1.0 - eps_w), 1.0 + eps_w)
    tok_adv = adv * ((1.0 - lam) + lam * w)
    clipped = ((raw < 1.0 - eps_w) | (raw > 1.0 + eps_w)) & valid
    tl.store(delta_ptr + toks, tl.where(valid, delta, 0.0), mask=tok_ok)
    tl.store(tok_adv_ptr + toks, tl.where(valid, tok_adv, 0.0), mask=tok_ok)
    tl.store(clipped_ptr + toks, clipped.to(tl.int8), mask=tok_ok)


@triton.jit
def _combine_and_finalize(kk, part_ptr, toks, tok_ok, valid, N, N_PAD, num_splits, lp_ptr,
                          lse_ptr, ent_ptr, K: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                          BLOCK_M: tl.constexpr):
    m, s, t, zt = _combine_partials(part_ptr, kk, toks, tok_ok, N_PAD, num_splits, K, BLOCK_M)
    return _finalize_context(kk, m, s, t, zt, valid, toks, tok_ok, N, lp_ptr, lse_ptr, ent_ptr,
                             WITH_ENTROPY)


# N, the split count and the split width change from call to call (every RL step):
# never specialise on them, so a new N reuses the compiled kernel.
@triton.jit(do_not_specialize=["N", "num_splits", "vocab_per_split"])
def stacked_fwd_kernel(
    h_ptr, stride_hk, stride_h, w_ptr, stride_w, h_desc, w_desc, y_ptr,
    part_ptr, ticket_ptr,
    lp_ptr, lse_ptr, ent_ptr,
    adv_ptr, has_neg_ptr, delta_ptr, tok_adv_ptr, clipped_ptr, z_ptr, stride_z,
    off_ptr, stride_off,
    N, V, D, inv_temp, lam, eps_w, num_splits, vocab_per_split,
    K: tl.constexpr, WITH_ENTROPY: tl.constexpr, EPILOGUE: tl.constexpr, DIRECT: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr, USE_TMA: tl.constexpr = False, STORE_Z: tl.constexpr = False,
    Z_OFFSET: tl.constexpr = False, OFF_BLOCK: tl.constexpr = 1,
):
    """Log-probs of targets y [N] under K <= 4 contexts h [K, N, H] sharing one LM head.

    Token blocks of BLOCK_M rows per context (N_PAD: N rounded up to a multiple of BLOCK_M);
    grid: K * (N_PAD / BLOCK_M) * num_splits programs, in grouped order. DIRECT (one split,
    no epilogue: finalise without partials) is the only specialisation on the split count.
    USE_TMA: the tiles come through tensor descriptors (TMA on Hopper and later) instead of
    pointer loads: h_desc over h viewed [K * N, H] with blocks [BLOCK_M, BLOCK_D], w_desc
    over W [V, H] with blocks [BLOCK_V, BLOCK_D]; out-of-bounds elements read as zero. A
    block's rows past N read the next context's rows: they are masked like padding rows
    (never stored), and each output row of the dot depends on its own input row only.
    STORE_Z (K = 1): also write each logits tile, untempered, into z [N, V] (fp32: the
    gradient chunk of the PPO loss and of the log-prob backward, ``LOGITS_GEMM='triton'``).
    Z_OFFSET (with STORE_Z, a 16-bit z: ``LOGITS_GEMM='triton-fp16'``): write z minus the
    tile's row maximum (<= 0), and that maximum (fp32) into off [N, cdiv(V, OFF_BLOCK)] at
    every OFF_BLOCK-wide slot the tile covers (OFF_BLOCK divides BLOCK_V); z = stored + off
    then carries fp16's 2^-11 relative error on |z - tile max|, which is small exactly for
    the logits that carry probability (|z - row max| < ~20), at any |z|.
    """
    pid = tl.program_id(0)
    N_PAD = tl.cdiv(N, BLOCK_M) * BLOCK_M
    blocks_per_ctx = N_PAD // BLOCK_M
    num_row_blocks = K * blocks_per_ctx
    per_group = GROUP_M * num_splits
    group = pid // per_group
    first = group * GROUP_M
    group_size = tl.minimum(num_row_blocks - first, GROUP_M)
    pid_m = first + (pid % per_group) % group_size
    split = (pid % per_group) // group_size

    k = pid_m // blocks_per_ctx
    token_block = pid_m % blocks_per_ctx
    toks = token_block * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_ok = toks < N
    y = tl.load(y_ptr + toks, mask=tok_ok, other=-100)
    valid = y != -100
    h_base = h_ptr + k.to(tl.int64) * stride_hk + toks.to(tl.int64)[:, None] * stride_h

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    zt = tl.zeros([BLOCK_M], tl.float32)
    v_lo = split * vocab_per_split
    v_hi = tl.minimum(v_lo + vocab_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            if USE_TMA:
                x = h_desc.load([k * N + token_block * BLOCK_M, d0])
                wt = tl.trans(w_desc.load([v0, d0]))
            else:
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < D
                x = tl.load(h_base + ds[None, :], mask=tok_ok[:, None] & d_ok[None, :], other=0.0)
                # int64 offsets: V x H exceeds 2^31 elements for the largest heads
                wt = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_w + ds[:, None],
                             mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(x, wt, acc, input_precision="ieee")
        if STORE_Z:
            z_val = acc
            if Z_OFFSET:
                tile_max = tl.max(tl.where(col_ok[None, :], acc, float("-inf")), axis=1)
                # >= -60000: finite in fp16 (p = 0 there either way; -inf would make p log p NaN)
                z_val = tl.maximum(acc - tile_max[:, None], -60000.0)
                off_row = off_ptr + toks.to(tl.int64) * stride_off + v0 // OFF_BLOCK
                for j in tl.static_range(BLOCK_V // OFF_BLOCK):
                    tl.store(off_row + j, tile_max, mask=tok_ok & (v0 + j * OFF_BLOCK < v_hi))
            tl.store(z_ptr + toks.to(tl.int64)[:, None] * stride_z + cols[None, :],
                     z_val.to(z_ptr.dtype.element_ty), mask=tok_ok[:, None] & col_ok[None, :])
        m, s, t, zt = _online_update(acc * inv_temp, cols, col_ok, y, m, s, t, zt, WITH_ENTROPY)

    if DIRECT:
        _finalize_context(k, m, s, t, zt, valid, toks, tok_ok, N, lp_ptr, lse_ptr, ent_ptr,
                          WITH_ENTROPY)
    else:
        _store_partials(part_ptr, split, k, toks, tok_ok, N_PAD, m, s, t, zt, K)
        # make this program's partials visible before taking a ticket (release), and see
        # every other program's partials after the last ticket (acquire)
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + token_block, 1, sem="acq_rel")
        if ticket == K * num_splits - 1:
            lp0 = _combine_and_finalize(0, part_ptr, toks, tok_ok, valid, N, N_PAD, num_splits,
                                        lp_ptr, lse_ptr, ent_ptr, K, WITH_ENTROPY, BLOCK_M)
            lp1 = lp0
            lp2 = lp0
            if K > 1:
                lp1 = _combine_and_finalize(1, part_ptr, toks, tok_ok, valid, N, N_PAD,
                                            num_splits, lp_ptr, lse_ptr, ent_ptr, K,
                                            WITH_ENTROPY, BLOCK_M)
            if K > 2:
                lp2 = _combine_and_finalize(2, part_ptr, toks, tok_ok, valid, N, N_PAD,
                                            num_splits, lp_ptr, lse_ptr, ent_ptr, K,
                                            WITH_ENTROPY, BLOCK_M)
            if K > 3:
                _combine_and_finalize(3, part_ptr, toks, tok_ok, valid, N, N_PAD, num_splits,
                                      lp_ptr, lse_ptr, ent_ptr, K, WITH_ENTROPY, BLOCK_M)
            if EPILOGUE:
                _evidence_epilogue(lp0, lp1, lp2, valid, toks, tok_ok, adv_ptr, has_neg_ptr,
                                   delta_ptr, tok_adv_ptr, clipped_ptr, lam, eps_w)


@triton.jit(do_not_specialize=["R"])
def row_stats_kernel(z_ptr, stride_z, y_ptr, lp_ptr, lse_ptr, ent_ptr, R, V, inv_temp,
                     WITH_ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row of an fp32 logits chunk z [R, V]: lp (0 where y = -100), lse, entropy."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    y = tl.load(y_ptr + rows, mask=row_ok, other=-100)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    t = tl.zeros([BLOCK_R], tl.float32)
    zt = tl.zeros([BLOCK_R], tl.float32)
    base = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = tl.load(base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        m, s, t, zt = _online_update(z.to(tl.float32) * inv_temp, cols, col_ok, y, m, s, t, zt,
                                     WITH_ENTROPY)
    lse = m + tl.log(s)
    tl.store(lp_ptr + rows, tl.where(y != -100, zt - lse, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, lse - t / s, mask=row_ok)


@triton.jit
def _load_logits(z_ptr, stride_z, rows, cols, ok, off_ptr, stride_off, HAS_OFFSET: tl.constexpr,
                 OFF_BLOCK: tl.constexpr):
    """A [rows, cols] tile of a logits chunk in fp32: z itself, or (HAS_OFFSET) the fp16
    z - off plus its fp32 offset, one per row and OFF_BLOCK columns (``stacked_fwd_kernel``'s
    Z_OFFSET)."""
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=ok,
                other=0.0).to(tl.float32)
    if HAS_OFFSET:
        z += tl.load(off_ptr + rows.to(tl.int64)[:, None] * stride_off + (cols // OFF_BLOCK)[None, :],
                     mask=ok, other=0.0)
    return z


@triton.jit(do_not_specialize=["R"])
def dz_kernel(z_ptr, stride_z, dz_ptr, stride_dz, y_ptr, lse_ptr, a_ptr, b_ptr, c_ptr, scale_ptr,
              R, V, inv_temp, HAS_C: tl.constexpr, HAS_SCALE: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
              off_ptr=None, stride_off=0, HAS_OFFSET: tl.constexpr = False,
              OFF_BLOCK: tl.constexpr = 1):
    """dz = (a onehot + p (b - c log p)) * scale, p = exp(z / T - lse), stored in dz's dtype.

    a, b, c [R] already carry the 1/T of the chain rule; dz may alias z (in place: each
    element is read before it is written, by the same program). HAS_OFFSET: z holds
    z - off (fp16) and off [R, cdiv(V, OFF_BLOCK)] the offsets (``stacked_fwd_kernel``'s
    Z_OFFSET).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < R
    col_ok = cols < V
    ok = row_ok[:, None] & col_ok[None, :]
    z = _load_logits(z_ptr, stride_z, rows, cols, ok, off_ptr, stride_off, HAS_OFFSET, OFF_BLOCK)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    b = tl.load(b_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    log_p = z * inv_temp - lse[:, None]
    p = tl.exp(log_p)
    if HAS_C:
        c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
        g = p * (b[:, None] - c[:, None] * log_p)
    else:
        g = p * b[:, None]
    g += tl.where(cols[None, :] == y[:, None], a[:, None], 0.0)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr)
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :],
             g.to(dz_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- self-distillation
# KIND: 0 forward KL(p || q), 1 reverse KL(q || p), 2 generalised JSD with the mixture
# m = beta p + (1 - beta) q (q the student, p the teacher; see _math.distill_rows).

@triton.jit
def _distill_logs(zs, zt, lse_s, lse_t, inv_temp, log_beta, log_1mbeta, KIND: tl.constexpr):
    """log q, log p (and log m for the JSD, else log q) of one [BLOCK_R, BLOCK_V] tile."""
    lq = zs.to(tl.float32) * inv_temp - lse_s[:, None]
    lp = zt.to(tl.float32) * inv_temp - lse_t[:, None]
    lm = lq
    if KIND == 2:
        a = lq + log_1mbeta
        b = lp + log_beta
        mx = tl.maximum(a, b)
        lm = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
    return lq, lp, lm


@triton.jit(do_not_specialize=["R"])
def distill_row_kernel(zs_ptr, stride_s, zt_ptr, stride_t, lse_s_ptr, lse_t_ptr, d_ptr, k_ptr,
                       R, V, inv_temp, beta, log_beta, log_1mbeta, KIND: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                       off_s_ptr=None, stride_off_s=0, off_t_ptr=None, stride_off_t=0,
                       HAS_OFFSET: tl.constexpr = False, OFF_BLOCK: tl.constexpr = 1):
    """Per row of the student / teacher logits chunks (fp32 [R, V], or HAS_OFFSET: fp16
    with tile offsets, as ``dz_kernel``): the divergence D and, for the JSD, K = KL(q || m)
    (the gradient needs it); K = D for the two KLs."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
    acc_p = tl.zeros([BLOCK_R], tl.float32)
    acc_q = tl.zeros([BLOCK_R], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < V)[None, :]
        zs = _load_logits(zs_ptr, stride_s, rows, cols, ok, off_s_ptr, stride_off_s, HAS_OFFSET,
                          OFF_BLOCK)
        zt = _load_logits(zt_ptr, stride_t, rows, cols, ok, off_t_ptr, stride_off_t, HAS_OFFSET,
                          OFF_BLOCK)
        lq, lp, lm = _distill_logs(zs, zt, lse_s, lse_t, inv_temp, log_beta, log_1mbeta, KIND)
        if KIND == 0:
            acc_p += tl.sum(tl.where(ok, tl.exp(lp) * (lp - lq), 0.0), axis=1)
        elif KIND == 1:
            acc_q += tl.sum(tl.where(ok, tl.exp(lq) * (lq - lp), 0.0), axis=1)
        else:
            acc_p += tl.sum(tl.where(ok, tl.exp(lp) * (lp - lm), 0.0), axis=1)
            acc_q += tl.sum(tl.where(ok, tl.exp(lq) * (lq - lm), 0.0), axis=1)
    if KIND == 0:
        d = acc_p
        k = acc_p
    elif KIND == 1:
        d = acc_q
        k = acc_q
    else:
        d = beta * acc_p + (1.0 - beta) * acc_q
        k = acc_q
    tl.store(d_ptr + rows, d, mask=row_ok)
    tl.store(k_ptr + rows, k, mask=row_ok)


@triton.jit(do_not_specialize=["R"])
def distill_dz_kernel(zs_ptr, stride_s, zt_ptr, stride_t, dz_ptr, stride_dz, lse_s_ptr, lse_t_ptr,
                      d_ptr, k_ptr, coef_ptr, R, V, inv_temp, beta, log_beta, log_1mbeta,
                      KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                      off_s_ptr=None, stride_off_s=0, off_t_ptr=None, stride_off_t=0,
                      HAS_OFFSET: tl.constexpr = False, OFF_BLOCK: tl.constexpr = 1):
    """dz = coef dD/du, stored in dz's dtype. dz may alias the student chunk (in place: each
    element read, then written, by one program): an fp32 chunk for fp32 dz, the fp16 chunk
    (HAS_OFFSET, as ``dz_kernel``) for bf16 dz.

    forward KL: q - p; reverse KL: q (log q - log p - D); JSD: (1 - beta) q (log q - log m - K).
    coef [R] already carries 1/T and the row's weight / normalizer (0 for dropped rows).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols < V)[None, :]
    zs = _load_logits(zs_ptr, stride_s, rows, cols, ok, off_s_ptr, stride_off_s, HAS_OFFSET,
                      OFF_BLOCK)
    zt = _load_logits(zt_ptr, stride_t, rows, cols, ok, off_t_ptr, stride_off_t, HAS_OFFSET,
                      OFF_BLOCK)
    lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    lq, lp, lm = _distill_logs(zs, zt, lse_s, lse_t, inv_temp, log_beta, log_1mbeta, KIND)
    q = tl.exp(lq)
    if KIND == 0:
        g = q - tl.exp(lp)
    elif KIND == 1:
        d = tl.load(d_ptr + rows, mask=row_ok, other=0.0)
        g = q * (lq - lp - d[:, None])
    else:
        k = tl.load(k_ptr + rows, mask=row_ok, other=0.0)
        g = (1.0 - beta) * q * (lq - lm - k[:, None])
    g = g * coef[:, None]
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :],
             g.to(dz_ptr.dtype.element_ty), mask=ok)
