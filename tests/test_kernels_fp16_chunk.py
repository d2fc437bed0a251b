"""LOGITS_GEMM='triton-fp16': the gradient chunk kept in 2 bytes a logit (fp16 z minus its
tile's row maximum, plus fp32 offsets), under the interpreter, against float64 and against
the fp32 chunk."""

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels import backend, chunked, reference, triton_ops
from kernel_cases import GRAD_TOL, TOL, BuffersMade, grads, head_inputs, rel_err
from test_kernels_self_distill import distill_inputs

pytestmark = pytest.mark.skipif(not (backend.triton_available() and backend.interpreting()),
                                reason="needs triton and TRITON_INTERPRET=1")

H, V = 40, 261  # V: no multiple of the tile (32) or of the offset block (16)


def _losses(hidden, weight, targets, temperature, engine_kw):
    """(log-prob loss with entropy, PPO loss) through the op, or the reference (engine_kw None)."""
    n = hidden.shape[0]
    w = torch.linspace(0.5, 1.5, n)
    gen = torch.Generator().manual_seed(2)
    adv = torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) > 0.2
    mask[0] = True
    with torch.no_grad():
        old = reference.fused_logprobs(hidden, weight, targets, temperature=temperature).logprobs
    old = old.float() + 0.1 * torch.randn(n, generator=gen)
    mod = ck if engine_kw is not None else reference
    kw = engine_kw or {}
    out = mod.fused_logprobs(hidden, weight, targets, temperature=temperature,
                             return_entropy=True, **kw)
    lp_loss = (w * out.logprobs).sum() + 0.3 * (w * out.entropy).sum()
    ppo, _ = mod.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask,
                                       temperature=temperature, **kw)
    return lp_loss, ppo


def _grads_under(source, hidden, weight, targets, temperature, monkeypatch):
    monkeypatch.setattr(triton_ops, "LOGITS_GEMM", source)
    lp_loss, ppo = _losses(hidden, weight, targets, temperature, dict(backend="triton"))
    return ppo.detach(), grads(lp_loss, hidden, weight) + grads(ppo, hidden, weight)


@pytest.mark.parametrize("dtype,n,splits,off_block", [
    pytest.param(torch.bfloat16, 37, None, None, id="bf16"),
    pytest.param(torch.bfloat16, 37, 3, 16, id="bf16-three-splits-two-slots-a-tile"),
    pytest.param(torch.float16, 37, 3, None, id="fp16-three-splits"),
    pytest.param(torch.bfloat16, 1, None, 16, id="bf16-one-row-two-slots-a-tile"),
])
def test_fp16_chunk_matches_reference_and_fp32_chunk(dtype, n, splits, off_block, monkeypatch):
    """Log-prob (with entropy, T 0.7, ignored rows) and PPO gradients: within the 16-bit
    tolerance of float64, and within 2e-3 of the fp32 chunk's (the offsets keep the fp16
    rounding off the logits that carry probability)."""
    monkeypatch.setattr(triton_ops, "FORCE_NUM_SPLITS", splits)
    monkeypatch.setattr(triton_ops, "OFFSET_BLOCK", off_block)
    hidden, weight, targets = head_inputs(n, H, V, dtype, "cpu", seed=n, scale=3.0,
                                          ignore=(5, 77), requires_grad=True)
    loss16, g16 = _grads_under("triton-fp16", hidden, weight, targets, 0.7, monkeypatch)
    loss32, g32 = _grads_under("triton", hidden, weight, targets, 0.7, monkeypatch)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref_lp, ref_ppo = _losses(h64, w64, targets, 0.7, None)
    g_ref = grads(ref_lp, h64, w64) + grads(ref_ppo, h64, w64)
    assert rel_err(loss16, ref_ppo) <= TOL[dtype]
    for got, fp32_chunk, want in zip(g16, g32, g_ref):
        assert got.dtype == dtype
        assert rel_err(got, want) <= GRAD_TOL[dtype]
        assert rel_err(got, fp32_chunk) <= 2e-3


@pytest.mark.parametrize("scale", [300.0, -300.0], ids=["huge", "very-negative"])
def test_fp16_chunk_with_extreme_logits(scale, monkeypatch):
    """|z| ~ 1e3-1e4 (beyond fp16's 2^-11 relative precision for raw logits, near its
    range): the offsets keep every gradient finite and right."""
    hidden, weight, targets = head_inputs(17, 32, 101, torch.bfloat16, "cpu", scale=scale,
                                          requires_grad=True)
    assert (hidden.float() @ weight.float().T).abs().max() > 1000
    _, g16 = _grads_under("triton-fp16", hidden, weight, targets, 1.0, monkeypatch)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref_lp, ref_ppo = _losses(h64, w64, targets, 1.0, None)
    for got, want in zip(g16, grads(ref_lp, h64, w64) + grads(ref_ppo, h64, w64)):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) <= GRAD_TOL[torch.bfloat16]


def _distill(source, inputs, kw, monkeypatch):
    hs, ht, weight, targets, mask, _ = inputs
    if source is None:
        h64 = hs.detach().double().requires_grad_()
        w64 = weight.detach().double().requires_grad_()
        loss, _ = reference.fused_linear_self_distill_loss(h64, ht.detach().double(), w64, targets,
                                                           mask, **kw)
        return loss, grads(loss, h64, w64)
    monkeypatch.setattr(triton_ops, "LOGITS_GEMM", source)
    loss, _ = ck.fused_linear_self_distill_loss(hs, ht, weight, targets, mask, backend="triton", **kw)
    return loss.detach(), grads(loss, hs, weight)


@pytest.mark.parametrize("dtype,divergence,off_block", [
    pytest.param(torch.bfloat16, "jsd", 16, id="bf16-jsd-two-slots-a-tile"),
    pytest.param(torch.bfloat16, "reverse_kl", None, id="bf16-reverse-kl"),
    pytest.param(torch.float16, "forward_kl", None, id="fp16-forward-kl"),
    pytest.param(torch.float32, "jsd", None, id="fp32-keeps-the-fp32-chunk"),
])
def test_fp16_chunk_self_distill(dtype, divergence, off_block, monkeypatch):
    """The self-distillation loss with the student's and the teacher's chunks from our
    forward kernel, fp32 ('triton') and fp16 plus offsets ('triton-fp16', bf16 dz in place),
    over five row chunks, T 0.7, token weights, masked and ignored rows: loss and gradients
    within the tolerance of float64, the fp16 chunks within 2e-3 of the fp32 chunks' (fp32
    heads keep the fp32 chunk: equal)."""
    monkeypatch.setattr(chunked, "FP16_COMPUTE_ON_CPU", True)  # fp16 products, as on CUDA
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 8 * V)  # 8 rows a chunk
    monkeypatch.setattr(triton_ops, "OFFSET_BLOCK", off_block)
    inputs = distill_inputs(37, H, V, dtype, "cpu", seed=3)
    kw = dict(divergence=divergence, beta=0.3, temperature=0.7, token_weights=inputs[5])
    ref_loss, g_ref = _distill(None, inputs, kw, monkeypatch)
    loss32, g32 = _distill("triton", inputs, kw, monkeypatch)
    loss16, g16 = _distill("triton-fp16", inputs, kw, monkeypatch)
    for loss in (loss32, loss16):
        assert rel_err(loss, ref_loss) <= TOL[dtype]
    for got, fp32_chunk, want in zip(g16, g32, g_ref):
        assert got.dtype == dtype
        assert rel_err(fp32_chunk, want) <= GRAD_TOL[dtype]
        assert rel_err(got, want) <= GRAD_TOL[dtype]
        if dtype == torch.float32:
            assert torch.equal(got, fp32_chunk)
        else:
            assert rel_err(got, fp32_chunk) <= 2e-3


def test_fp16_chunk_self_distill_buffers(monkeypatch):
    """bf16 self-distillation under 'triton-fp16': two fp16 chunks plus offsets, dz written
    in the student's chunk (no bf16 [rows, V] buffer), never an fp32 [rows, V] chunk."""
    monkeypatch.setattr(triton_ops, "LOGITS_GEMM", "triton-fp16")
    hs, ht, weight, targets, mask, _ = distill_inputs(20, H, V, torch.bfloat16, "cpu")
    with BuffersMade() as rec:
        loss, _ = ck.fused_linear_self_distill_loss(hs, ht, weight, targets, mask, backend="triton")
        torch.autograd.grad(loss, [hs, weight])
    assert rec.made.count(((20, V), torch.float16)) == 2  # student and teacher
    assert ((20, -(-V // 32)), torch.float32) in rec.made
    assert ((20, V), torch.float32) not in rec.made
    assert ((20, V), torch.bfloat16) not in rec.made


def test_self_distill_rows_on_cuda():
    """The CUDA budget per self-distillation logit: two chunks, plus dz where it cannot be
    written in place (bf16 dz in an fp32 chunk; fp16's fp32 dz before its scale)."""
    cuda = torch.device("cuda", 0)
    vocab, n = 151_936, 1 << 20
    budget = triton_ops.GPU_CHUNK_BYTES
    for source, dz_dtype, per_logit in [("library", torch.bfloat16, 10), ("library", torch.float32, 8),
                                        ("triton", torch.bfloat16, 10), ("library", None, 8),
                                        ("triton-fp16", torch.bfloat16, 4),
                                        ("triton-fp16", torch.float32, 8), ("triton-fp16", None, 4)]:
        rows = triton_ops._distill_chunk_rows(n, vocab, cuda, source, dz_dtype)
        assert rows == budget // (per_logit * vocab), (source, dz_dtype)


def test_fp16_chunk_buffers(monkeypatch):
    """The path keeps its chunk in fp16 with fp32 offsets per 32 columns, never an fp32
    [rows, V] chunk; fp32 weights keep the fp32 chunk ('triton') under the same setting."""
    monkeypatch.setattr(triton_ops, "LOGITS_GEMM", "triton-fp16")
    n = 20
    hidden, weight, targets = head_inputs(n, H, V, torch.bfloat16, "cpu", requires_grad=True)
    with BuffersMade() as rec:
        loss, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, None, torch.randn(n),
                                           torch.ones(n, dtype=torch.bool), backend="triton")
    assert ((n, V), torch.float16) in rec.made
    assert ((n, -(-V // 32)), torch.float32) in rec.made
    assert ((n, V), torch.float32) not in rec.made
    assert triton_ops.logits_source(torch.float32) == "triton"
    assert triton_ops.logits_source(torch.bfloat16) == "triton-fp16"


def test_fp16_chunk_rows_on_cuda():
    """On CUDA the chunk budget holds 3x the rows: 2 bytes a logit (dz in place) against 6."""
    cuda = torch.device("cuda", 0)
    vocab, n = 151_936, 1 << 20
    lib = triton_ops._chunk_rows(n, vocab, cuda, "library")
    compact = triton_ops._chunk_rows(n, vocab, cuda, "triton-fp16")
    assert lib == triton_ops.GPU_CHUNK_BYTES // (6 * vocab)
    assert compact == triton_ops.GPU_CHUNK_BYTES // (2 * vocab)


def test_offset_buffer_is_checked():
    hidden, weight, targets = head_inputs(8, H, V, torch.bfloat16, "cpu")
    z = torch.empty(8, V, dtype=torch.float16)
    bad = [(torch.empty(8, V), torch.empty(8, -(-V // 32)), 32),  # fp32 z
           (z, torch.empty(8, 3), 32),  # wrong offset width
           (z, torch.empty(8, -(-V // 24)), 24)]  # 24 does not divide the 32-wide tile
    for z_out, off, block in bad:
        with pytest.raises(ValueError, match="z_off"):
            triton_ops._launch_forward([hidden], weight, targets, 1.0, False, z_out=z_out,
                                       z_off=(off, block))


def test_unknown_logits_gemm_lists_the_choices(monkeypatch):
    monkeypatch.setattr(triton_ops, "LOGITS_GEMM", "fp8")
    with pytest.raises(ValueError, match="triton-fp16"):
        triton_ops.logits_source(torch.bfloat16)
