"""No op synchronises the host with the device: data-dependent checks are opt-in.

On CPU there is no device to wait for, so the test records the ops that WOULD block the
host on CUDA (reading a value back: ``.item()``, ``bool(t)``, ``nonzero``, ``equal``)
while the ops run with CUDA's settings (data checks off, no row skipping). On CUDA the
same ops run under ``torch.cuda.set_sync_debug_mode("error")``.
"""

import pytest
import torch
import cepo_kernels as ck
from cepo_kernels import _validate, chunked
from kernel_cases import HAS_CUDA, OpsInside, head_inputs

SYNCING = ("_local_scalar_dense", "is_nonzero", "nonzero", "equal", "item")


class SyncRecorder(OpsInside):
    """Records every op that reads tensor data back to the host."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def seen(self, func, args, out):
        if func.overloadpacket.__name__ in SYNCING:
            self.reads.append(func.overloadpacket.__name__)


def _inputs(device):
    hidden, weight, targets = head_inputs(37, 16, 101, torch.float32, device, ignore=(3,),
                                          requires_grad=True)
    g = torch.Generator().manual_seed(5)
    adv = torch.randn(37, generator=g).to(device)
    old = (torch.randn(37, generator=g) - 4.0).to(device)
    mask = (torch.rand(37, generator=g) > 0.3).to(device)
    return hidden, weight, targets, adv, old, mask


def _run_all_ops(device, backend, inputs=None):
    hidden, weight, targets, adv, old, mask = inputs or _inputs(device)
    out = ck.fused_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True,
                            backend=backend)
    torch.autograd.grad(out.logprobs.sum() + out.entropy.sum(), [hidden, weight])
    loss, _ = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, return_entropy=True,
                                       ref_logprobs=old, kl_coef=0.1, backend=backend)
    torch.autograd.grad(loss, [hidden, weight])
    ck.contrastive_evidence(hidden, hidden, hidden, weight, targets, adv, mask, lam=0.5,
                            eps_w=0.2, backend=backend)


def test_no_host_read_with_cuda_settings(monkeypatch):
    monkeypatch.setattr(_validate, "_debug", False)
    monkeypatch.setattr(chunked, "SKIP_ZERO_ROWS", False)
    with SyncRecorder() as rec:
        _run_all_ops("cpu", "torch")
    assert rec.reads == [], f"ops that would block the host on CUDA: {sorted(set(rec.reads))}"


def test_recorder_sees_the_opt_in_checks(monkeypatch):
    """The recorder works: the targets check (debug) and row skipping (CPU) do read data."""
    monkeypatch.setattr(_validate, "_debug", True)
    monkeypatch.setattr(chunked, "SKIP_ZERO_ROWS", False)
    with SyncRecorder() as rec:
        _run_all_ops("cpu", "torch")
    assert rec.reads
    monkeypatch.setattr(_validate, "_debug", False)
    monkeypatch.setattr(chunked, "SKIP_ZERO_ROWS", True)
    with SyncRecorder() as rec:
        _run_all_ops("cpu", "torch")
    assert rec.reads


def test_debug_flag_controls_the_targets_check(monkeypatch):
    hidden, weight, targets = head_inputs(4, 8, 10, torch.float32, "cpu")
    targets[1] = 10
    monkeypatch.setattr(_validate, "_debug", None)  # default: checked on CPU
    with pytest.raises(ValueError, match="'targets'"):
        ck.fused_logprobs(hidden, weight, targets)
    assert _validate.data_checks(torch.device("cpu"))
    assert not _validate.data_checks(torch.device("cuda", 0))  # default: not on CUDA
    ck.set_debug(True)
    try:
        assert _validate.data_checks(torch.device("cuda", 0))
    finally:
        ck.set_debug(None)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_sync_on_cuda(backend, monkeypatch):
    monkeypatch.setattr(_validate, "_debug", None)
    inputs = _inputs("cuda")  # host-to-device copies happen here, before the check
    _run_all_ops("cuda", backend, inputs)  # warm-up: compile, autotune, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run_all_ops("cuda", backend, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
