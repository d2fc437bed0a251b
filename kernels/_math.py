"""Per-token math shared by the fast paths (chunked PyTorch and Triton launchers).

These act on [N] vectors only (never on vocabulary-sized data), so plain PyTorch is
the right tool: they cost O(N) next to the O(N V H) head products.
"""

from __future__ import annotations

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
                  ref_logprobs=None, kl_coef=0.0):
    """d loss / d lp [N] of the token-mean PPO clipped surrogate, for any subset of rows.

    lp, old_logprobs (None: on-policy, old = lp), token_advantages, keep [N]; denom 0-dim.
    The gradient through min(r A, clip(r) A) is r A where the unclipped branch is active
    (A >= 0: r <= 1 + clip_high; A < 0: r >= 1 - clip_low) and 0 elsewhere; the k3 KL
    adds kl_coef (1 - exp(ref - lp)). Zero for rows that are masked, clipped or A = 0.
    """
    acc = lp.dtype
    old = lp.detach() if old_logprobs is None else old_logprobs.to(acc)
    adv = token_advantages.to(acc)
    ratio = torch.exp(lp - old)
    active = torch.where(adv >= 0, ratio <= 1.0 + clip_high, ratio >= 1.0 - clip_low)
    dper = -torch.where(active, ratio * adv, torch.zeros_like(ratio))
    if ref_logprobs is not None and kl_coef:
        dper = dper + kl_coef * (1.0 - torch.exp(ref_logprobs.to(acc) - lp))
    return torch.where(keep, dper / denom, torch.zeros_like(dper))


def ppo_token_terms(lp, old_logprobs, token_advantages, keep, *, clip_low, clip_high,
                    normalizer, ref_logprobs=None, kl_coef=0.0, entropy=None):
    """Loss, d loss / d lp and stats of the token-mean PPO clipped surrogate.

    lp, old_logprobs, token_advantages: [N]; keep: [N] bool (mask and valid target).
    old_logprobs None means on-policy: old = lp (r = 1, gradient A where kept).
    Returns (loss 0-dim, dlp [N], PPOStats); dlp as in :func:`ppo_grad_coef`.
    """
    acc = lp.dtype
    if old_logprobs is None:
        old_logprobs = lp.detach()
    m = keep.to(acc)
    adv = token_advantages.to(acc)
    ratio = torch.exp(lp - old_logprobs.to(acc))
    surr1 = ratio * adv
    surr2 = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(surr1, surr2)
    if ref_logprobs is not None and kl_coef:
        ref_ratio = torch.exp(ref_logprobs.to(acc) - lp)
        per_token = per_token + kl_coef * (ref_ratio - (ref_logprobs.to(acc) - lp) - 1.0)
    count = m.sum()
    denom = ppo_denominator(keep, normalizer, acc, lp.device)
    loss = (per_token * m).sum() / denom
    dlp = ppo_grad_coef(lp, old_logprobs, token_advantages, keep, denom, clip_low=clip_low,
                        clip_high=clip_high, ref_logprobs=ref_logprobs, kl_coef=kl_coef)
    n = count.clamp(min=1.0)
    stats = PPOStats(
        clip_frac_low=(((adv < 0) & (ratio < 1.0 - clip_low)).to(acc) * m).sum() / n,
        clip_frac_high=(((adv > 0) & (ratio > 1.0 + clip_high)).to(acc) * m).sum() / n,
        approx_kl=(((ratio - 1.0) - (lp - old_logprobs.to(acc))) * m).sum() / n,
        ratio_mean=(ratio * m).sum() / n,
        entropy=(entropy * m).sum() / n if entropy is not None else None,
        num_tokens=count,
    )
    return loss, dlp, stats
