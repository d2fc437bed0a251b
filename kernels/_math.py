"""Per-token math shared by the fast paths (chunked PyTorch and Triton launchers).

These act on [N] vectors only (never on vocabulary-sized data), so plain PyTorch is
the right tool: they cost O(N) next to the O(N V H) head products.
"""

from __future__ import annotations

import math

import torch

from ._types import PPOStats


def evidence_epilogue(lp_policy, lp_pos, lp_neg, advantages, has_negative, valid, *, lam, eps_w):
    """docs/algorithm.md steps 3-5: (delta, token_advantages, clipped), each [N].

    delta = lp_pos - lp_neg where has_negative else lp_pos - lp_policy (RLSD fallback);
    w = clip(exp(sign(A) delta), 1 - eps_w, 1 + eps_w); A_t = A ((1 - lam) + lam w).
    Tokens with valid == False get delta = 0, A_t = 0, clipped = False.
    """
    adv = advantages.to(lp_pos.dtype)
    delta = torch.where(has_negative, lp_pos - lp_neg, lp_pos - lp_policy)
    raw = torch.exp(torch.sign(adv) * delta)
    weight = raw.clamp(1.0 - eps_w, 1.0 + eps_w)
    token_adv = adv * ((1.0 - lam) + lam * weight)
    clipped = (raw < 1.0 - eps_w) | (raw > 1.0 + eps_w)
    zero = torch.zeros_like(delta)
    return torch.where(valid, delta, zero), torch.where(valid, token_adv, zero), clipped & valid


def ppo_denominator(keep, normalizer, dtype, device):
    """The loss normaliser as a 0-dim tensor (no host sync): the kept-token count
    (at least 1) unless a normalizer is given."""
    if normalizer is None:
        return keep.to(dtype).sum().clamp(min=1.0)
    return torch.full((), float(normalizer), dtype=dtype, device=device)  # a fill: no copy


def ppo_grad_coef(lp, old_logprobs, token_advantages, keep, denom, *, clip_low, clip_high,
                  ref_logprobs=None, kl_coef=0.0, clip_dual=None, token_weights=None):
    """d loss / d lp [N] of the token-mean PPO clipped surrogate, for any subset of rows.

    lp, old_logprobs (None: on-policy, old = lp), token_advantages, keep [N]; denom 0-dim.
    The gradient through min(r A, clip(r) A) is r A where the unclipped branch is active
    (A >= 0: r <= 1 + clip_high; A < 0: r >= 1 - clip_low, and r <= clip_dual when the
    dual clip is on: beyond it the loss is the constant -A c) and 0 elsewhere; the k3 KL
    adds kl_coef (1 - exp(ref - lp)). token_weights [N] (or None) multiply each row's
    coefficient. Zero for rows that are masked, clipped or A = 0.
    """
    acc = lp.dtype
    old = lp.detach() if old_logprobs is None else old_logprobs.to(acc)
    adv = token_advantages.to(acc)
    ratio = torch.exp(lp - old)
    negative_active = ratio >= 1.0 - clip_low
    if clip_dual is not None:
        negative_active = negative_active & (ratio <= clip_dual)
    active = torch.where(adv >= 0, ratio <= 1.0 + clip_high, negative_active)
    dper = -torch.where(active, ratio * adv, torch.zeros_like(ratio))
    if ref_logprobs is not None and kl_coef:
        dper = dper + kl_coef * (1.0 - torch.exp(ref_logprobs.to(acc) - lp))
    if token_weights is not None:
        dper = dper * token_weights.to(acc)
    return torch.where(keep, dper / denom, torch.zeros_like(dper))


def ppo_per_token_loss(ratio, adv, *, clip_low, clip_high, clip_dual=None):
    """The PPO surrogate per token, -min(r A, clip(r) A), with verl / EasyR1's dual clip
    for A < 0 when clip_dual = c is given: min(max(-A r, -A clip(r)), -A c)."""
    surr1 = ratio * adv
    surr2 = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(surr1, surr2)
    if clip_dual is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * clip_dual), per_token)
    return per_token


def ppo_token_terms(lp, old_logprobs, token_advantages, keep, *, clip_low, clip_high,
                    normalizer, ref_logprobs=None, kl_coef=0.0, entropy=None, clip_dual=None,
                    token_weights=None):
    """Loss, d loss / d lp and stats of the token-mean PPO clipped surrogate.

    lp, old_logprobs, token_advantages: [N]; keep: [N] bool (mask and valid target).
    old_logprobs None means on-policy: old = lp (r = 1, gradient A where kept).
    loss = sum_t keep_t w_t l_t / normalizer (w = token_weights, 1 when None); the stats
    are unweighted means over the kept tokens.
    Returns (loss 0-dim, dlp [N], PPOStats); dlp as in :func:`ppo_grad_coef`.
    """
    acc = lp.dtype
    if old_logprobs is None:
        old_logprobs = lp.detach()
    m = keep.to(acc)
    adv = token_advantages.to(acc)
    ratio = torch.exp(lp - old_logprobs.to(acc))
    per_token = ppo_per_token_loss(ratio, adv, clip_low=clip_low, clip_high=clip_high,
                                   clip_dual=clip_dual)
    if ref_logprobs is not None and kl_coef:
        ref_ratio = torch.exp(ref_logprobs.to(acc) - lp)
        per_token = per_token + kl_coef * (ref_ratio - (ref_logprobs.to(acc) - lp) - 1.0)
    if token_weights is not None:
        per_token = per_token * token_weights.to(acc)
    count = m.sum()
    denom = ppo_denominator(keep, normalizer, acc, lp.device)
    loss = torch.where(keep, per_token, torch.zeros_like(per_token)).sum() / denom
    dlp = ppo_grad_coef(lp, old_logprobs, token_advantages, keep, denom, clip_low=clip_low,
                        clip_high=clip_high, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
                        clip_dual=clip_dual, token_weights=token_weights)
    n = count.clamp(min=1.0)
    stats = PPOStats(
        clip_frac_low=(((adv < 0) & (ratio < 1.0 - clip_low)).to(acc) * m).sum() / n,
        clip_frac_high=(((adv > 0) & (ratio > 1.0 + clip_high)).to(acc) * m).sum() / n,
        approx_kl=(((ratio - 1.0) - (lp - old_logprobs.to(acc))) * m).sum() / n,
        ratio_mean=(ratio * m).sum() / n,
        entropy=(entropy * m).sum() / n if entropy is not None else None,
        num_tokens=count,
        clip_frac_dual=(dual_clip_binds(ratio, adv, clip_low, clip_high, clip_dual).to(acc)
                        * m).sum() / n if clip_dual is not None else torch.zeros_like(n),
    )
    return loss, dlp, stats


def dual_clip_binds(ratio, adv, clip_low, clip_high, clip_dual):
    """[N] bool: A < 0 and max(-A r, -A clip(r)) > -A c (verl / EasyR1 pg_clipfrac_lower)."""
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    return (adv < 0) & (clipped > -adv * clip_dual)


# ------------------------------------------------------------------ self-distillation

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def distill_kind(divergence: str, beta: float) -> str:
    """The divergence actually computed: 'jsd' at beta = 0 is forward KL and at beta = 1
    reverse KL (the endpoints OPSD, SDPO, TRL and Liger define), else itself."""
    if divergence == "jsd" and beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def distill_rows(ls_s, ls_t, kind, beta, with_grad):
    """Per-row divergence D [r] and (optionally) dD/du [r, V] for one chunk.

    ls_s, ls_t: student and teacher log-softmax [r, V] (fp32 / fp64; u the student's
    tempered logits), q = exp(ls_s), p = exp(ls_t), kind from :func:`distill_kind`:
      forward_kl  D = sum p (log p - log q)               dD/du = q - p
      reverse_kl  D = sum q (log q - log p)               dD/du = q (log q - log p - D)
      jsd         m = beta p + (1 - beta) q,
                  D = beta KL(p || m) + (1 - beta) KL(q || m),
                  dD/du = (1 - beta) q (log q - log m - KL(q || m))
    (the JSD gradient through m cancels: d D / d q_j = (1 - beta) log(q_j / m_j)).
    ls_s and ls_t are consumed (may be overwritten). Returns (D, grad or None).
    """
    q = ls_s.exp()
    if kind == "forward_kl":
        p = ls_t.exp()
        d = torch.linalg.vecdot(p, ls_t - ls_s)
        return d, (q.sub_(p) if with_grad else None)
    if kind == "reverse_kl":
        diff = ls_s.sub_(ls_t)  # log q - log p, in place
        d = torch.linalg.vecdot(q, diff)
        return d, (q.mul_(diff.sub_(d[:, None])) if with_grad else None)
    log_m = torch.logaddexp(ls_s + math.log1p(-beta), ls_t + math.log(beta))
    p = ls_t.exp()
    kl_p = torch.linalg.vecdot(p, ls_t.sub_(log_m))
    del p
    s_minus_m = ls_s.sub_(log_m)
    del log_m
    kl_q = torch.linalg.vecdot(q, s_minus_m)
    d = beta * kl_p + (1.0 - beta) * kl_q
    if not with_grad:
        return d, None
    return d, q.mul_(s_minus_m.sub_(kl_q[:, None])).mul_(1.0 - beta)
