"""The Triton kernels with the tile sizes CUDA runs, under the interpreter.

The interpreter tests elsewhere use one small tile (``triton_ops.INTERPRETER_CONFIG``); on
a GPU the forward autotunes over ``CUDA_CONFIGS`` and the row kernels use ``ROW_BLOCK``,
and ``bench/gpu_check.py`` can verify only the configuration the autotuner picks for its
shapes. Here every one of them runs against float64 before any GPU sees it, at sizes that
make each tile ragged: 133 rows (a full 128-row block and a partial one), H 96 (1.5
blocks of 64, under one of 128), V 517 and 1,100 (no multiple of 128, 256 or 1,024).
"""

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels import backend, reference, triton_ops
from kernel_cases import GRAD_TOL, TOL, grads, head_inputs, rel_err

pytestmark = pytest.mark.skipif(not (backend.triton_available() and backend.interpreting()),
                                reason="needs triton and TRITON_INTERPRET=1")

N, H = 133, 96
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _config_id(cfg):
    m, v, d, warps, stages = cfg
    return f"m{m}-v{v}-d{d}"


@pytest.fixture
def cuda_row_block(monkeypatch):
    """The row kernels (statistics and gradient tile of the backward) with CUDA's block."""
    monkeypatch.setattr(triton_ops, "ROW_BLOCK_INTERPRET", dict(triton_ops.ROW_BLOCK))


@pytest.mark.parametrize("cfg", triton_ops.CUDA_CONFIGS, ids=_config_id)
@pytest.mark.parametrize("splits", [None, 3], ids=["one-split", "three-splits"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_forward_with_each_cuda_tile(cfg, splits, dtype, tma, monkeypatch):
    """The three-context forward and its CEPO epilogue, and one context with entropy at
    T 0.7, for each autotuned tile (GROUP_M 8 as on CUDA: more than the row blocks), with
    pointer loads and with tensor descriptors (Hopper's TMA path: zero-filled edges, a
    block's rows past N read from the next context)."""
    m, v, d = cfg[:3]
    monkeypatch.setattr(triton_ops, "INTERPRETER_CONFIG",
                        dict(BLOCK_M=m, BLOCK_V=v, BLOCK_D=d, GROUP_M=8))
    monkeypatch.setattr(triton_ops, "FORCE_NUM_SPLITS", splits)
    monkeypatch.setattr(triton_ops, "FORCE_TMA", tma)
    made = []
    real = triton_ops._descriptors
    monkeypatch.setattr(triton_ops, "_descriptors", lambda *a: made.append(a) or real(*a))
    vocab = 517
    hs = [head_inputs(N, H, vocab, dtype, "cpu", seed=i, scale=2.0, ignore=(0, 130))[0]
          for i in range(3)]
    _, weight, targets = head_inputs(N, H, vocab, dtype, "cpu", seed=7, ignore=(0, 130))
    gen = torch.Generator().manual_seed(1)
    adv = torch.randn(N, generator=gen)
    has_neg = torch.rand(N, generator=gen) > 0.3
    out = ck.contrastive_evidence(*hs, weight, targets, adv, has_neg, lam=0.5, eps_w=0.2,
                                  backend="triton")
    ref = reference.contrastive_evidence(*hs, weight, targets, adv, has_neg, lam=0.5, eps_w=0.2)
    for name in ("lp_policy", "lp_pos", "lp_neg", "delta", "token_advantages"):
        assert rel_err(getattr(out, name), getattr(ref, name)) <= TOL[dtype], name

    one = ck.fused_logprobs(hs[0], weight, targets, temperature=0.7, return_entropy=True,
                            backend="triton")
    want = reference.fused_logprobs(hs[0], weight, targets, temperature=0.7, return_entropy=True)
    for got, expected in zip(one, want):
        assert rel_err(got, expected) <= TOL[dtype]
    assert len(made) == (2 if tma else 0)  # both launches took the path under test


@pytest.mark.parametrize("logits_gemm,vocab", [("library", 517), ("library", 1100),
                                               ("triton", 517), ("triton-fp16", 517)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_with_cuda_row_block(vocab, dtype, logits_gemm, cuda_row_block, monkeypatch):
    """Log-prob gradients (logits recomputed, then their statistics and dz), the PPO loss's
    and the self-distillation loss's gradients, with the row kernels' CUDA block; the
    gradient chunks' logits from the library GEMM and from the forward kernel (STORE_Z)."""
    monkeypatch.setattr(triton_ops, "LOGITS_GEMM", logits_gemm)
    hidden, weight, targets = head_inputs(N, H, vocab, dtype, "cpu", seed=vocab, scale=2.0,
                                          ignore=(3, 131), requires_grad=True)
    w = torch.linspace(0.5, 1.5, N)

    def loss(out):
        return (w * out.logprobs).sum() + 0.3 * (w * out.entropy).sum() - 0.2 * out.logsumexp.sum()

    out = ck.fused_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True,
                            backend="triton")
    ref = reference.fused_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True)
    for got, want in zip(grads(loss(out), hidden, weight), grads(loss(ref), hidden, weight)):
        assert rel_err(got, want) <= GRAD_TOL[dtype]

    gen = torch.Generator().manual_seed(2)
    old = ref.logprobs.detach().float() + 0.1 * torch.randn(N, generator=gen)
    adv = torch.randn(N, generator=gen)
    mask = torch.rand(N, generator=gen) > 0.2
    kw = dict(clip_low=0.2, clip_high=0.28)
    loss_t, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask,
                                         backend="triton", **kw)
    loss_r, _ = reference.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, **kw)
    assert rel_err(loss_t, loss_r) <= TOL[dtype]
    for got, want in zip(grads(loss_t, hidden, weight), grads(loss_r, hidden, weight)):
        assert rel_err(got, want) <= GRAD_TOL[dtype]

    h_teacher = head_inputs(N, H, vocab, dtype, "cpu", seed=vocab + 1, scale=2.0)[0]
    for kind, beta in (("jsd", 0.5), ("reverse_kl", 1.0)):
        kw = dict(divergence=kind, beta=beta, temperature=0.7)
        loss_t, _ = ck.fused_linear_self_distill_loss(hidden, h_teacher, weight, targets, mask,
                                                      backend="triton", **kw)
        loss_r, _ = reference.fused_linear_self_distill_loss(hidden, h_teacher, weight, targets,
                                                             mask, **kw)
        assert rel_err(loss_t, loss_r) <= TOL[dtype], kind
        for got, want in zip(grads(loss_t, hidden, weight), grads(loss_r, hidden, weight)):
            assert rel_err(got, want) <= GRAD_TOL[dtype], kind


@pytest.mark.parametrize("cfg", triton_ops.CUDA_CONFIGS, ids=_config_id)
@pytest.mark.parametrize("logits_gemm", ["triton", "triton-fp16"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_gradient_chunk_from_each_cuda_tile(cfg, logits_gemm, tma, cuda_row_block, monkeypatch):
    """The gradient chunk written by the forward kernel (STORE_Z: fp32, or fp16 with CUDA's
    128-column offset block, which a 256-wide tile fills two slots of) for each autotuned
    tile, with pointer loads and with tensor descriptors (Hopper's default for bf16), then
    dz with CUDA's row block: the PPO gradients against float64 at V 517 (a partial last
    tile and slot)."""
    m, v, d = cfg[:3]
    monkeypatch.setattr(triton_ops, "INTERPRETER_CONFIG",
                        dict(BLOCK_M=m, BLOCK_V=v, BLOCK_D=d, GROUP_M=8))
    monkeypatch.setattr(triton_ops, "FORCE_TMA", tma)
    made = []
    real = triton_ops._descriptors
    monkeypatch.setattr(triton_ops, "_descriptors", lambda *a: made.append(a) or real(*a))
    monkeypatch.setattr(triton_ops, "OFFSET_BLOCK", min(c[1] for c in triton_ops.CUDA_CONFIGS))
    monkeypatch.setattr(triton_ops, "LOGITS_GEMM", logits_gemm)
    hidden, weight, targets = head_inputs(N, H, 517, torch.bfloat16, "cpu", seed=5, scale=3.0,
                                          ignore=(3, 131), requires_grad=True)
    gen = torch.Generator().manual_seed(2)
    adv = torch.randn(N, generator=gen)
    mask = torch.rand(N, generator=gen) > 0.2
    loss_t, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, None, adv, mask,
                                         temperature=0.7, backend="triton")
    loss_r, _ = reference.fused_linear_ppo_loss(hidden, weight, targets, None, adv, mask,
                                                temperature=0.7)
    assert rel_err(loss_t, loss_r) <= TOL[torch.bfloat16]
    for got, want in zip(grads(loss_t, hidden, weight), grads(loss_r, hidden, weight)):
        assert rel_err(got, want) <= GRAD_TOL[torch.bfloat16]
    assert bool(made) == tma  # the chunk's launch took the loads under test


def test_tma_decision(monkeypatch):
    """Tensor descriptors only where TMA exists and the layout allows it: compute
    capability 9+, bf16 / fp16, 16-byte aligned base and rows; CEPO_KERNELS_TMA=0 and
    FORCE_TMA override (the layout rule still holds when forced)."""
    bf16 = torch.empty(64, 96, dtype=torch.bfloat16)
    w = torch.empty(300, 96, dtype=torch.bfloat16)
    assert triton_ops.tma_compatible(bf16, w)
    assert not triton_ops.tma_compatible(torch.empty(64, 100, dtype=torch.bfloat16))  # 200-byte rows
    assert not triton_ops.tma_compatible(bf16[:, 1:])  # base 2 bytes off
    assert not triton_ops.tma_compatible(bf16.T)  # last dimension strided
    cuda0 = torch.device("cuda", 0)
    assert not triton_ops.use_tma(torch.device("cpu"), bf16, w)  # interpreter: off unless forced
    monkeypatch.setattr(triton_ops, "_compiled", lambda device: True)
    monkeypatch.setattr(triton_ops, "_capability", lambda index: (9, 0))
    assert triton_ops.use_tma(cuda0, bf16, w)
    assert not triton_ops.use_tma(cuda0, bf16.float(), w.float())  # fp32 keeps pointer loads
    assert not triton_ops.use_tma(cuda0, bf16[:, 1:], w)
    monkeypatch.setenv("CEPO_KERNELS_TMA", "0")
    assert not triton_ops.use_tma(cuda0, bf16, w)
    monkeypatch.delenv("CEPO_KERNELS_TMA")
    monkeypatch.setattr(triton_ops, "_capability", lambda index: (8, 0))  # Ampere: no TMA
    assert not triton_ops.use_tma(cuda0, bf16, w)
    monkeypatch.setattr(triton_ops, "FORCE_TMA", True)
    assert triton_ops.use_tma(cuda0, bf16, w)
    assert not triton_ops.use_tma(cuda0, torch.empty(64, 100, dtype=torch.bfloat16), w)
    monkeypatch.setattr(triton_ops, "FORCE_TMA", False)
    monkeypatch.setattr(triton_ops, "_capability", lambda index: (9, 0))
    assert not triton_ops.use_tma(cuda0, bf16, w)


def test_tma_forced_on_unaligned_rows_falls_back(monkeypatch):
    """H 100 in bf16 (200-byte rows) cannot back a descriptor: forced TMA falls back to
    pointer loads and the result still matches float64."""
    monkeypatch.setattr(triton_ops, "FORCE_TMA", True)
    made = []
    real = triton_ops._descriptors
    monkeypatch.setattr(triton_ops, "_descriptors", lambda *a: made.append(a) or real(*a))
    hidden, weight, targets = head_inputs(45, 100, 203, torch.bfloat16, "cpu", scale=2.0, ignore=(4,))
    out = ck.fused_logprobs(hidden, weight, targets, backend="triton")
    ref = reference.fused_logprobs(hidden, weight, targets)
    assert not made
    assert rel_err(out.logprobs, ref.logprobs) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("logits_gemm", ["library", "triton", "triton-fp16"])
def test_gradient_chunks_keep_fp32_logits(logits_gemm, monkeypatch):
    """bf16 inputs with logits up to |z| ~ 20 at T 0.7: the log-prob (with entropy) and PPO
    gradients stay within 1e-2 of float64 (0.4-0.6% measured) because the gradient chunk's
    logits are fp32, or fp16 relative to each tile's maximum; a plain bf16 chunk puts them
    2-5% off (p inherits |z| / T 2^-9)."""
    monkeypatch.setattr(triton_ops, "LOGITS_GEMM", logits_gemm)
    n = 64
    hidden, weight, targets = head_inputs(n, H, 517, torch.bfloat16, "cpu", seed=517, scale=4.0,
                                          ignore=(3,), requires_grad=True)
    assert (hidden.float() @ weight.float().T).abs().max() > 15
    w = torch.linspace(0.5, 1.5, n)

    def loss(out):
        return (w * out.logprobs).sum() + 0.3 * (w * out.entropy).sum()

    out = ck.fused_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True,
                            backend="triton")
    ref = reference.fused_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True)
    for got, want in zip(grads(loss(out), hidden, weight), grads(loss(ref), hidden, weight)):
        assert rel_err(got, want) <= 1e-2
    adv = torch.randn(n, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(n, dtype=torch.bool)
    old = ref.logprobs.detach().float()
    loss_t, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, temperature=0.7,
                                         backend="triton")
    loss_r, _ = reference.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask,
                                                temperature=0.7)
    for got, want in zip(grads(loss_t, hidden, weight), grads(loss_r, hidden, weight)):
        assert rel_err(got, want) <= 1e-2


def test_logits_gemm_must_be_known(monkeypatch):
    monkeypatch.setattr(triton_ops, "LOGITS_GEMM", "cublas")
    hidden, weight, targets = head_inputs(5, 16, 33, torch.float32, "cpu", requires_grad=True)
    out = ck.fused_logprobs(hidden, weight, targets, backend="triton")
    with pytest.raises(ValueError, match="LOGITS_GEMM"):
        out.logprobs.sum().backward()
