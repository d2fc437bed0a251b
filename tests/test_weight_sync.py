"""Weight streaming from FSDP2 to a sampler, and the engine selection."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cepo.sampler.vllm_engine import VLLMEngine, choose_engine
from tiny_lm import make_tiny_model_dir

TESTS = Path(__file__).parent

# A 2-process gloo run on CPU sometimes aborts one rank with "terminate called without an
# active exception" (about 1 run in 10 under load, with transformers 5.23 and 5.24; not
# root-caused). Tests launch again once on exactly that signature; any other failure fails.
FLAKE = "terminate called without an active exception"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_stream_from_two_process_fsdp2(tmp_path, lora):
    """Every parameter once, HF names, full shapes and values, buckets within the limit."""
    model = make_tiny_model_dir(tmp_path / "m", arch="llama")  # untied head: both names
    out = tmp_path / "result.json"
    for attempt in range(2):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                               "2", "--master_port", str(_free_port()),
                               str(TESTS / "dist_weight_sync_worker.py"),
                               str(model), str(out), "lora" if lora else "full"],
                              check=False, timeout=300, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode == 0 or FLAKE not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
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
