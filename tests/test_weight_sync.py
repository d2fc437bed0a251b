"""Weight streaming from FSDP2 to a sampler, and the engine selection."""

import json

import pytest

from cepo.sampler.vllm_engine import VLLMEngine, choose_engine
from launch import TESTS, torchrun
from tiny_lm import make_tiny_model_dir


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_stream_from_two_process_fsdp2(tmp_path, lora):
    """Every parameter once, HF names, full shapes and values, buckets within the limit."""
    model = make_tiny_model_dir(tmp_path / "m", arch="llama")  # untied head: both names
    out = tmp_path / "result.json"
    torchrun([TESTS / "dist_weight_sync_worker.py", model, out, "lora" if lora else "full"])
    r = json.loads(out.read_text())
    assert r["world"] == 2 and r["sharded"]
    assert sorted(r["names"]) == sorted(r["expected"]) and len(set(r["names"])) == len(r["names"])
    assert "lm_head.weight" in r["names"] and not any("lora" in n for n in r["names"])
    assert r["max_err"] < 1e-6
    for sizes in r["sizes"]:
        assert sum(sizes) <= r["limit"] or len(sizes) == 1  # one bucket held at a time
    assert len(r["sizes"]) > 2


def test_engine_selection():
    assert choose_engine("auto", "cpu", True) == ("hf", None)
    assert choose_engine("auto", "cuda", True) == ("vllm", None)
    name, warning = choose_engine("auto", "cuda", False)
    assert name == "hf" and "falling back" in warning
    assert choose_engine("hf", "cuda", True) == ("hf", None)
    with pytest.raises(ValueError, match="not installed"):
        choose_engine("vllm", "cuda", False)
    with pytest.raises(ValueError, match="not CUDA"):
        choose_engine("vllm", "cpu", True)
    with pytest.raises(ValueError, match="'engine'"):
        choose_engine("sglang", "cuda", True)


def test_vllm_engine_without_vllm_says_how_to_install():
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"cepo\[vllm\]"):
        VLLMEngine("/nonexistent", tokenizer=None)
