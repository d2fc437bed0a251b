"""fused_linear_self_distill_loss: loss, gradients and stats against the float64 reference,
the divergences' own identities, and Liger-Kernel's fused linear JSD."""

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels import chunked, reference
from kernel_cases import ENGINES, GRAD_TOL, TOL, grads, head_inputs, rel_err
from test_kernels_contract import LargestTensor

# (divergence, beta): both KLs, the JSD at its two endpoints (forward / reverse KL), the
# symmetric JSD and two skewed ones
CASES = [("forward_kl", 0.5), ("reverse_kl", 0.3), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0),
         ("jsd", 0.9)]


def distill_inputs(n, h, v, dtype, device, seed=0):
    """Student and teacher hidden states (related, as a hinted context is), head, targets
    (one ignored), a mask dropping about a quarter, token weights in [0.5, 1.5]."""
    hs, weight, targets = head_inputs(n, h, v, dtype, device, seed=seed, scale=2.0, ignore=(2,),
                                      requires_grad=True)
    g = torch.Generator().manual_seed(seed + 7)
    ht = (hs.detach().float().cpu() + torch.randn(n, h, generator=g)).to(dtype).to(device)
    ht.requires_grad_(True)
    mask = (torch.rand(n, generator=g) > 0.25).to(device)
    weights = (torch.rand(n, generator=g) + 0.5).to(device)
    return hs, ht, weight, targets, mask, weights


@pytest.mark.parametrize("engine,device", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,v", [(1, 16, 67), (41, 24, 131)])
@pytest.mark.parametrize("divergence,beta", CASES)
def test_matches_reference(engine, device, dtype, n, h, v, divergence, beta):
    if engine == "triton" and device == "cpu" and n > 1 and divergence == "jsd" and beta in (0, 1):
        pytest.skip("the interpreter is slow: the JSD endpoints run the two KL kernels, "
                    "tested above, and at N=1 here")
    hs, ht, weight, targets, mask, weights = distill_inputs(n, h, v, dtype, device, seed=n)
    if n == 1:
        mask[:] = True
    kw = dict(divergence=divergence, beta=beta, temperature=0.9)
    if divergence != "forward_kl":  # half the cases weighted, with a global normalizer
        kw.update(token_weights=weights, normalizer=float(2 * n))
    loss, stats = ck.fused_linear_self_distill_loss(hs, ht, weight, targets, mask, backend=engine,
                                                    **kw)
    ref_loss, ref_stats = reference.fused_linear_self_distill_loss(hs, ht, weight, targets, mask,
                                                                   **kw)
    assert loss.dim() == 0
    # bf16: the product rounds each logit to bf16 on CPU, and the divergence is a
    # difference of log-probs over the whole vocabulary (GRAD_TOL, as the k3 KL)
    tol = GRAD_TOL[dtype]
    assert rel_err(loss, ref_loss) <= tol
    for name in ("divergence", "entropy", "num_tokens", "token_divergence"):
        assert rel_err(getattr(stats, name), getattr(ref_stats, name)) <= tol, name
    assert rel_err(stats.logprobs, ref_stats.logprobs) <= max(tol, TOL[dtype])
    g_out = grads(loss * 1.7, hs, weight)  # grad_output != 1 is scaled correctly
    g_ref = grads(ref_loss * 1.7, hs, weight)
    for got, want in zip(g_out, g_ref):
        assert got.dtype == dtype
        assert rel_err(got, want) <= tol
    # the teacher is stop-gradient
    assert torch.autograd.grad(loss, ht, allow_unused=True)[0] is None


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                             ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)])
def test_gradcheck_float64(divergence, beta):
    """Gradcheck w.r.t. h_student only: perturbing the head would move the teacher too, whose
    path the stop-gradient removes from the analytical gradient by design (the head's
    gradient is checked against autograd with a detached teacher below)."""
    hs, ht, weight, targets, mask, weights = distill_inputs(7, 5, 11, torch.float64, "cpu")
    weights = weights.double()
    for engine in ("reference", "torch"):
        def f(h):
            return ck.fused_linear_self_distill_loss(
                h, ht.detach(), weight.detach(), targets, mask, divergence=divergence, beta=beta,
                temperature=0.8, token_weights=weights, backend=engine)[0]
        assert torch.autograd.gradcheck(f, (hs,), eps=1e-6, atol=1e-7)


def test_reference_against_hand_written_formulas():
    """The reference against the papers' definitions written out once more, per token, with
    torch.nn.functional.kl_div (KL(P || Q) = kl_div(log Q, log P, log_target=True))."""
    import torch.nn.functional as F
    hs, ht, weight, targets, mask, _ = distill_inputs(9, 8, 23, torch.float64, "cpu")
    log_q = torch.log_softmax(hs @ weight.T / 1.3, -1)
    log_p = torch.log_softmax(ht @ weight.T / 1.3, -1)

    def kl(log_a, log_b):  # KL(a || b) per row
        return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)

    beta = 0.3
    log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
    expected = {"forward_kl": kl(log_p, log_q), "reverse_kl": kl(log_q, log_p),
                "jsd": beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)}
    keep = mask & (targets != -100)
    for divergence, per_token in expected.items():
        loss, stats = reference.fused_linear_self_distill_loss(
            hs, ht, weight, targets, mask, divergence=divergence, beta=beta, temperature=1.3)
        torch.testing.assert_close(stats.token_divergence, torch.where(keep, per_token, 0.0))
        torch.testing.assert_close(loss, per_token[keep].mean())


def test_divergence_identities():
    """jsd at beta = 0 / 1 is forward / reverse KL; the beta = 0.5 JSD is symmetric in
    student and teacher and at most log 2; every divergence is zero when they agree."""
    hs, ht, weight, targets, mask, _ = distill_inputs(17, 8, 45, torch.float32, "cpu")

    def div(a, b, divergence, beta=0.5):
        return ck.fused_linear_self_distill_loss(a, b, weight, targets, mask, divergence=divergence,
                                                 beta=beta, backend="torch")[1].token_divergence

    torch.testing.assert_close(div(hs, ht, "jsd", 0.0), div(hs, ht, "forward_kl"))
    torch.testing.assert_close(div(hs, ht, "jsd", 1.0), div(hs, ht, "reverse_kl"))
    torch.testing.assert_close(div(hs, ht, "forward_kl"), div(ht, hs, "reverse_kl"))
    torch.testing.assert_close(div(hs, ht, "jsd"), div(ht, hs, "jsd"))
    assert (div(hs, ht, "jsd") <= torch.log(torch.tensor(2.0)) + 1e-6).all()
    assert (div(hs, ht, "jsd") > 0).sum() > 5
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        assert div(hs, hs, divergence).abs().max() < 1e-5


@pytest.mark.parametrize("engine,device", ENGINES)
def test_masked_and_ignored_tokens_contribute_nothing(engine, device):
    hs, ht, weight, targets, mask, weights = distill_inputs(23, 16, 77, torch.float32, device)
    kw = dict(token_weights=weights, backend=engine)
    loss, stats = ck.fused_linear_self_distill_loss(hs, ht, weight, targets, mask, **kw)
    g_h, g_w = grads(loss, hs, weight)
    drop = ~mask | (targets == -100)
    assert drop.sum() >= 3 and stats.num_tokens.item() == (~drop).sum().item()
    # change everything about the dropped tokens' teacher and weights: nothing may move
    ht2, w2 = ht.detach().clone(), weights.clone()
    ht2[drop] += 3.0
    w2[drop] *= 5.0
    loss2, stats2 = ck.fused_linear_self_distill_loss(hs, ht2, weight, targets, mask,
                                                      token_weights=w2, backend=engine)
    g_h2, g_w2 = grads(loss2, hs, weight)
    torch.testing.assert_close(loss, loss2)
    assert (g_h[drop] == 0).all() and (stats.token_divergence[drop] == 0).all()
    torch.testing.assert_close(g_h, g_h2)
    torch.testing.assert_close(g_w, g_w2)


@pytest.mark.parametrize("engine,device", ENGINES)
def test_all_masked_and_empty(engine, device):
    hs, ht, weight, targets, mask, _ = distill_inputs(5, 16, 33, torch.float32, device)
    loss, stats = ck.fused_linear_self_distill_loss(hs, ht, weight, targets, mask & False,
                                                    backend=engine)
    assert loss.item() == 0.0 and stats.num_tokens.item() == 0
    g_h, g_w = grads(loss, hs, weight)
    assert (g_h == 0).all() and (g_w == 0).all()
    loss0, _ = ck.fused_linear_self_distill_loss(hs[:0], ht[:0], weight, targets[:0], mask[:0],
                                                 backend=engine)
    assert loss0.item() == 0.0


def test_token_weights_and_normalizer_split_a_batch():
    """loss = sum w D / normalizer, so micro-batches with the global normalizer add up to
    the whole batch, and w = 1 / len(seq) with normalizer = #sequences is a sequence mean."""
    hs, ht, weight, targets, mask, _ = distill_inputs(40, 16, 61, torch.float32, "cpu")
    mask[:] = True
    targets[2] = 5
    lengths = [13, 27]  # two sequences
    w = torch.cat([torch.full((k,), 1.0 / k) for k in lengths])
    full, stats = ck.fused_linear_self_distill_loss(hs, ht, weight, targets, mask, token_weights=w,
                                                    normalizer=2.0, backend="torch")
    d = stats.token_divergence
    seq_mean = (d[:13].mean() + d[13:].mean()) / 2
    torch.testing.assert_close(full, seq_mean)
    parts = [ck.fused_linear_self_distill_loss(hs[s], ht[s], weight, targets[s], mask[s],
                                               token_weights=w[s], normalizer=2.0,
                                               backend="torch")[0]
             for s in (slice(0, 13), slice(13, 40))]
    torch.testing.assert_close(sum(parts), full)
    for a, b in zip(grads(sum(parts), hs, weight), grads(full, hs, weight)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("engine", ["reference", "torch"])
def test_no_gradient_to_teacher_and_head_gets_student_path_only(engine):
    """The head's gradient equals that of the same loss with the teacher's logits computed
    from a detached copy of the head (float64 autograd, written out here); a numerical
    check of that function w.r.t. the head (gradcheck) makes it independent of autograd."""
    hs, ht, weight, targets, mask, _ = distill_inputs(11, 8, 29, torch.float64, "cpu")
    loss, _ = ck.fused_linear_self_distill_loss(hs, ht, weight, targets, mask, backend=engine)
    loss.backward()
    g_h, g_w = hs.grad, weight.grad
    log_q = torch.log_softmax(hs @ weight.T, -1)
    log_p = torch.log_softmax(ht @ weight.detach().T, -1).detach()
    m = 0.5 * (log_p.exp() + log_q.exp())
    per = 0.5 * (log_p.exp() * (log_p - m.log())).sum(-1) + 0.5 * (log_q.exp() * (log_q - m.log())).sum(-1)
    keep = mask & (targets != -100)
    want = torch.autograd.grad(per[keep].mean(), (hs, weight))
    torch.testing.assert_close(g_h, want[0])
    torch.testing.assert_close(g_w, want[1])
    assert ht.grad is None

    def student_path(w):  # the JSD with the teacher's distribution held fixed
        lq = torch.log_softmax(hs.detach() @ w.T, -1)
        mm = 0.5 * (log_p.exp() + lq.exp())
        d = (0.5 * (log_p.exp() * (log_p - mm.log())).sum(-1)
             + 0.5 * (lq.exp() * (lq - mm.log())).sum(-1))
        return d[keep].mean()
    assert torch.autograd.gradcheck(student_path, (weight.detach().clone().requires_grad_(),),
                                    eps=1e-6, atol=1e-7)


def test_never_materialises_logits(monkeypatch):
    n, h, v = 512, 16, 4000
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 1 << 16)  # chunks of 16 rows x 4000 vocab
    hs, ht, weight, targets, mask, weights = distill_inputs(n, h, v, torch.float32, "cpu")
    for divergence in ("jsd", "forward_kl", "reverse_kl"):
        with LargestTensor() as rec:
            loss, _ = ck.fused_linear_self_distill_loss(hs, ht, weight, targets, mask,
                                                        divergence=divergence, beta=0.3,
                                                        token_weights=weights, backend="torch")
            loss.backward()
        assert rec.largest <= max(1 << 16, v * h)  # one logits tile, or the size of dW
        assert rec.largest < n * v // 4


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_against_liger_fused_linear_jsd(beta, temperature):
    """Same semantics as Liger's chunked fused linear JSD (LigerFusedLinearJSDLoss) with
    weight_hard_loss=0, weight_soft_loss=1, its beta = our beta, the student's head as the
    teacher's (detached), mask all True: both sum the per-token generalised JSD over the
    tokens whose label is not -100 and divide by their count (our default normalizer).
    Loss and the gradients to the student's hidden states and the head agree."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hs, ht, weight, targets, _, _ = distill_inputs(37, 16, 70, torch.float32, "cpu")
    targets[[5, 9]] = -100
    loss_fn = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                            temperature=temperature, compiled=False)
    liger_loss = loss_fn(hs, weight, ht.detach(), weight.detach(), targets)
    ours, _ = ck.fused_linear_self_distill_loss(hs, ht, weight, targets,
                                                torch.ones(37, dtype=torch.bool), divergence="jsd",
                                                beta=beta, temperature=temperature,
                                                backend="torch")
    torch.testing.assert_close(ours, liger_loss, rtol=1e-5, atol=1e-6)
    for a, e in zip(grads(ours, hs, weight), grads(liger_loss, hs, weight)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad,message", [
    (dict(divergence="kl"), "'divergence' must be one of"),
    (dict(beta=1.5), "'beta' must be a number in [0.0, 1.0]"),
    (dict(beta=-0.1), "'beta'"),
    (dict(temperature=0.0), "'temperature'"),
    (dict(normalizer=0.0), "'normalizer'"),
])
def test_bad_scalars_are_named(bad, message):
    hs, ht, weight, targets, mask, _ = distill_inputs(4, 8, 13, torch.float32, "cpu")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ck.fused_linear_self_distill_loss(hs, ht, weight, targets, mask, **bad)


def test_bad_tensors_are_named():
    hs, ht, weight, targets, mask, weights = distill_inputs(4, 8, 13, torch.float32, "cpu")
    call = ck.fused_linear_self_distill_loss
    with pytest.raises(ValueError, match="'h_teacher' has shape"):
        call(hs, ht[:3], weight, targets, mask)
    with pytest.raises(ValueError, match="'h_teacher' has dtype"):
        call(hs, ht.double(), weight, targets, mask)
    with pytest.raises(ValueError, match="'h_student' must be 2-D"):
        call(hs[None], ht, weight, targets, mask)
    with pytest.raises(ValueError, match="'mask' must be a bool tensor"):
        call(hs, ht, weight, targets, mask.float())
    with pytest.raises(ValueError, match="'token_weights' must have shape"):
        call(hs, ht, weight, targets, mask, token_weights=weights[:2])
    with pytest.raises(ValueError, match="'targets' has value 13"):
        call(hs, ht, weight, targets.clone().fill_(13), mask)


@pytest.mark.parametrize("engine,device", ENGINES[:2])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_fp16_gradient_tile_is_scaled(engine, device, divergence, monkeypatch):
    """fp16 products (as on CUDA): with a large normalizer, dz ~ 1e-7 / V would underflow
    fp16 unscaled; the tile is scaled by a power of two and dh, dW divided back."""
    monkeypatch.setattr(chunked, "FP16_COMPUTE_ON_CPU", True)
    hs, ht, weight, targets, mask, _ = distill_inputs(19, 16, 67, torch.float16, device)
    kw = dict(divergence=divergence, beta=0.4, normalizer=1e5)
    loss, _ = ck.fused_linear_self_distill_loss(hs, ht, weight, targets, mask, backend=engine, **kw)
    ref, _ = reference.fused_linear_self_distill_loss(hs, ht, weight, targets, mask, **kw)
    assert rel_err(loss, ref) <= GRAD_TOL[torch.float16]
    for got, want in zip(grads(loss, hs, weight), grads(ref, hs, weight)):
        assert got.dtype == torch.float16
        assert rel_err(got, want) <= GRAD_TOL[torch.float16]


def _new_option_inputs(device):
    hs, ht, weight, targets, mask, weights = distill_inputs(37, 16, 101, torch.float32, device)
    old = torch.full((37,), -4.0, device=device)
    adv = torch.linspace(-1, 1, 37, device=device)
    return hs, ht, weight, targets, mask, weights, old, adv


def _run_new_options(inputs, backend):
    hs, ht, weight, targets, mask, weights, old, adv = inputs
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        loss, _ = ck.fused_linear_self_distill_loss(hs, ht, weight, targets, mask,
                                                    divergence=divergence, beta=0.3,
                                                    token_weights=weights, backend=backend)
        torch.autograd.grad(loss, [hs, weight])
    loss, _ = ck.fused_linear_ppo_loss(hs, weight, targets, old, adv, mask, clip_dual=3.0,
                                       token_weights=weights, normalizer=5.0, backend=backend)
    torch.autograd.grad(loss, [hs, weight])


def test_no_host_read_with_cuda_settings(monkeypatch):
    """The new op and the PPO loss's new options read no tensor data back to the host
    (recorded on CPU with CUDA's settings: data checks off, no row skipping)."""
    from cepo_kernels import _validate
    from test_kernels_sync import SyncRecorder
    monkeypatch.setattr(_validate, "_debug", False)
    monkeypatch.setattr(chunked, "SKIP_ZERO_ROWS", False)
    with SyncRecorder() as rec:
        _run_new_options(_new_option_inputs("cpu"), "torch")
    assert rec.reads == [], f"ops that would block the host on CUDA: {sorted(set(rec.reads))}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_sync_on_cuda(backend):
    inputs = _new_option_inputs("cuda")  # host-to-device copies happen here, before the check
    _run_new_options(inputs, backend)  # warm-up: compile, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run_new_options(inputs, backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_against_liger_triton_fused_linear_jsd(beta, temperature):
    """Liger's Triton LigerFusedLinearJSD (the interpreter on CPU, compiled on CUDA), its
    jsd_beta = our beta, the head as the teacher's (detached), label -100 where our mask is
    False: both divide the summed JSD by the number of labels that are not -100."""
    from cepo_kernels import backend
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not backend.interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    liger = pytest.importorskip("liger_kernel.transformers")
    hs, ht, weight, targets, mask, _ = distill_inputs(13, 16, 70, torch.float32, device)
    labels = torch.where(mask & (targets != -100), targets, torch.full_like(targets, -100))
    loss_fn = liger.LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)
    liger_loss = loss_fn(hs, weight, ht.detach(), weight.detach(), labels)
    ours, _ = ck.fused_linear_self_distill_loss(hs, ht, weight, targets, mask, beta=beta,
                                                temperature=temperature, backend="torch")
    torch.testing.assert_close(ours, liger_loss, rtol=1e-5, atol=1e-6)
    for a, e in zip(grads(ours, hs, weight), grads(liger_loss, hs, weight)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
