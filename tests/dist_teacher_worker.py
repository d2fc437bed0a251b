"""Run under torchrun (2 processes, gloo, CPU): the lagged teacher under FSDP2.

    dist_teacher_worker.py MODEL_DIR OUT

Builds the policy and a lagged teacher (``cepo.teacher.build_teacher``) as the trainer
does, sharded with FSDP2; for steps 0..5 refreshes the teacher (sync every 2), scores a
fixed batch with the teacher and compares it with the policy's hidden states at the last
refresh step, then moves the policy's weights. Saves a checkpoint with the teacher after
step 2 (teacher = policy at step 2, policy moved on), restores it into freshly built
models and compares. Rank 0 writes OUT/report.json.
"""

import json
import random
import sys
from pathlib import Path

import torch

from cepo.build import build_optimizer, build_policy
from cepo.checkpoint import load_checkpoint, save_checkpoint
from cepo.config import TrainConfig
from cepo.distributed import init_distributed, shutdown
from cepo.step import Responses, context_hidden_states
from cepo.teacher import build_teacher, reshard


def batch(rank: int):
    rng = random.Random(7 + rank)  # each rank its own rollouts, as in training
    tok = lambda n: [rng.randrange(4, 60) for _ in range(n)]  # noqa: E731
    responses = Responses.of([tok(rng.randint(2, 6)) for _ in range(3)])
    return {"pos": [tok(4) for _ in range(3)]}, responses


@torch.no_grad()
def move(model, step):
    """A stand-in for an optimizer step: the same full-tensor change on every rank."""
    from torch.distributed.tensor import distribute_tensor

    reshard(model)  # a forward leaves the root's parameters gathered
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.add_(distribute_tensor(0.05 * torch.randn(p.shape, generator=g), p.device_mesh,
                                 p.placements))


def full(model):
    reshard(model)
    return {n: p.full_tensor().clone() for n, p in model.named_parameters()}


def max_err(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def main():
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    info = init_distributed("cpu")
    cfg = TrainConfig(model=model_dir, teacher="lagged", teacher_sync_every=2, lr=1e-3,
                      steps=6)
    device = info.device
    policy = build_policy(cfg, device)
    optimizer, scheduler = build_optimizer(cfg, policy)
    teacher = build_teacher(cfg, policy, device)
    contexts, responses = batch(info.rank)
    kw = dict(token_budget=64, pad_id=0, device=device)
    placements = all(
        type(t).__name__ == "DTensor" and t.placements == p.placements
        and t.to_local().shape == p.to_local().shape
        for t, p in zip(teacher.model.parameters(), policy.parameters()))
    refreshed, snapshot, errs = [], {}, []
    for step in range(6):
        if teacher.at_step(step):
            refreshed.append(step)
        snapshot[step] = context_hidden_states(policy, contexts, responses, **kw)["pos"]
        lagged = context_hidden_states(teacher.model, contexts, responses, **kw)["pos"]
        errs.append(float((lagged - snapshot[step - step % 2]).abs().max()))
        if step == 2:  # done = 3 steps: the teacher holds the policy of step 2
            move(policy, step)
            saved_teacher, saved_policy = full(teacher.model), full(policy)
            save_checkpoint(out / "ckpt", 3, model=policy, optimizer=optimizer,
                            scheduler=scheduler, trainer_state={"step": 3},
                            extra_models={"teacher": teacher.model})
            continue
        move(policy, step)

    fresh = build_policy(cfg, device)
    fresh_opt, fresh_sched = build_optimizer(cfg, fresh)
    fresh_teacher = build_teacher(cfg, fresh, device)
    load_checkpoint(out / "ckpt" / "step_000003", model=fresh, optimizer=fresh_opt,
                    scheduler=fresh_sched, extra_models={"teacher": fresh_teacher.model})
    restored, restored_policy = full(fresh_teacher.model), full(fresh)
    report = {"placements_match": placements, "refreshed": refreshed,
              "max_err_vs_snapshot": max(errs),
              "restored_err": max(max_err(restored, saved_teacher),
                                  max_err(restored_policy, saved_policy)),
              "restored_vs_policy": max_err(restored, restored_policy)}
    if info.rank == 0:
        (out / "report.json").write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main()
