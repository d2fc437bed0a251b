"""The one-pass context scoring under FSDP2 on 2 gloo ranks with unequal work: the rank
with fewer micro-batches runs padding turns (else the collectives would hang), and every
rank's hidden states equal the unsharded, one-process ones."""

import random

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cepo.model import load_causal_lm
from cepo.policy import FusedHeadPolicy, shard
from cepo.step import Responses, context_hidden_states
from tiny_lm import make_tiny_model_dir


def _work(rank: int):
    rng = random.Random(rank)
    tok = lambda n: [rng.randrange(4, 60) for _ in range(n)]  # noqa: E731
    count = 6 if rank == 0 else 1  # rank 1 has one rollout: most turns are padding
    responses = Responses.of([tok(rng.randint(2, 8)) for _ in range(count)])
    contexts = {"policy": [tok(4) for _ in range(count)], "pos": [tok(6) for _ in range(count)],
                "neg": [tok(5) if i % 2 else None for i in range(count)]}
    return contexts, responses


def _worker(rank: int, init: str, model_dir: str, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        policy = FusedHeadPolicy(load_causal_lm(model_dir, dtype=torch.float32,
                                                attn_implementation="sdpa"))
        shard(policy, torch.device("cpu"), bf16=False, cpu_offload=False)
        contexts, responses = _work(rank)
        out = context_hidden_states(policy, contexts, responses, token_budget=16, pad_id=0,
                                    device=torch.device("cpu"))
        results[rank] = {k: v.clone() for k, v in out.items()}
    finally:
        dist.destroy_process_group()


def test_unequal_ranks_pad_and_match_one_process(tmp_path):
    model_dir = str(make_tiny_model_dir(tmp_path / "m"))
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", model_dir, results), nprocs=2)
    policy = FusedHeadPolicy(load_causal_lm(model_dir, dtype=torch.float32,
                                            attn_implementation="sdpa"))
    for rank in (0, 1):
        contexts, responses = _work(rank)
        alone = context_hidden_states(policy, contexts, responses, token_budget=16, pad_id=0,
                                      device=torch.device("cpu"))
        for name in contexts:
            torch.testing.assert_close(results[rank][name], alone[name], atol=1e-5, rtol=1e-5)
