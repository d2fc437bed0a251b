"""Attention implementation vs compute dtype: flash-attention only for bf16 / fp16.

flash-attn refuses float32 inputs, so choosing it for a float32 run on CUDA would fail at
the first forward. The choice is tested as a function of (device, dtype, flash-attn
importable); flash-attn itself need not be installed.
"""

import pytest
import torch

from cepo import model as hf_model


@pytest.mark.parametrize("importable", [True, False])
@pytest.mark.parametrize("device", ["cuda", "cpu", torch.device("cpu"), torch.device("cuda", 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, None])
def test_default_attn_implementation_by_dtype(monkeypatch, importable, device, dtype):
    monkeypatch.setattr(hf_model, "_flash_attn_importable", lambda: importable)
    on_cuda = torch.device(device).type == "cuda"
    want = ("flash_attention_2" if on_cuda and importable
            and dtype in (torch.bfloat16, torch.float16) else "sdpa")
    assert hf_model.default_attn_implementation(device, dtype) == want


def test_default_attn_implementation_without_dtype_is_sdpa(monkeypatch):
    """Callers that do not say the compute dtype get the implementation every dtype runs."""
    monkeypatch.setattr(hf_model, "_flash_attn_importable", lambda: True)
    assert hf_model.default_attn_implementation("cuda") == "sdpa"


def test_flash_attn_importable_here_is_a_bool():
    """The real probe (no flash-attn on the CPU machines) answers without raising."""
    assert hf_model._flash_attn_importable() in (True, False)


def test_check_attn_implementation():
    for ok in [("flash_attention_2", torch.bfloat16), ("flash_attention_3", torch.float16),
               ("sdpa", torch.float32), ("eager", torch.float32), ("sdpa", torch.bfloat16)]:
        hf_model.check_attn_implementation(*ok)
    with pytest.raises(ValueError, match="'flash_attention_2' needs bfloat16 or float16 compute"):
        hf_model.check_attn_implementation("flash_attention_2", torch.float32)
    with pytest.raises(ValueError, match="use attn_implementation 'sdpa'"):
        hf_model.check_attn_implementation("kernels-community/flash-attn", torch.float32)
