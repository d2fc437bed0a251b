"""One step's metrics: each declared once with how it reduces over micro-batches and ranks.

A training step produces numbers on every rank and in every micro-batch (losses, clip
fractions, rewards, timings). ``StepMetrics`` collects them under names declared in
``REDUCTIONS`` and reduces all of them over ranks in one collective (an all-gather of
one flat float64 vector), so the step code only says *what* happened, never how to
average it:

- ``sum``:  total over micro-batches and ranks (counts: rollouts, tokens, timeouts);
- ``mean``: weighted mean, sum(value * weight) / sum(weight) over micro-batches and
  ranks (per-token statistics weighted by their token count, per-rollout ones by 1);
- ``max``:  maximum over micro-batches and ranks;
- ``rank0``: the value of rank 0 (things every rank knows equally: lambda, lr, times).

A ``mean`` with no weight anywhere reduces to None (e.g. no evidence tokens this step).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

KINDS = ("sum", "mean", "max", "rank0")

REDUCTIONS: dict[str, str] = {
    # rollouts (per rollout, every sampled one)
    "reward_mean": "mean", "accuracy": "mean", "response_length": "mean",
    "truncated_frac": "mean", "skipped_rollouts": "sum", "verifier_timeouts": "sum",
    "verifier_errors": "sum", "groups_with_negative_frac": "mean",
    # the update (per trained token)
    "loss": "sum", "clip_frac_low": "mean", "clip_frac_high": "mean", "approx_kl": "mean",
    "ratio_mean": "mean", "entropy": "mean", "trained_tokens": "sum", "grad_norm": "max",
    "update_skipped": "max", "nonfinite_update": "max",
    # the sampler-vs-trainer log-prob check (per compared token)
    "logprob_diff_mean": "mean", "logprob_diff_max": "max",
    # the contrastive evidence (per evidence token)
    "delta_abs_correct": "mean", "delta_abs_wrong": "mean", "weight_clipped_frac": "mean",
    # self-distillation (opsd / sdpo): rollouts with a teacher, and the weighted loss term
    "distilled_frac": "mean", "distill_loss": "mean", "clip_frac_dual": "mean",
    # the step
    "lambda": "rank0", "lr": "rank0", "response_tokens": "sum", "peak_memory_gb": "max",
}
"""Every metric a step reports, and its reduction. Names are the metrics.jsonl keys."""

STATUS_PREFIX = "verifier_status_"
"""Per-status fractions of the verifier's verdicts (``verifier_status_unparseable`` ...)
are declared on the fly as ``mean`` metrics: the set of statuses belongs to the verifier."""

TIME_PREFIX = "time_"
"""Phase timings (``time_generate`` ...) are declared on the fly as ``max`` over ranks:
a step lasts as long as its slowest rank."""


def reduction_of(name: str) -> str:
    """The declared reduction of a metric name (KeyError names the undeclared one)."""
    if name in REDUCTIONS:
        return REDUCTIONS[name]
    if name.startswith(STATUS_PREFIX):
        return "mean"
    if name.startswith(TIME_PREFIX):
        return "max"
    raise KeyError(f"metric {name!r} is not declared in cepo.step_metrics.REDUCTIONS")


class StepMetrics:
    """Accumulates one step's metrics on one rank; ``reduce`` combines all ranks."""

    def __init__(self):
        self._num: dict[str, float] = {}   # sum(value * weight), or the running max / value
        self._den: dict[str, float] = {}   # sum(weight), for means

    def add(self, name: str, value: float, weight: float = 1.0) -> None:
        """Record ``value`` for ``name`` (``weight``: its share in a ``mean``; for
        ``sum`` it multiplies the value, so add(count) and add(mean, weight=n) agree)."""
        kind = reduction_of(name)
        value = float(value)
        if kind == "max":
            self._num[name] = max(self._num.get(name, -math.inf), value)
        elif kind == "rank0":
            self._num[name] = value
        elif kind == "sum":
            self._num[name] = self._num.get(name, 0.0) + value * weight
        else:
            self._num[name] = self._num.get(name, 0.0) + value * weight
            self._den[name] = self._den.get(name, 0.0) + weight

    def declare(self, *names: str) -> None:
        """Make ``names`` exist on this rank even if it records nothing for them, so
        every rank reduces the same vector (a rank with no rollouts still reports)."""
        for name in names:
            kind = reduction_of(name)
            if kind == "max":
                self._num.setdefault(name, -math.inf)
            else:
                self._num.setdefault(name, 0.0)
                if kind == "mean":
                    self._den.setdefault(name, 0.0)

    def reduce(self, device: torch.device | str = "cpu") -> dict[str, float | None]:
        """All ranks' metrics combined, in one all-gather. Every rank must have declared
        the same names (``declare``), in any order; returns plain floats (None for a mean
        without weight or a max never set)."""
        names = sorted(set(self._num) | set(self._den))
        local = []
        for name in names:
            local += [self._num.get(name, 0.0), self._den.get(name, 0.0)]
        vec = torch.tensor(local, dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, vec)
            table = torch.stack(parts).cpu()
        else:
            table = vec.cpu()[None]
        out: dict[str, float | None] = {}
        for k, name in enumerate(names):
            num, den = table[:, 2 * k], table[:, 2 * k + 1]
            kind = reduction_of(name)
            if kind == "sum":
                out[name] = float(num.sum())
            elif kind == "max":
                top = float(num.max())
                out[name] = None if top == -math.inf else top
            elif kind == "rank0":
                out[name] = float(num[0])
            else:
                total = float(den.sum())
                out[name] = float(num.sum()) / total if total > 0 else None
        return out
