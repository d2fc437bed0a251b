"""Whose weights score the teacher contexts (``--teacher``), docs/algorithm.md step 2.

- ``policy`` (default): the current policy, as the CEPO reference's default
  (``cepo_needs_ref=False``); no extra model, and the step's code path is unchanged.
- ``initial``: the frozen initial model, the reference's ``cepo_needs_ref=True``. With
  LoRA it is the policy with its adapters disabled (peft ``disable_adapter``: no copy,
  as the reference does); with full fine-tuning a frozen copy loaded from ``--model``,
  sharded like the policy, and the same object as the KL reference when ``kl_coef > 0``.
- ``lagged``: a frozen copy of the policy (LoRA included), sharded like it, whose
  parameters are copied from the policy at the start of every step whose 0-based index
  is a multiple of ``teacher_sync_every`` (step 0 included, so it starts as the initial
  model). It is saved with every checkpoint (``extra_models={"teacher": ...}``) and
  restored on resume, so a resumed run scores with the weights an uninterrupted run
  would. The reference declares ``rlsd_teacher_sync_freq`` but never uses it.

The teacher passes score only the hinted contexts (teacher + and teacher -) with these
weights and the teacher's own LM head; the policy context (the RLSD fallback's
``lp_policy`` and old log-probs) is always scored by the policy.
"""

from __future__ import annotations

import torch

TEACHERS = ("policy", "initial", "lagged")


class AdaptersDisabled:
    """The LoRA policy seen with its adapters off: the initial model, without a copy.

    Quacks like a ``FusedHeadPolicy`` for ``cepo.step.context_hidden_states`` /
    ``unsharded``: ``base``, ``head_weight()``, a call, ``unshard`` / ``reshard``."""

    def __init__(self, policy):
        self.policy = policy

    @property
    def base(self):
        return self.policy.base

    def head_weight(self) -> torch.Tensor:
        return self.policy.head_weight()

    def __call__(self, *args, **kwargs):
        with self.policy.lm.disable_adapter():
            return self.policy(*args, **kwargs)

    def unshard(self):
        if hasattr(self.policy, "unshard"):
            self.policy.unshard()

    def reshard(self):
        if hasattr(self.policy, "reshard"):
            self.policy.reshard()


def reshard(model: torch.nn.Module) -> None:
    """Reshard every FSDP2 unit of ``model`` (a no-op for a plain module)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def copy_parameters(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """dst's parameters and buffers := src's, shard by shard (both built and sharded the
    same way, so each rank copies its own local shards: no communication). FSDP2 units
    left unsharded by a forward (the root keeps its parameters gathered) are resharded
    first, so both sides hold their sharded parameters."""
    reshard(dst)
    reshard(src)
    for kind in ("named_parameters", "named_buffers"):
        d, s = dict(getattr(dst, kind)()), dict(getattr(src, kind)())
        if d.keys() != s.keys():
            raise ValueError(f"teacher: the lagged copy's {kind[6:]} differ from the policy's "
                             f"({sorted(d.keys() ^ s.keys())[:4]}...); build it like the policy")
        for name, t in d.items():
            local = t.to_local() if hasattr(t, "to_local") else t
            other = s[name].to_local() if hasattr(s[name], "to_local") else s[name]
            local.copy_(other)


class Teacher:
    """The teacher weights of a run: ``model`` is what the teacher contexts run on (None
    for ``policy``: the caller keeps its own path); ``at_step(step)`` refreshes a lagged
    copy; ``saved`` is the module to store with checkpoints (None when nothing is needed)."""

    def __init__(self, mode: str, policy, *, sync_every: int = 10, copy=None):
        if mode not in TEACHERS:
            raise ValueError(f"config: 'teacher' must be one of {TEACHERS}, got {mode!r}")
        if sync_every < 1:
            raise ValueError(f"config: 'teacher_sync_every' must be >= 1, got {sync_every}")
        self.mode, self.policy, self.sync_every = mode, policy, sync_every
        self.model = None
        self.refreshed_at: int | None = None   # last step a lagged copy was refreshed
        if mode == "initial":
            self.model = copy if copy is not None else AdaptersDisabled(policy)
        elif mode == "lagged":
            if copy is None:
                raise ValueError("teacher 'lagged' needs a copy of the policy (build_teacher)")
            self.model = copy

    @property
    def saved(self):
        return self.model if self.mode == "lagged" else None

    def at_step(self, step: int) -> bool:
        """Refresh a lagged copy from the policy when ``step % sync_every == 0``; returns
        whether it did."""
        if self.mode != "lagged" or step % self.sync_every:
            return False
        copy_parameters(self.model, self.policy)
        self.refreshed_at = step
        return True


def build_teacher(cfg, policy, device, *, reference=None) -> Teacher:
    """The run's ``Teacher`` (``cfg.teacher``): reuses ``reference`` (the KL reference,
    a frozen initial copy) for ``initial`` with full fine-tuning when there is one."""
    from cepo.build import build_policy, build_reference

    copy = None
    if cfg.teacher == "initial" and cfg.lora_rank == 0:
        copy = reference if reference is not None else build_reference(cfg, device)
    elif cfg.teacher == "lagged":
        copy = build_policy(cfg, device)
        copy.requires_grad_(False)
    return Teacher(cfg.teacher, policy, sync_every=cfg.teacher_sync_every, copy=copy)
