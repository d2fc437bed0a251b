"""Run under torchrun (2 processes, gloo): checks cepo.weight_sync on an FSDP2 model."""

import json
import sys

import torch
import torch.distributed as dist

from cepo.distributed import init_distributed, shutdown
from cepo.model import load_causal_lm
from cepo.policy import FusedHeadPolicy, apply_lora, shard
from cepo.weight_sync import iter_weight_buckets


def main(model_dir: str, out: str, lora: bool):
    info = init_distributed("cpu")
    torch.manual_seed(0)
    lm = load_causal_lm(model_dir)
    if lora:
        lm = apply_lora(lm, 4, 8, ["q_proj", "v_proj"])
        for name, p in lm.named_parameters():
            if "lora_B" in name:  # non-zero B so that the merge matters
                torch.nn.init.normal_(p, std=0.1)
    reference = {}
    if lora:
        import copy
        reference = {k: v.clone() for k, v in copy.deepcopy(lm).merge_and_unload().state_dict().items()}
    else:
        reference = {k: v.clone() for k, v in lm.state_dict().items()}
    policy = FusedHeadPolicy(lm)
    shard(policy, info.device, bf16=False, cpu_offload=False)
    limit = 4096
    names, sizes, max_err, sharded = [], [], 0.0, False
    for name, p in policy.lm.named_parameters():
        sharded |= hasattr(p, "full_tensor")
    for bucket in iter_weight_buckets(policy.lm, bucket_bytes=limit):
        sizes.append([t.numel() * t.element_size() for _, t in bucket])
        for name, t in bucket:
            names.append(name)
            max_err = max(max_err, (t - reference[name]).abs().max().item())
            assert tuple(t.shape) == tuple(reference[name].shape), name
    expected = [n for n, _ in (lm.get_base_model() if lora else lm).named_parameters()
                if "lora_" not in n]
    result = dict(names=names, expected=[n.replace(".base_layer", "") for n in expected],
                  sizes=sizes, limit=limit, max_err=max_err, sharded=sharded,
                  world=dist.get_world_size())
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "lora")
    shutdown()  # after main's FSDP2 model is gone: it holds the process group
