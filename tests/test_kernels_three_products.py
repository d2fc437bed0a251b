"""The three-product PPO path (logits chunk once, dz in place, dh / dW as GEMMs).

Checked against the float64 reference and against plain autograd through materialised
fp32 logits, on rows of every kind (masked, ignored target, clipped low, clipped high,
A = 0, inside the clip range), over several row chunks, so that skipping the rows whose
gradient coefficient is zero is proved harmless; plus the fp16 gradient scaling.
"""

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels import chunked, reference, triton_ops
from kernel_cases import ENGINES, GRAD_TOL, TOL, OpsInside, grads, head_inputs, rel_err

CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def every_kind_of_row(n, h, v, dtype, device, seed=0, temperature=1.0):
    """Inputs whose rows cycle through: kept inside the clip range, masked, ignored target,
    A = 0, clipped low (A < 0, r < 0.8), clipped high (A > 0, r > 1.28)."""
    hidden, weight, targets = head_inputs(n, h, v, dtype, device, seed=seed, scale=2.0,
                                          requires_grad=True)
    with torch.no_grad():
        lp = reference.fused_logprobs(hidden, weight, targets,
                                      temperature=temperature).logprobs.float().cpu()
    g = torch.Generator().manual_seed(seed + 7)
    adv = torch.randn(n, generator=g).abs() + 0.1
    old = lp + 0.05 * torch.randn(n, generator=g)
    mask = torch.ones(n, dtype=torch.bool)
    kind = torch.arange(n) % 6
    mask[kind == 1] = False
    targets_cpu = targets.cpu().clone()
    targets_cpu[kind == 2] = -100
    adv[kind == 3] = 0.0
    adv[kind == 4] *= -1.0
    old[kind == 4] = lp[kind == 4] + 0.5  # r = e^-0.5 = 0.61 < 0.8 with A < 0: clipped low
    old[kind == 5] = lp[kind == 5] - 0.5  # r = e^0.5 = 1.65 > 1.28 with A > 0: clipped high
    to = dict(device=device)
    return hidden, weight, targets_cpu.to(**to), old.to(**to), adv.to(**to), mask.to(**to), kind


def naive_autograd_loss(hidden, weight, targets, old, adv, mask, temperature):
    """The PPO loss the plain way: fp32 [N, V] logits, log_softmax, autograd."""
    z = (hidden.float() @ weight.float().T) / temperature
    valid = targets != -100
    lp = torch.log_softmax(z, -1).gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    ratio = torch.exp(lp - old.float())
    per = -torch.minimum(ratio * adv, ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH) * adv)
    m = (mask & valid).float()
    return (per * m).sum() / m.sum().clamp(min=1.0)


@pytest.fixture(params=[1 << 30, 300], ids=["one-chunk", "many-chunks"])
def chunk_elements(request, monkeypatch):
    """One chunk for all rows, or chunks of a few rows (several chunks, a ragged last one)."""
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", request.param)
    return request.param


@pytest.mark.parametrize("engine,device", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_kind_of_row(engine, device, dtype, chunk_elements):
    n, h, v, temp = 47, 24, 97, 0.8
    hidden, weight, targets, old, adv, mask, kind = every_kind_of_row(n, h, v, dtype, device,
                                                                      temperature=temp)
    kw = dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, temperature=temp)
    loss, stats = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask,
                                           backend=engine, **kw)
    ref_loss, ref_stats = reference.fused_linear_ppo_loss(hidden, weight, targets, old, adv,
                                                          mask, **kw)
    assert stats.clip_frac_low > 0 and stats.clip_frac_high > 0  # both clips really bind
    assert rel_err(loss, ref_loss) <= TOL[dtype]
    g_h, g_w = grads(loss, hidden, weight)
    r_h, r_w = grads(ref_loss, hidden, weight)
    assert rel_err(g_h, r_h) <= GRAD_TOL[dtype] and rel_err(g_w, r_w) <= GRAD_TOL[dtype]
    # rows that contribute nothing get exactly zero gradient
    zero_rows = (kind == 1) | (kind == 2) | (kind == 3) | (kind == 4) | (kind == 5)
    assert (g_h[zero_rows.to(g_h.device)] == 0).all()
    assert (g_h[(kind == 0).to(g_h.device)] != 0).any()
    if dtype == torch.float32:  # and plain autograd through materialised logits agrees
        n_loss = naive_autograd_loss(hidden, weight, targets, old, adv, mask, temp)
        n_h, n_w = grads(n_loss, hidden, weight)
        torch.testing.assert_close(loss, n_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_h, n_h, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g_w, n_w, rtol=1e-4, atol=1e-7)


def test_skipping_zero_rows_changes_nothing(monkeypatch):
    """Dropping zero-coefficient rows from the GEMMs (CPU) gives the same gradients."""
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 500)
    hidden, weight, targets, old, adv, mask, _ = every_kind_of_row(53, 16, 89, torch.float32, "cpu")
    out = {}
    for skip in (True, False):
        monkeypatch.setattr(chunked, "SKIP_ZERO_ROWS", skip)
        loss, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask,
                                           return_entropy=True, backend="torch")
        out[skip] = (loss, *grads(loss, hidden, weight))
        lp_out = ck.fused_logprobs(hidden, weight, targets, return_entropy=True, backend="torch")
        w = torch.where(mask, 1.0, 0.0)  # a zero upstream gradient on the masked rows
        out[skip] += tuple(grads((w * lp_out.logprobs).sum() + (w * lp_out.entropy).sum(),
                                 hidden, weight))
    # equal up to fp32 rounding: fewer rows change the GEMM's shape, and with several BLAS
    # threads its summation order (seen at 2 threads: 7e-7 absolute on gradients of ~0.1)
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ppo_loss_runs_three_products(monkeypatch):
    """Count the [rows, V] x [V, H]-sized matmuls: three per chunk for the loss (no
    recompute), four for the log-prob op's forward + backward."""
    monkeypatch.setattr(chunked, "SKIP_ZERO_ROWS", False)
    n, h, v = 64, 16, 200
    # 4 chunks of 16 rows: fp32 without entropy runs its softmax in place, 4 bytes of
    # scratch per logit, so 8 x TILE_ELEMENTS bytes hold 16 rows of v
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 8 * v)
    hidden_, weight_ = torch.zeros(n, h), torch.zeros(v, h)
    assert chunked._Scratch(n, chunked._Head(hidden_, weight_), need_log_p=False).rows == 16
    hidden, weight, targets = head_inputs(n, h, v, torch.float32, "cpu", requires_grad=True)
    g = torch.Generator().manual_seed(3)
    adv, old = torch.randn(n, generator=g), torch.randn(n, generator=g) - 5
    mask = torch.ones(n, dtype=torch.bool)

    class CountHeadProducts(OpsInside):
        def __init__(self):
            super().__init__()
            self.count = 0

        def seen(self, func, args, out):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "addmm_", "bmm", "matmul"):  # matmul: not decomposed here
                shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                if any(v in s for s in shapes):  # a product with the vocabulary dimension
                    self.count += 1

    with CountHeadProducts() as c:
        loss, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, backend="torch")
        grads(loss, hidden, weight)
    assert c.count == 3 * 4
    with CountHeadProducts() as c, torch.no_grad():  # forward only: no gradient products
        ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, backend="torch")
    assert c.count == 1 * 4
    with CountHeadProducts() as c:
        out = ck.fused_logprobs(hidden, weight, targets, backend="torch")
        grads(out.logprobs.sum(), hidden, weight)
    assert c.count == 4 * 4


def test_fp16_gradient_does_not_underflow(monkeypatch):
    """A PPO coefficient ~1e-4 times p ~ 1/V is below fp16's smallest subnormal: the tile
    is scaled by a power of two before the fp16 GEMMs (forced on CPU here, as on CUDA)."""
    monkeypatch.setattr(chunked, "FP16_COMPUTE_ON_CPU", True)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 4000)
    n, h, v = 40, 16, 2000
    hidden, weight, targets = head_inputs(n, h, v, torch.float16, "cpu", requires_grad=True)
    g = torch.Generator().manual_seed(11)
    adv = torch.randn(n, generator=g)
    mask = torch.ones(n, dtype=torch.bool)
    # a global normaliser of a big batch makes every coefficient tiny (~1e-5)
    kw = dict(normalizer=1e5)
    loss, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, None, adv, mask, backend="torch",
                                       **kw)
    ref, _ = reference.fused_linear_ppo_loss(hidden, weight, targets, None, adv, mask, **kw)
    g_out, g_ref = grads(loss, hidden, weight), grads(ref, hidden, weight)
    for got, want in zip(g_out, g_ref):
        assert got.dtype == torch.float16
        assert rel_err(got.float(), want) <= 2e-2
    # without the scale the same tile would have flushed to zero
    p = torch.softmax(hidden.detach().float() @ weight.detach().float().T, -1)
    assert ((p * 1e-5).half() == 0).float().mean() > 0.5
    assert chunked.grad_scale(torch.full((3,), 1e-5), torch.full((3,), 1e-5), None,
                              torch.float16).item() >= 2 ** 15


@pytest.mark.parametrize("engine,device", ENGINES)
def test_log_prob_backward_many_chunks(engine, device, chunk_elements):
    """The four-product log-prob backward with entropy and temperature over several chunks."""
    hidden, weight, targets = head_inputs(45, 24, 103, torch.float32, device, scale=2.0,
                                          ignore=(2, 9), requires_grad=True)
    out = ck.fused_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True,
                            backend=engine)
    ref = reference.fused_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True)
    wts = torch.linspace(-1, 1, 45, device=hidden.device)

    def f(o):
        return (wts * o.logprobs).sum() + 0.5 * (wts * o.entropy).sum() + 0.1 * o.logsumexp.sum()

    for got, want in zip(grads(f(out), hidden, weight), grads(f(ref), hidden, weight)):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.skipif(not triton_ops.backend.interpreting(), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("n", [1, 70])
def test_triton_forward_rasterisation_and_splits(splits, n, monkeypatch):
    """The grouped (row block, split) order with a ragged last group (70 rows = 5 row blocks
    of 16 per context, 15 for three contexts, in groups of 2), and split counts that do and
    do not divide the vocabulary (151 = 5 tiles of 32)."""
    monkeypatch.setattr(triton_ops, "FORCE_NUM_SPLITS", splits)
    h, v = 16, 151
    h_pol, weight, targets = head_inputs(n, h, v, torch.float32, "cpu", seed=n, scale=2.0,
                                         ignore=(0,))
    g = torch.Generator().manual_seed(n)
    h_pos = h_pol + 0.4 * torch.randn(n, h, generator=g)
    h_neg = h_pol + 0.4 * torch.randn(n, h, generator=g)
    adv = torch.randn(n, generator=g)
    has_neg = torch.rand(n, generator=g) > 0.3
    out = ck.contrastive_evidence(h_pol, h_pos, h_neg, weight, targets, adv, has_neg, lam=0.4,
                                  eps_w=0.2, temperature=0.7, backend="triton")
    ref = reference.contrastive_evidence(h_pol, h_pos, h_neg, weight, targets, adv, has_neg,
                                         lam=0.4, eps_w=0.2, temperature=0.7)
    for name in ("lp_policy", "lp_pos", "lp_neg", "delta", "token_advantages"):
        assert rel_err(getattr(out, name), getattr(ref, name)) <= 1e-5, name
    lp = ck.fused_logprobs(h_pol, weight, targets, temperature=0.7, return_entropy=True,
                           backend="triton")
    lp_ref = reference.fused_logprobs(h_pol, weight, targets, temperature=0.7,
                                      return_entropy=True)
    for got, want in zip(lp, lp_ref):
        assert rel_err(got, want) <= 1e-5
