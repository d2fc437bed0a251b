"""DW_ACCUMULATION: dW of a bf16 weight accumulated in fp32 (default) or in the bf16
gradient itself ('weight': no fp32 [V, H] buffer, one rounding per row chunk)."""

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels import chunked, reference, triton_ops
from kernel_cases import ENGINES, GRAD_TOL, BuffersMade, head_inputs, rel_err

N, H, V = 67, 24, 211  # 67 rows in chunks of 4 (17 chunks: 17 roundings in 'weight')


@pytest.fixture
def small_chunks(monkeypatch):
    """Four rows per chunk on every engine, so dW sums many chunks."""
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 4 * V)
    monkeypatch.setattr(triton_ops, "GPU_CHUNK_BYTES", 4 * 12 * V)


def _ppo(hidden, weight, targets, engine):
    g = torch.Generator().manual_seed(3)
    n = hidden.shape[0]
    old = None  # on-policy: ratio 1, no row clipped, every kept row has a gradient
    adv = torch.randn(n, generator=g).to(hidden.device)
    mask = (torch.rand(n, generator=g) > 0.2).to(hidden.device)
    kw = dict(temperature=0.8)
    if engine == "reference":
        return reference.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, **kw)[0]
    return ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, backend=engine, **kw)[0]


def _logprobs(hidden, weight, targets, engine):
    g = torch.Generator().manual_seed(4)
    up = torch.randn(hidden.shape[0], generator=g).to(hidden.device)
    if engine == "reference":
        out = reference.fused_logprobs(hidden, weight, targets, temperature=0.8)
    else:
        out = ck.fused_logprobs(hidden, weight, targets, temperature=0.8, backend=engine)
    return (out.logprobs * up).sum()


def _distill(hidden, weight, targets, engine):
    teacher = hidden.detach().flip(0) * 0.7
    mask = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    if engine == "reference":
        return reference.fused_linear_self_distill_loss(hidden, teacher, weight, targets, mask)[0]
    return ck.fused_linear_self_distill_loss(hidden, teacher, weight, targets, mask, backend=engine)[0]


OPS = {"ppo_loss": _ppo, "logprobs": _logprobs, "self_distill": _distill}


def _grads(op, engine, device, dtype, mode, monkeypatch):
    monkeypatch.setattr(chunked, "DW_ACCUMULATION", mode)
    hidden, weight, targets = head_inputs(N, H, V, dtype, device, seed=11, scale=2.0,
                                          ignore=(5,), requires_grad=True)
    loss = OPS[op](hidden, weight, targets, engine)
    return torch.autograd.grad(loss, (hidden, weight)), (hidden, weight, targets)


@pytest.mark.parametrize("engine,device", ENGINES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_weight_accumulation_matches_reference(engine, device, op, small_chunks, monkeypatch):
    """bf16 dW summed over 17 chunks in bf16 stays within the bf16 gradient tolerance of
    float64; dh is untouched by the setting (bitwise), dW is not (the setting is live)."""
    (dh_w, dw_w), (hidden, weight, targets) = _grads(op, engine, device, torch.bfloat16, "weight",
                                                     monkeypatch)
    (dh_f, dw_f), _ = _grads(op, engine, device, torch.bfloat16, "fp32", monkeypatch)
    h64 = hidden.detach().double().cpu().requires_grad_()
    w64 = weight.detach().double().cpu().requires_grad_()
    ref = torch.autograd.grad(OPS[op](h64, w64, targets.cpu(), "reference"), (h64, w64))
    assert dw_w.dtype == torch.bfloat16
    assert rel_err(dw_w, ref[1]) <= GRAD_TOL[torch.bfloat16]
    assert rel_err(dw_f, ref[1]) <= GRAD_TOL[torch.bfloat16]
    assert torch.equal(dh_w, dh_f)
    assert not torch.equal(dw_w, dw_f)


@pytest.mark.parametrize("engine,device", ENGINES)
@pytest.mark.parametrize("mode", ["fp32", "weight"])
def test_no_fp32_weight_sized_buffer_in_weight_mode(engine, device, mode, small_chunks, monkeypatch):
    """'weight' allocates no fp32 [V, H] tensor; 'fp32' does (so the recorder sees it)."""
    monkeypatch.setattr(chunked, "DW_ACCUMULATION", mode)
    hidden, weight, targets = head_inputs(N, H, V, torch.bfloat16, device, seed=2,
                                          requires_grad=True)
    with BuffersMade() as rec:
        _ppo(hidden, weight, targets, engine).backward()
        _logprobs(hidden, weight, targets, engine).backward()
    assert ((V, H), torch.bfloat16) in rec.made or mode == "fp32"
    assert (((V, H), torch.float32) in rec.made) == (mode == "fp32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_other_weight_dtypes_ignore_the_setting(dtype, small_chunks, monkeypatch):
    """fp32 weights accumulate in fp32 and fp16 weights in fp32 (the scaled fp16 tile)
    either way: identical gradients under both settings."""
    monkeypatch.setattr(chunked, "FP16_COMPUTE_ON_CPU", True)
    (_, dw_f), _ = _grads("ppo_loss", "torch", "cpu", dtype, "fp32", monkeypatch)
    (_, dw_w), _ = _grads("ppo_loss", "torch", "cpu", dtype, "weight", monkeypatch)
    assert torch.equal(dw_f, dw_w)
    assert chunked.dw_accumulation_dtype(dtype) == torch.float32


def test_unknown_setting_is_a_named_error(monkeypatch):
    monkeypatch.setattr(chunked, "DW_ACCUMULATION", "bf16")
    hidden, weight, targets = head_inputs(5, 8, 13, torch.bfloat16, "cpu", requires_grad=True)
    with pytest.raises(ValueError, match="CEPO_KERNELS_DW_ACCUMULATION"):
        _ppo(hidden, weight, targets, "torch").backward()


def test_chunk_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("CEPO_KERNELS_GPU_CHUNK_MB", "512")
    assert triton_ops._env_mib("CEPO_KERNELS_GPU_CHUNK_MB", 2048) == 512 << 20
    monkeypatch.delenv("CEPO_KERNELS_GPU_CHUNK_MB")
    assert triton_ops._env_mib("CEPO_KERNELS_GPU_CHUNK_MB", 2048) == 2 << 30
    for bad in ("0", "half", "-5", "1.5"):
        monkeypatch.setenv("CEPO_KERNELS_GPU_CHUNK_MB", bad)
        with pytest.raises(ValueError, match="CEPO_KERNELS_GPU_CHUNK_MB"):
            triton_ops._env_mib("CEPO_KERNELS_GPU_CHUNK_MB", 2048)
