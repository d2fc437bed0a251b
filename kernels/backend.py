"""Which implementation runs an op: Triton, chunked PyTorch, or the naive reference.

``auto`` (the default) picks Triton for CUDA tensors when Triton imports, and the
chunked PyTorch path otherwise. Force one with ``set_backend``, the ``use_backend``
context manager, a ``backend=`` argument on any op, or the environment variable
``CEPO_KERNELS_BACKEND``. Forcing ``triton`` on CPU tensors works only under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the kernels are tested on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch", "reference")

_current = os.environ.get("CEPO_KERNELS_BACKEND", "auto")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"cepo_kernels: argument 'backend' must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default implementation (one of BACKENDS)."""
    global _current
    _current = _check(name)


def get_backend() -> str:
    """The process-wide default implementation."""
    return _current


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the ``with`` block with the given implementation."""
    global _current
    previous, _current = _current, _check(name)
    try:
        yield
    finally:
        _current = previous


@functools.cache
def triton_available() -> bool:
    """True when triton imports (it is optional: CPU-only installs may lack it)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(device: torch.device, requested: str | None = None) -> str:
    """The concrete implementation ('triton' | 'torch' | 'reference') for tensors on device."""
    name = _check(requested or _current)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("cepo_kernels: backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                "cepo_kernels: backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 "
                "(set before triton is imported) to run the kernels on CPU")
    return name
