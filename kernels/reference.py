"""Naive reference implementations: materialise the [N, V] logits, work in float64.

Used only by tests and benchmarks as the ground truth (and as the 'reference' backend).
Every quantity is written the plain way, straight from docs/algorithm.md; gradients come from
torch autograd through the float64 computation, so ``torch.autograd.gradcheck`` applies.
Outputs are float64.
"""

from __future__ import annotations

import torch

from ._math import evidence_epilogue
from ._types import IGNORE_INDEX, Evidence, LogProbs, PPOStats, SelfDistillStats


def logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N, V] float64 tempered logits hidden @ weight.T / temperature."""
    return (hidden.double() @ weight.double().T) / temperature


def fused_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False) -> LogProbs:
    """log p(targets) [N], logsumexp [N] and optionally entropy [N], float64."""
    z = logits(hidden, weight, temperature)
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[:, None]
    valid = targets != IGNORE_INDEX
    picked = logp.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    lp = torch.where(valid, picked, torch.zeros_like(picked))
    ent = -(logp.exp() * logp).sum(-1) if return_entropy else None
    return LogProbs(lp, lse, ent)


def contrastive_evidence(h_policy, h_pos, h_neg, weight, targets, advantages, has_negative, *,
                         lam, eps_w, temperature=1.0) -> Evidence:
    """Three log-probs of the same tokens and the contrastive token advantages, float64."""
    with torch.no_grad():
        lps = [fused_logprobs(h, weight, targets, temperature=temperature).logprobs
               for h in (h_policy, h_pos, h_neg)]
        valid = targets != IGNORE_INDEX
        delta, token_adv, clipped = evidence_epilogue(
            *lps, advantages.double(), has_negative, valid, lam=lam, eps_w=eps_w)
    return Evidence(*lps, delta, token_adv, clipped)


def fused_linear_ppo_loss(hidden, weight, targets, old_logprobs, token_advantages, mask, *,
                          clip_low=0.2, clip_high=0.28, temperature=1.0, normalizer=None,
                          ref_logprobs=None, kl_coef=0.0, return_entropy=False,
                          clip_dual=None, token_weights=None):
    """Token-mean PPO clipped surrogate (plus optional k3 KL to a reference), float64.

    loss = sum_t m_t w_t (l_t + kl_coef * k3_t) / normalizer,
    l_t = -min(r_t A_t, clip(r_t, 1-clip_low, 1+clip_high) A_t), and with clip_dual = c,
    for A_t < 0: l_t = min(max(-A_t r_t, -A_t clip(r_t)), -A_t c) (dual clip);
    r_t = exp(lp_t - old_t), k3_t = exp(ref_t - lp_t) - (ref_t - lp_t) - 1,
    w_t = token_weights (1 when None), normalizer = sum_t m_t unless given.
    Differentiable w.r.t. hidden and weight.
    """
    out = fused_logprobs(hidden, weight, targets, temperature=temperature,
                         return_entropy=return_entropy)
    lp = out.logprobs
    m = (mask & (targets != IGNORE_INDEX)).double()
    adv = token_advantages.double()
    old = lp.detach() if old_logprobs is None else old_logprobs.double()  # None: on-policy
    ratio = torch.exp(lp - old)
    surr1 = ratio * adv
    surr2 = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(surr1, surr2)
    if clip_dual is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * clip_dual), per_token)
    if ref_logprobs is not None and kl_coef:
        d = ref_logprobs.double() - lp
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1.0)
    if token_weights is not None:
        per_token = per_token * token_weights.double()
    count = m.sum()
    denom = count.clamp(min=1.0) if normalizer is None else torch.as_tensor(
        float(normalizer), dtype=torch.float64, device=lp.device)
    loss = (per_token * m).sum() / denom
    with torch.no_grad():
        n = count.clamp(min=1.0)
        r = ratio.detach()
        stats = PPOStats(
            clip_frac_low=(((adv < 0) & (r < 1.0 - clip_low)).double() * m).sum() / n,
            clip_frac_high=(((adv > 0) & (r > 1.0 + clip_high)).double() * m).sum() / n,
            approx_kl=(((r - 1.0) - torch.log(r)) * m).sum() / n,
            ratio_mean=(r * m).sum() / n,
            entropy=(out.entropy.detach() * m).sum() / n if return_entropy else None,
            num_tokens=count,
            logprobs=lp.detach(),
            clip_frac_dual=torch.zeros_like(n) if clip_dual is None else (
                ((adv < 0) & (torch.maximum(-adv * r, -adv * r.clamp(1.0 - clip_low, 1.0 + clip_high))
                              > -adv * clip_dual)).double() * m).sum() / n,
        )
    return loss, stats


def fused_linear_self_distill_loss(h_student, h_teacher, weight, targets, mask, *,
                                   divergence="jsd", beta=0.5, temperature=1.0, normalizer=None,
                                   token_weights=None):
    """Self-distillation loss over full next-token distributions, float64, with autograd.

    q = softmax(h_student W^T / T) (student), p = softmax(h_teacher W^T / T) (teacher,
    stop-gradient). Per token: forward_kl KL(p || q); reverse_kl KL(q || p); jsd
    beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, except beta = 0
    (forward KL) and beta = 1 (reverse KL). loss = sum_t keep_t w_t D_t / normalizer.
    Returns (loss, SelfDistillStats).
    """
    log_q = torch.log_softmax(logits(h_student, weight, temperature), dim=-1)
    with torch.no_grad():
        log_p = torch.log_softmax(logits(h_teacher, weight, temperature), dim=-1)
    q, p = log_q.exp(), log_p.exp()
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        per_token = (p * (log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        per_token = (q * (log_q - log_p)).sum(-1)
    else:
        m = beta * p + (1.0 - beta) * q
        per_token = (beta * (p * (log_p - m.log())).sum(-1)
                     + (1.0 - beta) * (q * (log_q - m.log())).sum(-1))
    valid = targets != IGNORE_INDEX
    keep = mask & valid
    k = keep.double()
    weighted = per_token if token_weights is None else per_token * token_weights.double()
    weighted = torch.where(keep, weighted, torch.zeros_like(weighted))
    count = k.sum()
    denom = count.clamp(min=1.0) if normalizer is None else torch.as_tensor(
        float(normalizer), dtype=torch.float64, device=k.device)
    loss = weighted.sum() / denom
    with torch.no_grad():
        n = count.clamp(min=1.0)
        picked = log_q.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
        token_div = per_token.detach() * k
        stats = SelfDistillStats(
            divergence=token_div.sum() / n,
            entropy=(-(q * log_q).sum(-1) * k).sum() / n,
            num_tokens=count,
            logprobs=torch.where(valid, picked, torch.zeros_like(picked)),
            token_divergence=token_div,
        )
    return loss, stats
