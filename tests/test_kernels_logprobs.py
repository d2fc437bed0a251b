"""fused_logprobs against the float64 reference: values, gradients, edges."""

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels import reference, triton_ops
from kernel_cases import ENGINES, GRAD_TOL, TOL, grads, head_inputs, rel_err

SHAPES = [(1, 16, 67), (37, 24, 101), (50, 40, 257)]  # N, H, V: V never a tile multiple


@pytest.fixture(params=[None, 3], ids=["one-split", "three-splits"])
def splits(request, monkeypatch):
    """Run the Triton forward with one vocabulary split and with several (atomic ticket)."""
    monkeypatch.setattr(triton_ops, "FORCE_NUM_SPLITS", request.param)
    return request.param


def _loss(out):
    # weights on every output so each gradient path (lp, lse, entropy) is exercised
    w = torch.linspace(0.5, 1.5, out.logprobs.shape[0], device=out.logprobs.device)
    return (w * out.logprobs).sum() + 0.3 * (w * out.entropy).sum() - 0.2 * out.logsumexp.sum()


@pytest.mark.parametrize("engine,device", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(engine, device, dtype, n, h, v, temperature, splits):
    if engine == "torch" and splits is not None:
        pytest.skip("splits only apply to the Triton kernel")
    hidden, weight, targets = head_inputs(n, h, v, dtype, device, seed=n + v, scale=2.0,
                                          ignore=(3, 5), requires_grad=True)
    out = ck.fused_logprobs(hidden, weight, targets, temperature=temperature,
                            return_entropy=True, backend=engine)
    ref = reference.fused_logprobs(hidden, weight, targets, temperature=temperature,
                                   return_entropy=True)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (n,)
    for got, want in zip(out, ref):
        assert rel_err(got, want) <= TOL[dtype]
    assert (out.logprobs[targets == -100] == 0).all()
    g_out = grads(_loss(out), hidden, weight)
    g_ref = grads(_loss(ref), hidden, weight)
    for got, want in zip(g_out, g_ref):
        assert got.dtype == dtype
        assert rel_err(got, want) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("engine,device", ENGINES)
def test_ignored_targets_get_no_gradient(engine, device):
    hidden, weight, targets = head_inputs(9, 16, 45, torch.float32, device, requires_grad=True)
    targets[:] = -100
    targets[4] = 7
    out = ck.fused_logprobs(hidden, weight, targets, backend=engine)
    (g_h,) = grads(out.logprobs.sum(), hidden)
    assert (out.logprobs[targets == -100] == 0).all()
    assert (g_h[targets == -100] == 0).all() and g_h[4].abs().sum() > 0


@pytest.mark.parametrize("engine,device", ENGINES)
@pytest.mark.parametrize("scale", [300.0, -300.0], ids=["huge", "very-negative"])
def test_extreme_logits(engine, device, scale):
    """Logits of magnitude ~1e3-1e4 must neither overflow nor lose the target."""
    hidden, weight, targets = head_inputs(17, 32, 101, torch.float32, device, scale=scale,
                                          requires_grad=True)
    out = ck.fused_logprobs(hidden, weight, targets, return_entropy=True, backend=engine)
    ref = reference.fused_logprobs(hidden, weight, targets, return_entropy=True)
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all()
    assert ref.logprobs.abs().max() > 100  # the case is really extreme
    assert rel_err(out.logprobs, ref.logprobs) <= 1e-5
    assert rel_err(out.logsumexp, ref.logsumexp) <= 1e-5
    (g,) = grads(out.logprobs.sum(), hidden)
    (g_ref,) = grads(ref.logprobs.sum(), hidden)
    assert rel_err(g, g_ref) <= 1e-5


@pytest.mark.parametrize("engine,device", ENGINES)
def test_empty_batch(engine, device):
    hidden, weight, targets = head_inputs(0, 16, 33, torch.float32, device, requires_grad=True)
    out = ck.fused_logprobs(hidden, weight, targets, return_entropy=True, backend=engine)
    assert out.logprobs.shape == (0,) and out.entropy.shape == (0,)
    g_h, g_w = grads(out.logprobs.sum() + out.logsumexp.sum(), hidden, weight)
    assert g_h.shape == (0, 16) and (g_w == 0).all()


def test_fp16_inputs_accumulate_in_fp32():
    hidden, weight, targets = head_inputs(21, 24, 99, torch.float16, "cpu", requires_grad=True)
    out = ck.fused_logprobs(hidden, weight, targets, backend="torch")
    ref = reference.fused_logprobs(hidden, weight, targets)
    assert out.logprobs.dtype == torch.float32
    assert rel_err(out.logprobs, ref.logprobs) <= 1e-2


@pytest.mark.parametrize("engine,device", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference_without_entropy(engine, device, dtype, n, h, v, temperature):
    """The forward without entropy (the common call; on the CPU path an in-place
    log-softmax of each chunk, lse = u_y - log p_y): log-probs AND logsumexp against
    float64, then the gradients through both."""
    hidden, weight, targets = head_inputs(n, h, v, dtype, device, seed=n + v + 1, scale=2.0,
                                          ignore=(3, 5), requires_grad=True)
    out = ck.fused_logprobs(hidden, weight, targets, temperature=temperature, backend=engine)
    ref = reference.fused_logprobs(hidden, weight, targets, temperature=temperature)
    assert out.entropy is None
    assert rel_err(out.logprobs, ref.logprobs) <= TOL[dtype]
    assert rel_err(out.logsumexp, ref.logsumexp) <= TOL[dtype]
    assert (out.logprobs[targets == -100] == 0).all()
    w = torch.linspace(0.5, 1.5, n, device=device)
    for got, want in zip(grads((w * out.logprobs).sum() - 0.2 * out.logsumexp.sum(), hidden, weight),
                         grads((w * ref.logprobs).sum() - 0.2 * ref.logsumexp.sum(), hidden, weight)):
        assert rel_err(got, want) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("v", [32_001, 151_936])
def test_real_vocab_sizes_chunked(v, monkeypatch):
    """Vocabulary sizes of real models, several ragged row chunks, on the CPU path.

    In float64 the chunked algorithm must match the reference to rounding. In fp32 the
    gradient w.r.t. hidden sums ~1e5 terms, and plain PyTorch fp32 (log_softmax +
    autograd) itself lands ~1e-5..4e-5 from float64 here: ours must stay within 2x of it.
    """
    from cepo_kernels import chunked
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 2 * v)  # chunks of 2 rows: 3 chunks, the last ragged
    hidden, weight, targets = head_inputs(5, 8, v, torch.float32, "cpu", scale=3.0,
                                          requires_grad=True)
    targets[0] = v - 1  # the last row of the head, in the ragged last tile
    out = ck.fused_logprobs(hidden, weight, targets, return_entropy=True, backend="torch")
    ref = reference.fused_logprobs(hidden, weight, targets, return_entropy=True)
    for got, want in zip(out, ref):
        assert rel_err(got, want) <= 1e-5
    g_ref = grads(_loss(ref), hidden, weight)
    g_out = grads(_loss(out), hidden, weight)
    naive = torch.log_softmax(hidden @ weight.T, dim=-1)
    naive_out = type(out)(naive.gather(1, targets[:, None])[:, 0], torch.logsumexp(hidden @ weight.T, -1),
                          -(naive.exp() * naive).sum(-1))
    g_naive = grads(_loss(naive_out), hidden, weight)
    for got, want, base in zip(g_out, g_ref, g_naive):
        assert rel_err(got, want) <= max(1e-5, 2 * rel_err(base, want))
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    out64 = ck.fused_logprobs(h64, w64, targets, return_entropy=True, backend="torch")
    ref64 = reference.fused_logprobs(h64, w64, targets, return_entropy=True)
    for got, want in zip(grads(_loss(out64), h64, w64), grads(_loss(ref64), h64, w64)):
        assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True], ids=["in-place-softmax", "own-u"])
def test_real_vocab_bf16_chunked(with_entropy, temperature, monkeypatch):
    """bf16 on the CPU path at a real vocabulary size, several ragged chunks: without
    entropy the tempered logits go into the probability buffer and the softmax runs in
    place over rows much longer than its vector blocks (at T = 1 the backward forms its
    tile from a bf16 softmax, ``chunked._bf16_tile``); with entropy u has its own buffer.
    All must match the float64 reference, values and gradients."""
    from cepo_kernels import chunked
    v = 32_001
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 2 * v)
    hidden, weight, targets = head_inputs(7, 8, v, torch.bfloat16, "cpu", scale=3.0,
                                          requires_grad=True)
    out = ck.fused_logprobs(hidden, weight, targets, return_entropy=with_entropy,
                            backend="torch", temperature=temperature)
    ref = reference.fused_logprobs(hidden, weight, targets, return_entropy=with_entropy,
                                   temperature=temperature)
    for got, want in zip(out, ref):
        if want is not None:
            assert rel_err(got, want) <= TOL[torch.bfloat16]
    if temperature == 1.0:  # the target logit enters lp exactly (a bf16-rounded one: ~2e-4)
        assert rel_err(out.logprobs, ref.logprobs) <= 1e-4
    w = torch.linspace(0.5, 1.5, 7)
    loss_out = (w * out.logprobs).sum() - 0.2 * out.logsumexp.sum()
    loss_ref = (w * ref.logprobs).sum() - 0.2 * ref.logsumexp.sum()
    for got, want in zip(grads(loss_out, hidden, weight), grads(loss_ref, hidden, weight)):
        assert rel_err(got, want) <= GRAD_TOL[torch.bfloat16]


def test_gradcheck_reference_and_chunked_float64():
    """Analytic gradients in float64: the reference (autograd) and the chunked engine."""
    hidden, weight, targets = head_inputs(6, 5, 13, torch.float64, "cpu", ignore=(2,),
                                          requires_grad=True)
    for engine in ("reference", "torch"):
        def f(h, w):
            out = ck.fused_logprobs(h, w, targets, temperature=0.8, return_entropy=True,
                                    backend=engine)
            return out.logprobs, out.logsumexp, out.entropy
        assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-6, atol=1e-7)
