"""Chunked pure-PyTorch engine: any device, never allocates [N, V].

Rows are processed in chunks and the vocabulary in tiles, so the largest temporary is
one [rows, vocab_tile] logits tile (``TILE_ELEMENTS`` elements). The logsumexp is
accumulated online over vocabulary tiles, exactly as the Triton kernels do, and the
backward recomputes each tile instead of storing it. Low-precision inputs (bf16, fp16)
are upcast one tile at a time, so every product accumulates and is kept in fp32. All
loops are sequential, so results (dW included) are deterministic.

An engine provides ``head_forward`` and ``head_backward`` (the autograd wrappers in
``_autograd`` build the differentiable ops from them) and ``contrastive_evidence``.
"""

from __future__ import annotations

import torch

from . import _math
from ._types import Evidence

TILE_ELEMENTS = 1 << 22
"""Largest logits tile, in elements (16 MiB in fp32). Lower it to trade speed for memory."""

MAX_VOCAB_TILE = 1 << 12
"""Largest vocabulary tile: small enough that one upcast weight tile ([tile, H] fp32) stays
in cache while every row chunk passes over it; rows per chunk fill TILE_ELEMENTS."""


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs (reference checks), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiles(num_rows: int, vocab: int) -> tuple[int, int]:
    """(rows per chunk, vocab per tile) with rows * vocab_tile <= TILE_ELEMENTS."""
    vocab_tile = max(1, min(vocab, MAX_VOCAB_TILE, TILE_ELEMENTS))
    rows = max(1, min(num_rows, TILE_ELEMENTS // vocab_tile))
    return rows, vocab_tile


def _tempered(z: torch.Tensor, inv_temp: float) -> torch.Tensor:
    return z if inv_temp == 1.0 else z.mul_(inv_temp)


def head_forward(hiddens, weight, y, valid, temperature, with_entropy):
    """Log-probs of y under each hidden block [N, H]: (lp [K, N], lse [K, N], entropy [K, N] | None).

    y [N] holds valid token ids (ignored positions replaced by 0); valid [N] bool.
    Vocabulary tiles are the outer loop: each weight tile is read (and upcast) once and
    used for every row chunk of every block; the online logsumexp state is kept per row.
    """
    acc = acc_dtype(weight.dtype)
    k, n, vocab = len(hiddens), y.shape[0], weight.shape[0]
    inv_temp = 1.0 / temperature
    rows, vocab_tile = _tiles(n, vocab)
    dev = weight.device
    hs = [h.to(acc) for h in hiddens]  # [N, H] each (no copy in fp32)
    m = torch.full((k, n), float("-inf"), dtype=acc, device=dev)
    s = torch.zeros(k, n, dtype=acc, device=dev)
    t = torch.zeros(k, n, dtype=acc, device=dev) if with_entropy else None
    z_target = torch.zeros(k, n, dtype=acc, device=dev)
    for v0 in range(0, vocab, vocab_tile):
        v1 = min(v0 + vocab_tile, vocab)
        w_t = weight[v0:v1].to(acc).T  # [H, tile], upcast once per tile
        in_tile = (y >= v0) & (y < v1)
        local = (y - v0).clamp(0, v1 - v0 - 1)
        for i, h in enumerate(hs):
            for r0 in range(0, n, rows):
                r1 = min(r0 + rows, n)
                z = _tempered(h[r0:r1] @ w_t, inv_temp)
                picked = z.gather(1, local[r0:r1, None])[:, 0]
                z_target[i, r0:r1] = torch.where(in_tile[r0:r1], picked, z_target[i, r0:r1])
                m_old = m[i, r0:r1]
                m_new = torch.maximum(m_old, z.amax(dim=1))
                scale = torch.exp(m_old - m_new)
                # in place: a fresh [rows, tile] buffer per step costs page faults on CPU
                zc = z.sub_(m_new[:, None])  # z - m_new
                if with_entropy:  # sum_j e_j z_j = sum_j e_j (z_j - m_new) + m_new sum_j e_j
                    e = torch.exp(zc)
                    e_sum = e.sum(dim=1)
                    t[i, r0:r1] = (t[i, r0:r1] * scale + torch.linalg.vecdot(e, zc)
                                   + m_new * e_sum)
                    del e
                else:
                    e_sum = zc.exp_().sum(dim=1)
                s[i, r0:r1] = s[i, r0:r1] * scale + e_sum
                m[i, r0:r1] = m_new
                del z, zc
    lse = m + torch.log(s)
    lp = torch.where(valid, z_target - lse, torch.zeros_like(lse))
    ent = lse - t / s if with_entropy else None
    return lp, lse, ent


def head_backward(hidden, weight, y, lse, a, b, c, temperature, need_h, need_w):
    """(dh, dW) in the input dtypes (None where not needed) for d loss / d z_j =
    a onehot_j + p_j (b - c (z_j - lse)), z the tempered logits, per-row a, b, c [N]
    (c may be None). Tile by tile: dh += dz W, dW += dz^T h, never storing [N, V];
    vocabulary tiles outer (each weight tile upcast once, its dW finished in place).
    """
    acc = lse.dtype
    n, vocab = hidden.shape[0], weight.shape[0]
    rows, vocab_tile = _tiles(n, vocab)
    inv_temp = 1.0 / temperature
    h_acc = hidden.to(acc)  # [N, H]
    dweight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    for v0 in range(0, vocab, vocab_tile):
        v1 = min(v0 + vocab_tile, vocab)
        w = weight[v0:v1].to(acc)  # [tile, H]
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            h = h_acc[r0:r1]
            zc = _tempered(h @ w.T, inv_temp).sub_(lse[r0:r1, None])
            if c is not None:  # p (b - c zc), with one [rows, tile] buffer besides zc
                g = zc.mul(-c[r0:r1, None]).add_(b[r0:r1, None]).mul_(zc.exp_())
            else:  # p b, in place
                g = zc.exp_().mul_(b[r0:r1, None])
            del zc
            yc = y[r0:r1]
            in_tile = (yc >= v0) & (yc < v1)
            rows_in = torch.nonzero(in_tile)[:, 0]
            g[rows_in, yc[rows_in] - v0] += a[r0:r1][rows_in]
            if inv_temp != 1.0:
                g.mul_(inv_temp)
            if need_h:
                dh[r0:r1].addmm_(g, w)
            if need_w:
                dweight[v0:v1].addmm_(g.T, h)
            del g
    return (dh.to(hidden.dtype) if need_h else None,
            dweight.to(weight.dtype) if need_w else None)


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
