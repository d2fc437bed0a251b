"""StepMetrics: each declared reduction, over micro-batches and over ranks (2 gloo processes)."""

import math

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from cepo.step_metrics import REDUCTIONS, StepMetrics, reduction_of


def test_reductions_within_one_rank():
    m = StepMetrics()
    m.add("skipped_rollouts", 3)            # sum
    m.add("skipped_rollouts", 2)
    m.add("clip_frac_low", 0.5, weight=10)  # token-weighted mean
    m.add("clip_frac_low", 0.0, weight=30)
    m.add("grad_norm", 2.0)                 # max
    m.add("grad_norm", 1.0)
    m.add("lambda", 0.4)                    # rank 0's value
    m.add("time_generate", 1.5)             # phases: max over ranks
    m.add("verifier_status_unparseable", 1.0)  # statuses: mean
    m.add("verifier_status_unparseable", 0.0)
    m.declare("delta_abs_wrong", "logprob_diff_max")
    out = m.reduce()
    assert out["skipped_rollouts"] == 5
    assert out["clip_frac_low"] == pytest.approx(5 / 40)
    assert out["grad_norm"] == 2.0 and out["lambda"] == 0.4 and out["time_generate"] == 1.5
    assert out["verifier_status_unparseable"] == 0.5
    assert out["delta_abs_wrong"] is None and out["logprob_diff_max"] is None  # nothing seen


def test_undeclared_metric_is_named():
    with pytest.raises(KeyError, match="no_such_metric"):
        StepMetrics().add("no_such_metric", 1.0)
    assert {reduction_of(k) for k in REDUCTIONS} <= {"sum", "mean", "max", "rank0"}


def _worker(rank: int, init: str, results):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        m = StepMetrics()
        m.declare(*REDUCTIONS)
        if rank == 0:   # rank 1 has no rollouts at all: its declared names still reduce
            m.add("reward_mean", 1.0)
            m.add("reward_mean", 0.0)
            m.add("entropy", 2.0, weight=3)
            m.add("logprob_diff_max", 1e-6)
        else:
            m.add("entropy", 1.0, weight=1)
            m.add("logprob_diff_max", 5e-6)
        m.add("trained_tokens", 3 + rank)
        m.add("lambda", 0.25 if rank == 0 else 0.75)
        results[rank] = m.reduce()
    finally:
        dist.destroy_process_group()


def test_reductions_over_two_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", results), nprocs=2)
    a, b = results[0], results[1]
    assert a == b  # every rank gets the same figures
    assert a["reward_mean"] == 0.5 and a["trained_tokens"] == 7
    assert a["entropy"] == pytest.approx((2.0 * 3 + 1.0) / 4)
    assert a["logprob_diff_max"] == 5e-6 and a["lambda"] == 0.25
    assert a["delta_abs_correct"] is None and not math.isnan(a["loss"])
