"""fused_linear_ppo_loss: loss, gradients and stats against the reference and Liger-Kernel."""

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels import reference
from kernel_cases import ENGINES, GRAD_TOL, TOL, grads, head_inputs, rel_err


def ppo_inputs(n, h, v, dtype, device, seed=0):
    hidden, weight, targets = head_inputs(n, h, v, dtype, device, seed=seed, scale=2.0,
                                          ignore=(2,), requires_grad=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        lp = reference.fused_logprobs(hidden, weight, targets, temperature=0.9).logprobs.float().cpu()
    # old log-probs near the current ones, some far enough to hit both clip bounds
    old = (lp + 0.4 * torch.randn(n, generator=g)).to(device)
    adv = torch.randn(n, generator=g).to(device)
    mask = (torch.rand(n, generator=g) > 0.25).to(device)
    return hidden, weight, targets, old, adv, mask


@pytest.mark.parametrize("engine,device", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,v", [(1, 16, 67), (41, 24, 131)])
@pytest.mark.parametrize("kl", [False, True], ids=["no-kl", "k3-kl"])
def test_matches_reference(engine, device, dtype, n, h, v, kl):
    hidden, weight, targets, old, adv, mask = ppo_inputs(n, h, v, dtype, device, seed=n)
    if n == 1:
        mask[:] = True
    kw = dict(clip_low=0.2, clip_high=0.28, temperature=0.9, return_entropy=True)
    if kl:
        kw.update(ref_logprobs=old.flip(0), kl_coef=0.05, normalizer=float(3 * n))
    loss, stats = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask,
                                           backend=engine, **kw)
    ref_loss, ref_stats = reference.fused_linear_ppo_loss(hidden, weight, targets, old, adv,
                                                          mask, **kw)
    assert loss.dim() == 0
    assert rel_err(loss, ref_loss) <= TOL[dtype]
    for name in ref_stats._fields:
        tol = GRAD_TOL[dtype] if name == "approx_kl" else TOL[dtype]  # a difference of log-probs
        assert rel_err(getattr(stats, name), getattr(ref_stats, name)) <= tol, name
    g_out = grads(loss * 1.7, hidden, weight)  # grad_output != 1 is scaled correctly
    g_ref = grads(ref_loss * 1.7, hidden, weight)
    for got, want in zip(g_out, g_ref):
        assert got.dtype == dtype
        assert rel_err(got, want) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("engine,device", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("entropy", [False, True], ids=["no-ent", "ent"])
@pytest.mark.parametrize("how", ["no_grad", "leaf"])
def test_forward_only_matches_gradient_path(engine, device, dtype, entropy, how):
    """A call that needs no gradient (no_grad, or inputs that do not require it) takes the
    engine's forward-only path: the same loss, stats and log-probs as the call that also
    forms the gradient, and the reference's."""
    hidden, weight, targets, old, adv, mask = ppo_inputs(41, 24, 131, dtype, device, seed=5)
    kw = dict(clip_low=0.2, clip_high=0.28, temperature=0.9, return_entropy=entropy,
              ref_logprobs=old.flip(0), kl_coef=0.05)
    loss, stats = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask,
                                           backend=engine, **kw)
    if how == "no_grad":
        with torch.no_grad():
            loss_f, stats_f = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask,
                                                       backend=engine, **kw)
    else:
        loss_f, stats_f = ck.fused_linear_ppo_loss(hidden.detach(), weight.detach(), targets, old,
                                                   adv, mask, backend=engine, **kw)
        assert not loss_f.requires_grad
    ref_loss, ref_stats = reference.fused_linear_ppo_loss(hidden, weight, targets, old, adv,
                                                          mask, **kw)
    assert rel_err(loss_f, ref_loss) <= TOL[dtype]
    torch.testing.assert_close(loss_f, loss.detach(), rtol=1e-6, atol=1e-7)
    for name in ref_stats._fields:
        got, same = getattr(stats_f, name), getattr(stats, name)
        if same is None:
            assert got is None and name == "entropy" and not entropy
            continue
        torch.testing.assert_close(got, same.detach(), rtol=1e-6, atol=1e-7, msg=name)
        tol = GRAD_TOL[dtype] if name == "approx_kl" else TOL[dtype]
        assert rel_err(got, getattr(ref_stats, name)) <= tol, name


def test_clip_fractions_are_exercised():
    """The inputs above really do hit both clip bounds (else the test would prove little)."""
    hidden, weight, targets, old, adv, mask = ppo_inputs(41, 24, 131, torch.float32, "cpu", seed=41)
    _, stats = reference.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask,
                                               temperature=0.9)
    assert stats.clip_frac_low > 0 and stats.clip_frac_high > 0


@pytest.mark.parametrize("engine,device", ENGINES)
def test_masked_tokens_contribute_nothing(engine, device):
    hidden, weight, targets, old, adv, mask = ppo_inputs(23, 16, 77, torch.float32, device)
    loss, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, backend=engine)
    g_h, g_w = grads(loss, hidden, weight)
    # change everything about the masked tokens: nothing may move
    old2, adv2 = old.clone(), adv.clone()
    old2[~mask] += 3.0
    adv2[~mask] *= -5.0
    loss2, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, old2, adv2, mask, backend=engine)
    g_h2, g_w2 = grads(loss2, hidden, weight)
    assert torch.equal(loss, loss2)
    assert (g_h[~mask] == 0).all()
    torch.testing.assert_close(g_w, g_w2)


@pytest.mark.parametrize("engine,device", ENGINES)
def test_all_masked_and_empty(engine, device):
    hidden, weight, targets, old, adv, mask = ppo_inputs(5, 16, 33, torch.float32, device)
    loss, stats = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask & False,
                                           backend=engine)
    assert loss.item() == 0.0 and stats.num_tokens.item() == 0
    g_h, g_w = grads(loss, hidden, weight)
    assert (g_h == 0).all() and (g_w == 0).all()
    e = torch.zeros(0, device=device)
    loss0, _ = ck.fused_linear_ppo_loss(hidden[:0], weight, targets[:0], e, e,
                                        mask[:0], backend=engine)
    assert loss0.item() == 0.0


def test_normalizer_splits_a_batch_into_micro_batches():
    """Micro-batches with the global token count as normalizer add up to the full-batch loss."""
    hidden, weight, targets, old, adv, mask = ppo_inputs(40, 16, 61, torch.float32, "cpu")
    full, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, backend="torch")
    g_full = grads(full, hidden, weight)
    total = float((mask & (targets != -100)).sum())  # the kept tokens of the whole batch
    parts = [ck.fused_linear_ppo_loss(hidden[s], weight, targets[s], old[s], adv[s], mask[s],
                                      normalizer=total, backend="torch")[0]
             for s in (slice(0, 13), slice(13, 40))]
    g_parts = grads(sum(parts), hidden, weight)
    torch.testing.assert_close(sum(parts), full)
    for a, b in zip(g_parts, g_full):
        torch.testing.assert_close(a, b)


def test_against_liger_grpo_loss():
    """Same semantics as Liger's chunked GRPO loss with loss_type='dapo' (token mean over
    the batch), no KL, same clip range and temperature: loss and both gradients agree."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    torch.manual_seed(0)
    b, t, h, v = 3, 9, 16, 70
    x = torch.randn(b, t, h, requires_grad=True)
    w = (torch.randn(v, h) / 4).requires_grad_(True)
    ids = torch.randint(0, v, (b, t))
    attn = torch.ones(b, t)
    attn[0, 6:] = 0
    attn[2, 2:] = 0
    adv = torch.randn(b)
    old = torch.randn(b, t) * 0.3 - 4.0
    loss_fn = liger.LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False,
                                             epsilon_low=0.2, epsilon_high=0.28,
                                             loss_type="dapo", temperature=0.9)
    liger_loss = loss_fn(x, w, ids, attn, adv, old_per_token_logps=old)[0]
    ours, _ = ck.fused_linear_ppo_loss(
        x.reshape(-1, h), w, ids.reshape(-1), old.reshape(-1), adv[:, None].expand(b, t).reshape(-1),
        attn.bool().reshape(-1), clip_low=0.2, clip_high=0.28, temperature=0.9, backend="torch")
    torch.testing.assert_close(ours, liger_loss, rtol=1e-5, atol=1e-6)
    for a, e in zip(grads(ours, x, w), grads(liger_loss, x, w)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_gradcheck_chunked_float64():
    hidden, weight, targets, old, adv, mask = ppo_inputs(7, 5, 11, torch.float64, "cpu")
    old, adv = old.double(), adv.double()
    for engine in ("reference", "torch"):
        def f(h, w):
            return ck.fused_linear_ppo_loss(h, w, targets, old, adv, mask, temperature=0.8,
                                            ref_logprobs=old - 0.1, kl_coef=0.1,
                                            backend=engine)[0]
        assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("engine,device", ENGINES)
def test_on_policy_old_logprobs_none(engine, device):
    """old_logprobs=None (one update per batch) equals passing the current log-probs."""
    hidden, weight, targets, _, adv, mask = ppo_inputs(19, 16, 53, torch.float32, device)
    with torch.no_grad():
        lp = ck.fused_logprobs(hidden, weight, targets, backend=engine).logprobs
    loss, stats = ck.fused_linear_ppo_loss(hidden, weight, targets, None, adv, mask, backend=engine)
    loss2, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, lp, adv, mask, backend=engine)
    ref, _ = reference.fused_linear_ppo_loss(hidden, weight, targets, None, adv, mask)
    torch.testing.assert_close(loss, loss2)
    assert rel_err(loss, ref) <= 1e-5 and stats.ratio_mean.item() == pytest.approx(1.0)
    for a, b in zip(grads(loss, hidden, weight), grads(ref, hidden, weight)):
        assert rel_err(a, b) <= 1e-5


# --------------------------------------------------------------- dual clip, token weights

def verl_dual_clip_loss(lp, old, adv, mask, clip_low, clip_high, clip_c):
    """verl's compute_policy_loss_vanilla / EasyR1's compute_policy_loss, written out
    independently (no log-ratio clamp: the inputs stay far inside it), token-mean:
    (loss, pg_clipfrac_lower)."""
    ratio = torch.exp(lp - old)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(pg1, pg2)
    pg3 = -adv * clip_c
    clip2 = torch.min(pg3, clip1)
    per_token = torch.where(adv < 0, clip2, clip1)
    m = mask.double()
    lower = (torch.gt(clip1, pg3) & (adv < 0)).double()
    return (per_token * m).sum() / m.sum(), (lower * m).sum() / m.sum()


@pytest.mark.parametrize("engine,device", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("clip_c", [1.3, 3.0])
def test_dual_clip_matches_verl(engine, device, dtype, clip_c):
    hidden, weight, targets, old, adv, mask = ppo_inputs(41, 24, 131, dtype, device, seed=3)
    targets[2] = 7  # every target valid: verl's mask is the response mask alone
    old = old.clone()
    old[::4] -= 1.6  # ratios well above 3 on some tokens
    kw = dict(clip_low=0.2, clip_high=0.28, temperature=0.9)
    loss, stats = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask,
                                           clip_dual=clip_c, backend=engine, **kw)
    lp = reference.fused_logprobs(hidden, weight, targets, temperature=0.9).logprobs
    want, want_lower = verl_dual_clip_loss(lp, old.double(), adv.double(), mask, 0.2, 0.28, clip_c)
    assert want_lower > 0  # the dual clip really binds on these inputs
    # a sum of terms of both signs: bf16 log-probs move it like a difference (GRAD_TOL)
    assert rel_err(loss, want) <= GRAD_TOL[dtype]
    assert rel_err(stats.clip_frac_dual, want_lower) <= 1e-6
    for got, expected in zip(grads(loss, hidden, weight), grads(want, hidden, weight)):
        assert rel_err(got, expected) <= GRAD_TOL[dtype]
    # the dual clip changes the loss (else the test proves little); reference agrees
    plain, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, backend=engine, **kw)
    assert abs(plain.item() - loss.item()) > 1e-3
    ref, ref_stats = reference.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask,
                                                     clip_dual=clip_c, **kw)
    assert rel_err(loss, ref) <= GRAD_TOL[dtype]
    assert rel_err(stats.clip_frac_dual, ref_stats.clip_frac_dual) <= 1e-6


def seq_mean_loss(lp, old, adv, mask, lengths, clip_low, clip_high):
    """Sequence-mean aggregation written out: the PPO loss averaged over each sequence's
    kept tokens, then over sequences (verl's seq-mean-token-mean)."""
    ratio = torch.exp(lp - old)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    means, start = [], 0
    for k in lengths:
        sl = slice(start, start + k)
        means.append(per_token[sl][mask[sl]].mean())
        start += k
    return torch.stack(means).mean()


@pytest.mark.parametrize("engine,device", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_weights_give_sequence_mean(engine, device, dtype):
    """token_weights = 1 / (kept tokens of the sequence), normalizer = number of sequences:
    the sequence-mean loss (the trainer's --loss_agg seq), gradients included."""
    hidden, weight, targets, old, adv, mask = ppo_inputs(41, 24, 131, dtype, device, seed=5)
    targets[2] = 9
    lengths = [7, 20, 14]
    seq_of = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).to(device)
    kept = torch.zeros(3, device=device).index_add_(0, seq_of, mask.float())
    w = 1.0 / kept[seq_of]
    kw = dict(clip_low=0.2, clip_high=0.28, temperature=0.9)
    loss, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, token_weights=w,
                                       normalizer=3.0, backend=engine, **kw)
    lp = reference.fused_logprobs(hidden, weight, targets, temperature=0.9).logprobs
    want = seq_mean_loss(lp, old.double(), adv.double(), mask, lengths, 0.2, 0.28)
    assert rel_err(loss, want) <= GRAD_TOL[dtype]
    for got, expected in zip(grads(loss, hidden, weight), grads(want, hidden, weight)):
        assert rel_err(got, expected) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("engine,device", ENGINES)
def test_token_weights_and_dual_clip_with_kl_match_reference(engine, device):
    """All options at once (weights, dual clip, k3 KL, entropy) against the reference."""
    hidden, weight, targets, old, adv, mask = ppo_inputs(29, 16, 67, torch.float32, device, seed=8)
    w = (torch.rand(29, generator=torch.Generator().manual_seed(1)) * 2).to(device)
    kw = dict(clip_low=0.2, clip_high=0.28, temperature=0.9, clip_dual=1.5, token_weights=w,
              ref_logprobs=old.flip(0), kl_coef=0.05, normalizer=40.0, return_entropy=True)
    loss, stats = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, backend=engine,
                                           **kw)
    ref, ref_stats = reference.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, **kw)
    assert rel_err(loss, ref) <= 1e-5
    for name in ref_stats._fields:
        assert rel_err(getattr(stats, name), getattr(ref_stats, name)) <= 1e-5, name
    for got, expected in zip(grads(loss, hidden, weight), grads(ref, hidden, weight)):
        assert rel_err(got, expected) <= 1e-5


def test_gradcheck_dual_clip_and_weights_float64():
    hidden, weight, targets, old, adv, mask = ppo_inputs(7, 5, 11, torch.float64, "cpu")
    old, adv = old.double() - 0.5, adv.double()
    w = torch.rand(7, dtype=torch.float64) + 0.5
    for engine in ("reference", "torch"):
        def f(h, wt):
            return ck.fused_linear_ppo_loss(h, wt, targets, old, adv, mask, temperature=0.8,
                                            clip_dual=1.4, token_weights=w, backend=engine)[0]
        assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad,message", [
    (dict(clip_dual=1.0), "'clip_dual' must be a finite number > 1.0"),
    (dict(clip_dual=0.5), "'clip_dual'"),
    (dict(clip_dual=float("inf")), "'clip_dual'"),
    (dict(token_weights=torch.ones(3)), "'token_weights' must have shape"),
    (dict(token_weights=torch.ones(5, dtype=torch.int64)), "'token_weights' must be a floating"),
])
def test_bad_dual_clip_and_weights_are_named(bad, message):
    hidden, weight, targets, old, adv, mask = ppo_inputs(5, 8, 13, torch.float32, "cpu")
    with pytest.raises(ValueError, match=message):
        ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, **bad)
