"""Shared helpers for the kernel tests: backends to run, inputs, error measures."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cepo_kernels import backend

HAS_CUDA = torch.cuda.is_available()

# (backend, device): the chunked PyTorch engine and the Triton kernels (interpreted on
# CPU, compiled on CUDA); CUDA cases skip without a GPU.
ENGINES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("triton", "cpu", id="triton-interpret",
                 marks=pytest.mark.skipif(not (backend.triton_available() and backend.interpreting()),
                                          reason="needs triton and TRITON_INTERPRET=1")),
    pytest.param("torch", "cuda", id="torch-cuda",
                 marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")]),
    pytest.param("triton", "cuda", id="triton-cuda",
                 marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")]),
]

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# Gradients and differences of log-probs (the k3 KL estimate) in bf16: the bf16 product
# rounds each logit to 8 bits (|z| 2^-9, as every bf16 peer does), and dh / dW are
# rounded to bf16 on output, so these land 1-2% from float64 (log-probs stay <= 1e-2:
# the target logit is recomputed exactly).
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||a - e|| / ||e|| in float64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values in the result"
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def head_inputs(n, h, v, dtype, device, *, seed=0, scale=1.0, ignore=(), requires_grad=False):
    """Random hidden [n, h], weight [v, h], targets [n] (some set to -100). Never zeros."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        if i < n:
            targets[i] = -100
    targets = targets.to(device)
    if requires_grad:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
    return hidden, weight, targets


def grads(loss, *tensors):
    """Gradients of loss w.r.t. tensors (leaves), as a list."""
    return list(torch.autograd.grad(loss, tensors))


aten = torch.ops.aten
FACTORIES = {aten.zeros, aten.empty, aten.full, aten.zeros_like, aten.empty_like,
             aten.full_like, aten.new_zeros, aten.new_empty, aten.new_full, aten.empty_strided}


class OpsInside(TorchDispatchMode):
    """A dispatch mode that sees every op, those inside cepo_kernels' custom ops included.

    A mode sees a custom op (``cepo_kernels::ppo_loss``, ...) as one call and runs it with
    the mode off; this one runs the op's Python implementation under the mode instead, so
    the recorders below see the engines' buffers, products and host reads. Subclasses
    implement ``seen(func, args, out)``, called for every other op after it ran."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "cepo_kernels":
            from torch._library.custom_ops import _maybe_get_opdef
            with self:
                return _maybe_get_opdef(func)._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        self.seen(func, args, out)
        return out

    def seen(self, func, args, out) -> None:
        raise NotImplementedError


class BuffersMade(OpsInside):
    """Records (shape, dtype) of every tensor allocated by a factory (zeros, empty, ...):
    the engines' buffers, not the temporaries of arithmetic (the Triton engine's CPU
    stand-in for the fp32-output GEMM upcasts the weight per chunk, a test-only path)."""

    def __init__(self):
        super().__init__()
        self.made = []  # in order, repeats kept (how many chunks of a kind)

    def seen(self, func, args, out):
        if func.overloadpacket in FACTORIES and isinstance(out, torch.Tensor):
            self.made.append((tuple(out.shape), out.dtype))
