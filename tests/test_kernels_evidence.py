"""contrastive_evidence: three log-probs and the CEPO epilogue (docs/algorithm.md steps 3-5)."""

import math

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels import _math, reference, triton_ops
from kernel_cases import ENGINES, TOL, head_inputs, rel_err


def restated_epilogue(lp_pol, lp_pos, lp_neg, adv, has_neg, valid, lam, eps_w):
    """docs/algorithm.md steps 3-5, written independently, one token at a time in Python floats."""
    deltas, advs, clips = [], [], []
    for i in range(len(adv)):
        if not valid[i]:
            deltas.append(0.0), advs.append(0.0), clips.append(False)
            continue
        d = lp_pos[i] - lp_neg[i] if has_neg[i] else lp_pos[i] - lp_pol[i]  # RLSD fallback
        s = 1.0 if adv[i] > 0 else (-1.0 if adv[i] < 0 else 0.0)
        raw = math.exp(s * d)
        w = min(max(raw, 1.0 - eps_w), 1.0 + eps_w)
        deltas.append(d)
        advs.append(adv[i] * ((1.0 - lam) + lam * w))
        clips.append(raw < 1.0 - eps_w or raw > 1.0 + eps_w)
    f64 = torch.float64
    return torch.tensor(deltas, dtype=f64), torch.tensor(advs, dtype=f64), torch.tensor(clips)


def test_epilogue_cases_exactly():
    """sign(A) < 0, A = 0, inside, beyond, RLSD fallback, ignored tokens."""
    eps, lam = 0.25, 0.5
    lp_pol = torch.tensor([-1.0, -1.0, -2.0, -1.0, -3.0, -1.0, -1.0], dtype=torch.float64)
    lp_pos = torch.tensor([-0.5, -0.5, -1.0, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    lp_neg = torch.tensor([-1.5, -1.5, -1.0, -1.1, -1.1, -0.95, -2.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0, 1.5, -0.5, 1.0], dtype=torch.float64)
    has_neg = torch.tensor([True, True, True, True, False, True, True])
    valid = torch.tensor([True] * 6 + [False])
    delta, tok_adv, clipped = _math.evidence_epilogue(lp_pol, lp_pos, lp_neg, adv, has_neg, valid,
                                                      lam=lam, eps_w=eps)
    e_delta, e_adv, e_clip = restated_epilogue(lp_pol.tolist(), lp_pos.tolist(), lp_neg.tolist(),
                                               adv.tolist(), has_neg.tolist(), valid.tolist(),
                                               lam, eps)
    torch.testing.assert_close(delta, e_delta, rtol=0, atol=1e-12)
    torch.testing.assert_close(tok_adv, e_adv, rtol=0, atol=1e-12)
    assert clipped.tolist() == e_clip.tolist()
    # spelled out: A > 0 with D = 1 clips high; A < 0 flips the sign and clips low
    assert tok_adv[0] == pytest.approx(1.0 * (0.5 + 0.5 * 1.25)) and clipped[0]
    assert tok_adv[1] == pytest.approx(-1.0 * (0.5 + 0.5 * 0.75)) and clipped[1]
    assert tok_adv[2] == 0 and not clipped[2]  # A = 0: no advantage, never counted as clipped
    assert tok_adv[3] == pytest.approx(2.0 * (0.5 + 0.5 * math.exp(0.1))) and not clipped[3]
    assert delta[4] == pytest.approx(2.0)  # no wrong answer: lp_pos - lp_policy
    assert tok_adv[5] == pytest.approx(-0.5 * (0.5 + 0.5 * math.exp(0.05))) and not clipped[5]
    assert tok_adv[6] == 0 and delta[6] == 0 and not clipped[6]  # ignored target


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["upper", "lower"])
def test_epilogue_exactly_on_a_clip_boundary(sign):
    """exp(sign(A) D) == 1 +- eps_w exactly: the weight is the bound and is not 'clipped'."""
    d = 0.2
    one = torch.ones(1, dtype=torch.float64)
    raw = torch.exp(one * sign * d).item()  # the same exp the epilogue evaluates
    eps = raw - 1.0 if sign > 0 else 1.0 - raw  # exact in binary: 1 +- eps == raw
    _, tok_adv, clipped = _math.evidence_epilogue(one * -2, one * 0, one * -d, one * sign,
                                                  one.bool(), one.bool(), lam=1.0, eps_w=eps)
    assert tok_adv.item() == sign * raw and not clipped.item()
    _, _, clipped_beyond = _math.evidence_epilogue(one * -2, one * 0, one * (-1.01 * d),
                                                   one * sign, one.bool(), one.bool(), lam=1.0,
                                                   eps_w=eps)
    assert clipped_beyond.item()


def test_lambda_zero_is_grpo():
    lp = torch.randn(3, 20, dtype=torch.float64)
    adv = torch.randn(20, dtype=torch.float64)
    _, tok_adv, _ = _math.evidence_epilogue(lp[0], lp[1], lp[2], adv, torch.ones(20, dtype=torch.bool),
                                            torch.ones(20, dtype=torch.bool), lam=0.0, eps_w=0.2)
    torch.testing.assert_close(tok_adv, adv)


@pytest.fixture(params=[None, 2], ids=["one-split", "two-splits"])
def splits(request, monkeypatch):
    monkeypatch.setattr(triton_ops, "FORCE_NUM_SPLITS", request.param)
    return request.param


@pytest.mark.parametrize("engine,device", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,v", [(1, 16, 67), (45, 32, 131)])
def test_matches_reference_and_restatement(engine, device, dtype, n, h, v, splits):
    if engine == "torch" and splits is not None:
        pytest.skip("splits only apply to the Triton kernel")
    h_pol, weight, targets = head_inputs(n, h, v, dtype, device, seed=1, scale=2.0, ignore=(4,))
    g = torch.Generator().manual_seed(2)
    h_pos = (h_pol.float().cpu() + 0.5 * torch.randn(n, h, generator=g)).to(dtype).to(device)
    h_neg = (h_pol.float().cpu() + 0.5 * torch.randn(n, h, generator=g)).to(dtype).to(device)
    adv = torch.randn(n, generator=g)
    adv[::7] = 0.0
    adv = adv.to(device)
    has_neg = (torch.rand(n, generator=g) > 0.3).to(device)
    out = ck.contrastive_evidence(h_pol, h_pos, h_neg, weight, targets, adv, has_neg, lam=0.4,
                                  eps_w=0.2, temperature=0.9, backend=engine)
    ref = reference.contrastive_evidence(h_pol, h_pos, h_neg, weight, targets, adv, has_neg,
                                         lam=0.4, eps_w=0.2, temperature=0.9)
    for name in ("lp_policy", "lp_pos", "lp_neg", "delta", "token_advantages"):
        assert rel_err(getattr(out, name), getattr(ref, name)) <= TOL[dtype], name
    valid = targets != -100
    e_delta, e_adv, e_clip = restated_epilogue(
        ref.lp_policy.tolist(), ref.lp_pos.tolist(), ref.lp_neg.tolist(), adv.tolist(),
        has_neg.tolist(), valid.tolist(), 0.4, 0.2)
    assert rel_err(out.delta, e_delta) <= TOL[dtype]
    assert rel_err(out.token_advantages, e_adv) <= TOL[dtype]
    assert out.clipped.dtype == torch.bool
    # the clip flag may differ only where the reference sits within rounding of a boundary
    differs = out.clipped.cpu() != e_clip
    raw = torch.exp(torch.sign(adv.cpu().double()) * e_delta.double())
    near = ((raw - 0.8).abs() < 1e-3) | ((raw - 1.2).abs() < 1e-3)
    assert not (differs & ~near).any()


@pytest.mark.parametrize("engine,device", ENGINES)
def test_no_gradient_and_empty(engine, device):
    h, weight, targets = head_inputs(0, 16, 33, torch.float32, device, requires_grad=True)
    adv = torch.zeros(0, device=device)
    neg = torch.zeros(0, dtype=torch.bool, device=device)
    out = ck.contrastive_evidence(h, h, h, weight, targets, adv, neg, lam=0.5, eps_w=0.2,
                                  backend=engine)
    assert out.delta.shape == (0,) and not out.token_advantages.requires_grad
