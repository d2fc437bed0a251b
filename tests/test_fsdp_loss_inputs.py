"""FSDP2 bf16 mixed precision must not round the fused loss's fp32 inputs.

The policy's root forward takes ``ppo=`` (old_logprobs, token_advantages, ref_logprobs in
float32). A root ``fully_shard`` with the default ``cast_forward_inputs=True`` casts every
floating tensor among the forward's arguments to the parameter dtype, so the loss would
see them rounded to bf16. One gloo process on CPU, bf16 parameter policy.
"""

import datetime

import pytest
import torch
import torch.distributed as dist

import cepo_kernels as ck
from cepo.distributed import free_port
from cepo.model import load_causal_lm
from cepo.packing import pack_sequences, response_gather_index
from cepo.policy import FusedHeadPolicy, shard
from tiny_lm import make_tiny_model_dir


@pytest.fixture
def one_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _not_bf16_representable(n, seed):
    """fp32 values that bf16 rounding changes (log-prob-like magnitudes, 4..8)."""
    g = torch.Generator().manual_seed(seed)
    x = -(4 + 4 * torch.rand(n, generator=g))
    assert not torch.equal(x, x.to(torch.bfloat16).float())
    return x


def test_bf16_policy_keeps_loss_inputs_fp32(tmp_path, monkeypatch, one_process_group):
    model_dir = make_tiny_model_dir(tmp_path, arch="qwen3", hidden=32, layers=2)
    policy = FusedHeadPolicy(load_causal_lm(str(model_dir), attn_implementation="sdpa"))
    shard(policy, torch.device("cpu"), bf16=True, cpu_offload=False)

    seqs = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    prompts, responses = [2, 1, 3], [3, 2, 1]
    batch = pack_sequences(seqs)
    index, targets = response_gather_index(batch, prompts, responses)
    m = index.numel()
    ppo = dict(old_logprobs=_not_bf16_representable(m, 0),
               token_advantages=torch.randn(m, generator=torch.Generator().manual_seed(1)),
               ref_logprobs=_not_bf16_representable(m, 2),
               mask=torch.ones(m, dtype=torch.bool), kl_coef=0.1)
    sent = {k: v.clone() for k, v in ppo.items() if torch.is_tensor(v)}

    seen = {}
    real_loss = ck.fused_linear_ppo_loss

    def spy(hidden, weight, targets, **kwargs):
        seen.update(kwargs, hidden=hidden, weight=weight)
        return real_loss(hidden, weight, targets, **kwargs)

    monkeypatch.setattr(ck, "fused_linear_ppo_loss", spy)
    loss, stats = policy(batch, index, targets, ppo=ppo)
    loss.backward()

    # the policy really runs in bf16 (else this test would prove nothing) ...
    assert seen["hidden"].dtype == torch.bfloat16 and seen["weight"].dtype == torch.bfloat16
    # ... yet the loss inputs arrive bit-exact in fp32
    for name, value in sent.items():
        assert seen[name].dtype == value.dtype, name
        assert torch.equal(seen[name], value), name
    assert torch.isfinite(loss) and stats.logprobs.shape == (m,)
