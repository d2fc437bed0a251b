"""The vLLM engine against what the real engine enforces and costs (issue 17, items 3, 6,
7), on the CPU stand-in (tests/fake_vllm.py): the multiprocessing variable, memory on
wake-up, gpu_memory_utilization, dtype, the start-up RNG reseed, the prefix cache,
unknown weight names, one wake / one sleep per step, collective construction."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fake_vllm
from cepo.contexts import render_prompt
from cepo.sampler import SamplingParams
from tiny_lm import make_tiny_model_dir

GiB = fake_vllm.GiB


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("qwen3_gpu_path"), arch="qwen3")


@pytest.fixture
def make(model_dir, monkeypatch):
    """Build VLLMEngines on a fresh 10 GiB fake device; closes them at the end."""
    device = fake_vllm.FakeDevice(total=10 * GiB)
    fake_vllm.install(monkeypatch, device)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from cepo.sampler.vllm_engine import VLLMEngine

    engines = []

    def build(**kw):
        engines.append(VLLMEngine(str(model_dir), tokenizer=AutoTokenizer.from_pretrained(model_dir),
                                  **kw))
        return engines[-1]

    build.device = device
    yield build
    for eng in engines:
        eng.close()


def reference(model_dir):
    return list(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
                .state_dict().items())


def test_inherited_multiprocessing_variable_is_overridden(make, monkeypatch, model_dir):
    """external_launcher asserts V1 multiprocessing is off; an inherited 1 (or vLLM's
    default, on, when unset) must not reach vLLM."""
    with pytest.raises(AssertionError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        fake_vllm.LLM(str(model_dir), distributed_executor_backend="external_launcher")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    with pytest.raises(AssertionError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        fake_vllm.LLM(str(model_dir), distributed_executor_backend="external_launcher")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    eng = make()
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert eng.llm.kwargs["distributed_executor_backend"] == "external_launcher"


def test_wake_up_after_the_update_empties_pytorchs_cache(make, model_dir):
    """The update leaves activations in PyTorch's cache; vLLM cannot reuse those blocks,
    so waking without emptying the cache runs out of memory."""
    eng = make(gpu_memory_utilization=0.35)
    dev = make.device
    assert dev.vllm == {}  # asleep after construction: nothing mapped
    dev.torch_alloc(5 * GiB)   # policy shard, gradients, AdamW moments: kept
    dev.torch_alloc(2 * GiB)   # activations of the update: freed into PyTorch's cache
    dev.torch_free(2 * GiB)
    assert dev.free() < 3.5 * GiB
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # the fake is strict
        eng.llm.wake_up(tags=["kv_cache"])
    eng.llm.calls.clear()
    dev.torch_alloc(2 * GiB)
    dev.torch_free(2 * GiB)
    calls = dev.empty_cache_calls
    eng.update_weights(reference(model_dir))
    out = eng.generate([render_prompt(eng.tokenizer, "1+2")], 2, SamplingParams(max_new_tokens=3),
                       seeds=[1])
    assert len(out[0]) == 2 and dev.empty_cache_calls >= calls + 2  # before each wake-up
    assert dev.vllm == {}  # asleep again: the memory is the trainer's
    assert dev.torch_allocated == 5 * GiB


def test_gpu_memory_utilization_is_an_argument(make):
    from cepo.sampler.vllm_engine import DEFAULT_GPU_MEMORY_UTILIZATION

    assert make().llm.kwargs["gpu_memory_utilization"] == DEFAULT_GPU_MEMORY_UTILIZATION
    assert make(gpu_memory_utilization=0.2).llm.kwargs["gpu_memory_utilization"] == 0.2
    for bad in (0, 1.0, 1.5):
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            make(gpu_memory_utilization=bad)
    make.device.torch_alloc(8 * GiB)  # what vLLM checks at start-up: that much is free
    with pytest.raises(ValueError, match="less than desired GPU memory utilization"):
        make(gpu_memory_utilization=0.35)


def test_dtype_follows_the_request(make):
    assert make().llm.kwargs["dtype"] == "bfloat16"
    assert make(dtype=torch.float32).llm.kwargs["dtype"] == "float32"
    assert make(dtype="float16").llm.kwargs["dtype"] == "float16"
    with pytest.raises(ValueError, match="dtype"):
        make(dtype="auto")


def test_construction_reseeds_the_global_rngs(make):
    """vLLM's worker calls set_random_seed(seed) at start-up: a resumed run must build
    the engine before restoring its RNG state (documented on VLLMEngine)."""
    torch.manual_seed(123)
    restored = torch.get_rng_state()
    make(seed=3, rank=1)
    after = torch.get_rng_state()
    assert not torch.equal(after, restored)
    torch.manual_seed(4)  # seed + rank
    assert torch.equal(after, torch.get_rng_state())


def test_sleep_resets_the_prefix_cache(make, model_dir):
    """A prefix cached with old weights must never serve a later generate; the fake
    raises where vLLM would silently reuse stale KV."""
    eng = make()
    llm = eng.llm
    prompt = render_prompt(eng.tokenizer, "2+2")
    llm.wake_up()
    llm.generate([{"prompt_token_ids": prompt}], fake_vllm.SamplingParams(max_tokens=2))
    llm.collective_rpc("cepo_load_weights", args=(reference(model_dir)[:1],))
    with pytest.raises(AssertionError, match="older weights"):
        llm.generate([{"prompt_token_ids": prompt}], fake_vllm.SamplingParams(max_tokens=2))
    llm.sleep(level=1)
    assert llm.prefix_cache == {}
    params = SamplingParams(temperature=0, max_new_tokens=2)
    for _ in range(2):  # sync + generate, twice, on the same prompt
        eng.update_weights(reference(model_dir)[:1])
        eng.generate([prompt], 1, params)


def test_unknown_weight_names_raise_valueerror_in_vllm(make):
    """vLLM's AutoWeightsLoader raises ValueError on an unknown name (the engine checks
    names first, so this is only reachable by going around it)."""
    eng = make()
    eng.llm.wake_up(tags=["weights"])
    with pytest.raises(ValueError, match="no module or parameter named 'model.bogus'"):
        eng.llm.collective_rpc("cepo_load_weights", args=([("model.bogus", torch.zeros(1))],))


def test_one_generate_one_wake_one_sleep_per_step(make, model_dir):
    """A step: update_weights in buckets, then one generate for all prompts of the step:
    one wake of the weights, one of the KV cache, one llm.generate with a seeded request
    per prompt (n samples each), one sleep."""
    eng = make()
    eng.llm.calls.clear()
    ref = reference(model_dir)
    eng.update_weights(ref[:5])
    eng.update_weights(ref[5:])
    prompts = [render_prompt(eng.tokenizer, c) for c in ("1", "22", "333", "4444")]
    eng.generate(prompts, 3, SamplingParams(max_new_tokens=2), seeds=[9, 8, 7, 6])
    names = [c[0] for c in eng.llm.calls]
    assert names == ["wake_up", "collective_rpc", "collective_rpc", "reset_prefix_cache",
                     "wake_up", "generate", "sleep"]
    assert eng.llm.calls[5] == ("generate", 4, (3, 3, 3, 3))
    seeds = [sp.seed for sp in eng.llm.last_sampling_params]
    assert len(set(seeds)) == 4 and all(0 <= s < 2 ** 62 for s in seeds)
    # vLLM seeds sample j of a request with seed + j: the streams of two prompts whose
    # caller seeds are neighbours must not overlap
    spans = sorted((s, s + 3) for s in seeds)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_the_model_is_reached_through_get_model(make, model_dir, monkeypatch):
    eng = make()
    runner = eng.llm.worker.model_runner
    seen = []
    monkeypatch.setattr(runner, "get_model", lambda: seen.append(1) or runner.model)
    eng.update_weights(reference(model_dir)[:2])
    assert seen
