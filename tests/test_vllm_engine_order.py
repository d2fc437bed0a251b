"""The vLLM engine's call order, against a recording stand-in for vllm (no GPU needed).

Checks the peer bugs it must avoid: weights loaded before the engine wakes them
(TRL #5142), a wake-up after a sync that restores old weights (TRL #5312), reaching
into llm_engine.model_executor (removed in vLLM V1, #16434); and that the prefix cache
is reset after each sync and the engine sleeps after generating.
"""

import sys
import types

import pytest
import torch

from cepo.sampler import SamplingParams


class _Out:
    def __init__(self, ids):
        self.token_ids, self.finish_reason = ids, "stop"
        self.logprobs = [{t: types.SimpleNamespace(logprob=-0.5)} for t in ids]


class FakeLLM:
    calls: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.awake = {"weights": True, "kv_cache": True}
        FakeLLM.calls.append(("init", kwargs["distributed_executor_backend"], kwargs["enable_sleep_mode"]))

    def __getattr__(self, name):
        if name == "llm_engine":
            raise AssertionError("must not reach into llm_engine (removed in vLLM V1)")
        raise AttributeError(name)

    def sleep(self, level):
        self.awake = {"weights": False, "kv_cache": False}
        FakeLLM.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        for t in tags:
            self.awake[t] = True
        FakeLLM.calls.append(("wake", tuple(tags)))

    def collective_rpc(self, method, args=()):
        assert self.awake["weights"], "weights written while asleep (TRL #5142)"
        FakeLLM.calls.append(("rpc", method, len(args[0])))

    def reset_prefix_cache(self):
        FakeLLM.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, sp, use_tqdm=False):
        assert self.awake["weights"] and self.awake["kv_cache"]
        FakeLLM.calls.append(("generate", len(prompts), sp.n))
        return [types.SimpleNamespace(outputs=[_Out([5, 6, 1]) for _ in range(sp.n)]) for _ in prompts]


@pytest.fixture
def engine(monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    FakeLLM.calls = []
    from cepo.sampler.vllm_engine import VLLMEngine
    tok = types.SimpleNamespace(eos_token_id=1, decode=lambda ids, skip_special_tokens: "x" * len(ids))
    return VLLMEngine("/model", tokenizer=tok, seed=3, rank=1)


def test_sync_then_generate_order(engine):
    engine.update_weights([("a", torch.zeros(1)), ("b", torch.zeros(1))])
    engine.update_weights([("c", torch.zeros(1))])  # a second bucket: no second wake-up
    out = engine.generate([[1, 2], [3]], 2, SamplingParams(return_logprobs=True, seed=0))
    names = [c[0] for c in FakeLLM.calls]
    assert names == ["init", "sleep", "wake", "rpc", "rpc", "reset_prefix_cache", "wake", "generate",
                     "sleep"]
    assert FakeLLM.calls[0][1:] == ("external_launcher", True)
    assert FakeLLM.calls[2] == ("wake", ("weights",)) and FakeLLM.calls[6] == ("wake", ("kv_cache",))
    # nothing after the sync restores weights: the only wake-ups are weights (before) and kv cache
    assert len(out) == 2 and all(c.token_ids == [5, 6] and c.logprobs == [-0.5, -0.5]
                                 for g in out for c in g)


def test_generate_without_sync_wakes_and_sleeps(engine):
    engine.generate([[1]], 1, SamplingParams())
    names = [c[0] for c in FakeLLM.calls]
    assert names == ["init", "sleep", "wake", "wake", "generate", "sleep"]
    assert "reset_prefix_cache" not in names
