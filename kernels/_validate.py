"""Argument checks shared by every implementation: a ValueError that names the argument.

Shape, dtype, device and scalar checks always run (they read no tensor data). Checks
that read tensor data (targets in [0, V)) would synchronise the host with a GPU, so
they run only where that is free (CPU tensors) or when asked for: set
``CEPO_KERNELS_DEBUG=1`` (or call ``set_debug(True)``) to run them on every device,
``CEPO_KERNELS_DEBUG=0`` to skip them everywhere.
"""

from __future__ import annotations

import math
import os

import torch

from ._types import IGNORE_INDEX

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


_debug: bool | None = {"1": True, "0": False}.get(os.environ.get("CEPO_KERNELS_DEBUG", ""))


def set_debug(enabled: bool | None) -> None:
    """Data-dependent checks: True on every device, False never, None (default) CPU only."""
    global _debug
    _debug = enabled


def data_checks(device: torch.device) -> bool:
    """Whether checks that read tensor data run for tensors on device (no host sync
    on CUDA unless debugging)."""
    return _debug if _debug is not None else device.type == "cpu"


def _number(value) -> float | None:
    """value if it is a real number (bools are not), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _finite(v) -> bool:
    """math.isfinite by comparisons, which torch.compile can also trace on a symbolic
    float (a default argument under ``dynamic=True``); NaN fails them all."""
    return -math.inf < v < math.inf


def _fail(name: str, problem: str, fix: str = "") -> None:
    raise ValueError(f"cepo_kernels: argument '{name}' {problem}" + (f"; {fix}" if fix else ""))


def check_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               temperature: float, *, hidden_name: str = "hidden") -> None:
    """Check hidden [N, H], weight [V, H], targets [N] int64 (shapes, dtypes, devices; the
    targets' values: ``check_target_values``)."""
    for name, t in ((hidden_name, hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            _fail(name, f"must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        _fail(hidden_name, f"must be 2-D [N, H], got shape {tuple(hidden.shape)}",
              "flatten batch and sequence dims and gather response positions first")
    if weight.dim() != 2:
        _fail("weight", f"must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        _fail(hidden_name, f"has hidden size {hidden.shape[1]} but weight has {weight.shape[1]}")
    if hidden.dtype not in FLOAT_DTYPES:
        _fail(hidden_name, f"has dtype {hidden.dtype}; expected one of float32, bfloat16, float16")
    if weight.dtype != hidden.dtype:
        _fail("weight", f"has dtype {weight.dtype} but {hidden_name} has {hidden.dtype}",
              "cast both to the same dtype")
    if targets.dtype != torch.int64:
        _fail("targets", f"must be int64, got {targets.dtype}")
    if targets.shape != (hidden.shape[0],):
        _fail("targets", f"must have shape [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    for name, t in ((hidden_name, hidden), ("targets", targets)):
        if t.device != weight.device:
            _fail(name, f"is on {t.device} but weight is on {weight.device}")
    t = _number(temperature)
    if t is None or not (_finite(t) and t > 0):
        _fail("temperature", f"must be a finite number > 0, got {temperature!r}")


def check_target_values(targets: torch.Tensor, vocab: int) -> None:
    """Check targets hold ids in [0, vocab) or IGNORE_INDEX: a data check (``data_checks``),
    run where the work happens (inside the custom ops, so under torch.compile too)."""
    if targets.numel() and data_checks(targets.device):
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            first = int(targets[bad][0])
            _fail("targets", f"has value {first} outside [0, {vocab}) (and not {IGNORE_INDEX})",
                  "check the tokenizer matches the LM head")


def check_same_rows(name: str, t: torch.Tensor, like: torch.Tensor, *, kind: str = "float") -> None:
    """Check a per-token tensor [N] matches `like` [N, ...] in length and device; kind float|bool."""
    if not isinstance(t, torch.Tensor):
        _fail(name, f"must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (like.shape[0],):
        _fail(name, f"must have shape [N] = [{like.shape[0]}], got {tuple(t.shape)}")
    if t.device != like.device:
        _fail(name, f"is on {t.device} but the hidden states are on {like.device}")
    if kind == "bool" and t.dtype != torch.bool:
        _fail(name, f"must be a bool tensor, got {t.dtype}")
    if kind == "float" and not t.dtype.is_floating_point:
        _fail(name, f"must be a floating-point tensor, got {t.dtype}")


def check_same_as(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    """Check a second hidden-state block has the shape, dtype and device of the first."""
    if not isinstance(t, torch.Tensor):
        _fail(name, f"must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        _fail(name, f"has shape {tuple(t.shape)} but {like_name} has {tuple(like.shape)}",
              "all contexts must score the same response tokens")
    if t.dtype != like.dtype:
        _fail(name, f"has dtype {t.dtype} but {like_name} has {like.dtype}")
    if t.device != like.device:
        _fail(name, f"is on {t.device} but {like_name} is on {like.device}")


def check_range(name: str, value: float, low: float, high: float) -> None:
    """Check low <= value <= high (finite)."""
    v = _number(value)
    if v is None or not (_finite(v) and low <= v <= high):
        _fail(name, f"must be a number in [{low}, {high}], got {value!r}")


def check_above(name: str, value: float, low: float, hint: str = "") -> None:
    """Check value > low (finite)."""
    v = _number(value)
    if v is None or not (_finite(v) and v > low):
        _fail(name, f"must be a finite number > {low}, got {value!r}", hint)


def check_choice(name: str, value, choices) -> None:
    """Check value is one of choices."""
    if value not in choices:
        _fail(name, f"must be one of {tuple(choices)}, got {value!r}")
