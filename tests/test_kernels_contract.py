"""The kernels' contract: no [N, V] tensor, named errors, determinism, import isolation."""

import subprocess
import sys

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels import chunked
from kernel_cases import OpsInside, head_inputs


class LargestTensor(OpsInside):
    """Records the largest tensor any op produces, in elements and in bytes."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_bytes = 0

    def seen(self, func, args, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_path_never_materialises_logits(dtype, monkeypatch):
    """No tensor grows with N x V: the largest is one scratch buffer (the scratch holds at
    most 8 x TILE_ELEMENTS bytes, 16 to 64 rows x 4000 vocab here, as many rows as its
    bytes per logit allow) or dW."""
    n, h, v = 512, 16, 4000
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 1 << 16)
    hidden, weight, targets = head_inputs(n, h, v, dtype, "cpu", requires_grad=True)
    old = torch.randn(n) - 8
    adv = torch.randn(n)
    mask = torch.ones(n, dtype=torch.bool)
    with LargestTensor() as rec:
        out = ck.fused_logprobs(hidden, weight, targets, return_entropy=True, backend="torch")
        (out.logprobs.sum() + out.entropy.sum()).backward()
        loss, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, backend="torch")
        loss.backward()
        ck.contrastive_evidence(hidden, hidden, hidden, weight, targets, adv, mask, lam=0.5,
                                eps_w=0.2, backend="torch")
    assert rec.largest_bytes <= max(8 << 16, v * h * 4)  # one scratch buffer, or fp32 dW
    assert rec.largest < n * v // 4
    assert rec.largest >= 16 * v  # it saw the engine's chunks (inside the custom ops)
    # and the naive reference does materialise it (the recorder works)
    with LargestTensor() as rec_ref:
        ck.fused_logprobs(hidden, weight, targets, backend="reference")
    assert rec_ref.largest >= n * v


@pytest.mark.parametrize("engine", ["torch", "triton"])
def test_deterministic_weight_gradient(engine):
    if engine == "triton":
        pytest.importorskip("triton")
        from cepo_kernels import backend
        if not (torch.cuda.is_available() or backend.interpreting()):
            pytest.skip("needs CUDA or the Triton interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets = head_inputs(40, 16, 90, torch.float32, device, requires_grad=True)
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            out = ck.fused_logprobs(hidden, weight, targets, backend=engine)
            results.append(torch.autograd.grad(out.logprobs.sum(), weight)[0])
        assert torch.equal(results[0], results[1])
    finally:
        torch.use_deterministic_algorithms(False)


def _args():
    hidden, weight, targets = head_inputs(4, 8, 10, torch.float32, "cpu")
    per = torch.zeros(4)
    mask = torch.ones(4, dtype=torch.bool)
    return hidden, weight, targets, per, mask


@pytest.mark.parametrize("mutate,name", [
    (lambda a: a.update(hidden=a["hidden"][None]), "hidden"),
    (lambda a: a.update(weight=a["weight"][:, :5]), "hidden"),
    (lambda a: a.update(weight=a["weight"].double()), "weight"),
    (lambda a: a.update(hidden=a["hidden"].int()), "hidden"),
    (lambda a: a.update(targets=a["targets"].int()), "targets"),
    (lambda a: a.update(targets=a["targets"][:3]), "targets"),
    (lambda a: a.update(targets=a["targets"].clone().fill_(10)), "targets"),
    (lambda a: a.update(targets=a["targets"].clone().fill_(-1)), "targets"),
    (lambda a: a.update(temperature=0.0), "temperature"),
    (lambda a: a.update(temperature=float("nan")), "temperature"),
    (lambda a: a.update(targets=a["targets"].to("meta")), "targets"),
])
def test_fused_logprobs_bad_inputs(mutate, name):
    hidden, weight, targets, _, _ = _args()
    args = dict(hidden=hidden, weight=weight, targets=targets, temperature=1.0)
    mutate(args)
    with pytest.raises(ValueError, match=f"'{name}'"):
        ck.fused_logprobs(args["hidden"], args["weight"], args["targets"],
                          temperature=args["temperature"])


def test_evidence_and_ppo_bad_inputs():
    hidden, weight, targets, per, mask = _args()
    with pytest.raises(ValueError, match="'h_pos'"):
        ck.contrastive_evidence(hidden, hidden[:3], hidden, weight, targets, per, mask, lam=0.5,
                                eps_w=0.2)
    with pytest.raises(ValueError, match="'h_neg'"):
        ck.contrastive_evidence(hidden, hidden, hidden.half(), weight, targets, per, mask,
                                lam=0.5, eps_w=0.2)
    with pytest.raises(ValueError, match="'has_negative'"):
        ck.contrastive_evidence(hidden, hidden, hidden, weight, targets, per, per, lam=0.5,
                                eps_w=0.2)
    with pytest.raises(ValueError, match="'advantages'"):
        ck.contrastive_evidence(hidden, hidden, hidden, weight, targets, per[:2], mask, lam=0.5,
                                eps_w=0.2)
    with pytest.raises(ValueError, match="'lam'"):
        ck.contrastive_evidence(hidden, hidden, hidden, weight, targets, per, mask, lam=1.5,
                                eps_w=0.2)
    with pytest.raises(ValueError, match="'mask'"):
        ck.fused_linear_ppo_loss(hidden, weight, targets, per, per, per)
    with pytest.raises(ValueError, match="'old_logprobs'"):
        ck.fused_linear_ppo_loss(hidden, weight, targets, per[:1], per, mask)
    with pytest.raises(ValueError, match="'clip_low'"):
        ck.fused_linear_ppo_loss(hidden, weight, targets, per, per, mask, clip_low=-0.1)
    with pytest.raises(ValueError, match="'backend'"):
        ck.fused_logprobs(hidden, weight, targets, backend="cuda-magic")


def test_backend_switch():
    hidden, weight, targets, _, _ = _args()
    with ck.use_backend("reference"):
        assert ck.fused_logprobs(hidden, weight, targets).logprobs.dtype == torch.float64
    assert ck.get_backend() == "auto"
    assert ck.fused_logprobs(hidden, weight, targets).logprobs.dtype == torch.float32


def test_imports_without_trainer_dependencies():
    """Other RLVR codebases can depend on cepo_kernels alone: torch (and triton) only."""
    code = ("import sys, cepo_kernels, cepo_kernels.chunked, cepo_kernels.reference\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'cepo', 'peft', 'datasets', 'math_verify', 'liger_kernel')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
