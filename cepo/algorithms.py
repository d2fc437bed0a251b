"""Group advantages (docs/algorithm.md step 1) and the lambda schedule (step 5)."""

from __future__ import annotations

import math

import torch


def group_advantages(rewards: torch.Tensor, *, std_normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages A_i = (s_i - mean_g) / (std_g + eps) for rewards [num_groups, G].

    std is the unbiased group standard deviation (as TRL and verl compute it);
    ``std_normalize=False`` gives Dr.GRPO's A_i = s_i - mean_g. A group whose rewards are
    all equal gets A = 0 exactly (it carries no signal and is skipped by the trainer).
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_groups, G >= 2], got {tuple(rewards.shape)}")
    rewards = rewards.double()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if std_normalize:
        centered = centered / (rewards.std(dim=1, keepdim=True) + eps)
    flat = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(centered), centered).float()


def lambda_at(step: int, *, algo: str, lam0: float, t_warm: int, schedule: str) -> float:
    """lambda for a 0-based step: lam0 decaying to 0 over t_warm steps; 0 for GRPO (and for
    OPSD / SDPO, which use no contrastive evidence).

    linear: lam0 (1 - step / t_warm); cosine: lam0 (1 + cos(pi step / t_warm)) / 2; both 0
    from step t_warm on. constant: lam0 always.
    """
    if algo in ("grpo", "opsd", "sdpo"):
        return 0.0
    if schedule == "constant":
        return lam0
    if t_warm <= 0 or step >= t_warm:
        return 0.0
    frac = step / t_warm
    if schedule == "linear":
        return lam0 * (1.0 - frac)
    if schedule == "cosine":
        return lam0 * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"lam_schedule must be linear, constant or cosine, got {schedule!r}")
