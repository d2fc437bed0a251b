"""cepo.distributed: the process-group backend (both backends under CPU offload), and the
gather for the sampler moving CPU-offloaded shards to the mesh's device first.

Run as a script under torchrun, this file is also the worker of the CUDA offload test.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist

from cepo.distributed import init_distributed, process_group_backend, shutdown


def test_backend_string_per_device_and_offload():
    assert process_group_backend("cpu") == "gloo"
    assert process_group_backend("cpu", cpu_offload=True) == "gloo"
    assert process_group_backend("cuda") == "nccl"
    # torchtitan's choice when offloading: CPU tensors (shards, gradients, the clip's
    # norm) get a CPU backend, CUDA tensors keep NCCL
    assert process_group_backend("cuda", cpu_offload=True) == "cuda:nccl,cpu:gloo"
    with pytest.raises(ValueError, match="'device'"):
        process_group_backend("tpu")


def _fsdp_tiny(device: torch.device, offload: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Linear(10, 7)).to(device)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kwargs = dict(mesh=init_device_mesh(device.type, (dist.get_world_size(),)))
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in model:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model, reference


def _check_gather_and_clip(device: torch.device, offload: bool) -> None:
    """Weights gathered for the sampler land on ``device`` whole and equal; the
    gradient-norm clip (an all-reduce over the shards, wherever they live) runs."""
    from cepo.weight_sync import iter_full_weights

    model, reference = _fsdp_tiny(device, offload)
    for p in model.parameters():
        local = p.to_local()
        assert local.device.type == ("cpu" if offload else device.type)
    got = dict(iter_full_weights(model))
    assert got.keys() == reference.keys()
    for k, t in got.items():
        assert t.device.type == device.type, k  # gathered on the mesh's device
        torch.testing.assert_close(t.to(reference[k].device), reference[k], rtol=0, atol=0)
    x = torch.randn(5, 12, device=device)
    model(x).square().sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert torch.isfinite(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def test_gather_and_clip_on_a_cpu_mesh():
    """World of one, gloo (the CPU path of every test run): shards already on the mesh's
    device are gathered as they are."""
    info = init_distributed("cpu")
    try:
        assert "cpu:" in dist.get_backend_config()
        _check_gather_and_clip(info.device, offload=False)
    finally:
        shutdown()


def test_shutdown_joins_gloo_threads_before_exit(tmp_path):
    """The gloo abort at exit ("terminate called without an active exception"): FSDP2's
    meshes keep the process group, and gloo's threads, alive past destroy_process_group
    into interpreter teardown. After shutdown() none of gloo's threads may be left."""
    from launch import TESTS, torchrun
    proc = torchrun([TESTS / "test_distributed.py", "threads", tmp_path])
    for rank in (0, 1):
        assert (tmp_path / f"threads{rank}.txt").read_text() == "before: 3 after: 0", proc.stderr
    assert "gloo threads still alive" not in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CPU offload needs a CUDA device")
def test_cpu_offload_gathers_on_the_gpu(tmp_path):
    from launch import TESTS, torchrun
    torchrun([TESTS / "test_distributed.py", "offload"], nproc=1)


def _threads_worker(out: str) -> None:
    from cepo.distributed import gloo_threads
    from cepo.weight_sync import iter_full_weights

    def run():  # what a training run leaves behind: FSDP2 modules, a step, a gather
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        init_distributed("cpu")
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(5, 16)).square().sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for _ in iter_full_weights(model):
            pass
        return len(gloo_threads())

    before = run()
    shutdown()
    with open(os.path.join(out, f"threads{os.environ['RANK']}.txt"), "w") as f:
        f.write(f"before: {before} after: {len(gloo_threads())}")


if __name__ == "__main__" and sys.argv[1:2] == ["threads"]:  # torchrun worker (CPU)
    _threads_worker(sys.argv[2])

if __name__ == "__main__" and sys.argv[1:] == ["offload"]:  # torchrun worker (CUDA)
    info = init_distributed("cuda", cpu_offload=True)
    assert dist.get_backend_config() == "cuda:nccl,cpu:gloo", dist.get_backend_config()
    _check_gather_and_clip(info.device, offload=True)
    shutdown()
    print("offload ok", os.environ.get("RANK"))
