"""The vLLM engine's call order, against the CPU stand-in for vllm (tests/fake_vllm.py).

Checks the peer bugs it must avoid: weights loaded before the engine wakes them
(TRL #5142), a wake-up after a sync that restores old weights (TRL #5312), reaching
into llm_engine.model_executor (an in-process-only internal); and that the prefix cache
is reset after each sync and the engine sleeps after generating. The fake raises on a
write to sleeping weights and restores its backup on a weights wake-up, so a wrong
order also shows in the outputs, not only in the recorded calls.
"""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fake_vllm
from cepo.contexts import render_prompt
from cepo.sampler import SamplingParams
from cepo.sampler.conformance import dominant_token_weights
from tiny_lm import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("qwen3_order"), arch="qwen3")


@pytest.fixture
def engine(model_dir, monkeypatch):
    fake_vllm.install(monkeypatch)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    from cepo.sampler.vllm_engine import VLLMEngine

    eng = VLLMEngine(str(model_dir), tokenizer=AutoTokenizer.from_pretrained(model_dir),
                     seed=3, rank=1)
    yield eng
    eng.close()


def names(llm):
    return [c[0] for c in llm.calls]


def test_engine_arguments(engine):
    kw = engine.llm.kwargs
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["enable_sleep_mode"] is True and kw["seed"] == 4  # seed + rank
    assert kw["worker_extension_cls"] == "cepo.sampler.vllm_engine.WeightSyncExtension"
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert names(engine.llm) == ["init", "sleep"]  # asleep until needed


def test_sync_then_generate_order(engine, model_dir):
    tok = engine.tokenizer
    seven = tok.convert_tokens_to_ids("7")
    ref = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    update = dominant_token_weights(ref, seven)
    engine.update_weights(update[:2])
    engine.update_weights(update[2:])  # a second bucket: no second wake-up
    out = engine.generate([render_prompt(tok, "1+2"), render_prompt(tok, "3")], 2,
                          SamplingParams(return_logprobs=True, seed=0, max_new_tokens=3))
    llm = engine.llm
    assert names(llm) == ["init", "sleep", "wake_up", "collective_rpc", "collective_rpc",
                          "reset_prefix_cache", "wake_up", "generate", "sleep"]
    # weights woken before the first write (TRL #5142); after the sync only the KV cache
    # is woken, nothing restores the old weights (TRL #5312)
    assert llm.calls[2] == ("wake_up", ("weights",)) and llm.calls[6] == ("wake_up", ("kv_cache",))
    assert llm.calls[3] == ("collective_rpc", "cepo_load_weights")
    assert not llm.llm_engine_touched  # internals: collective_rpc is the route
    # the pushed weights were in effect: the old backup did not come back
    assert all(c.token_ids == [seven] * 3 and c.finish_reason == "length" for g in out for c in g)
    assert all(len(c.logprobs) == 3 and max(c.logprobs) <= 0 for g in out for c in g)
    # asleep again (level 1: the fresh weights are the ones backed up)
    assert llm.awake == {"weights": False, "kv_cache": False}
    engine.generate([render_prompt(tok, "4")], 1, SamplingParams(temperature=0, max_new_tokens=2))
    assert names(llm)[9:] == ["wake_up", "wake_up", "generate", "sleep"]  # no reset: no sync
    assert [sp.n for sp in llm.last_sampling_params] == [1]


def test_generate_without_sync_wakes_and_sleeps(engine):
    engine.generate([[5, 6]], 1, SamplingParams(max_new_tokens=2))
    assert names(engine.llm) == ["init", "sleep", "wake_up", "wake_up", "generate", "sleep"]
    assert engine.llm.calls[2:4] == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]


def test_rejected_update_touches_nothing(engine):
    with pytest.raises(ValueError, match="bogus"):
        engine.update_weights([("model.norm.weight", torch.zeros(32)), ("bogus", torch.zeros(1))])
    assert names(engine.llm) == ["init", "sleep"]  # not even woken
    engine.update_weights([])  # an empty bucket: nothing to do
    assert names(engine.llm) == ["init", "sleep"]


def test_sleeps_even_when_generation_fails(engine, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(engine.llm, "generate", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.generate([[5]], 1, SamplingParams())
    assert names(engine.llm)[-1] == "sleep" and not engine._weights_awake


def test_close_is_idempotent(engine):
    engine.close()
    engine.close()
    assert engine.llm is None
