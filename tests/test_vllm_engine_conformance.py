"""VLLMEngine against the sampler contract, over the CPU stand-in for vLLM (fake_vllm).

The fake follows vLLM's documented behaviour where the engine must compensate for it:
the stop token is returned in token_ids, load_weights raises ValueError on an unknown
name and skips lm_head.* of a tied model, greedy rejects n > 1.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fake_vllm
from cepo.contexts import render_prompt
from cepo.sampler import SamplingParams
from cepo.sampler.conformance import check_sampler_conformance, dominant_token_weights
from tiny_lm import make_tiny_model_dir


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """Tied embeddings: lm_head.weight is not in the safetensors file."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("qwen3_vllm"), arch="qwen3")


@pytest.fixture
def make_engine(monkeypatch):
    fake_vllm.install(monkeypatch)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from cepo.sampler.vllm_engine import VLLMEngine

    engines = []

    def make(path, **kw):
        engines.append(VLLMEngine(str(path), tokenizer=AutoTokenizer.from_pretrained(path), **kw))
        return engines[-1]

    yield make
    for eng in engines:
        eng.close()


def state(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def fake_param(engine, name):
    return dict(engine.llm.worker.model_runner.model.hf.named_parameters())[name].detach().clone()


def prompts(tok, *contents):
    return [render_prompt(tok, c) for c in contents]


def test_conformance_qwen3_tied(make_engine, qwen_dir):
    eng = make_engine(qwen_dir)
    check_sampler_conformance(eng, eng.tokenizer, state(qwen_dir))


def test_conformance_llama_untied_sharded(make_engine, tmp_path):
    """Untied head, checkpoint in several safetensors shards."""
    src = make_tiny_model_dir(tmp_path / "one", arch="llama", seed=1)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="20KB")
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 1
    eng = make_engine(path)
    assert eng.param_shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_sampler_conformance(eng, eng.tokenizer, model.state_dict())


def test_sleep_level_2_needs_a_full_sync_before_each_generate(make_engine, qwen_dir):
    """Level 2 discards the weights (the fake fills them with NaN): generating from them
    would be garbage, so the engine refuses until every parameter was loaded again."""
    eng = make_engine(qwen_dir, sleep_level=2)
    ref = state(qwen_dir)
    [prompt] = prompts(eng.tokenizer, "1+2")
    greedy = SamplingParams(temperature=0, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="sleep_level 2"):
        eng.generate([prompt], 1, greedy)
    eng.update_weights([("model.norm.weight", ref["model.norm.weight"])])
    with pytest.raises(RuntimeError, match="sleep_level 2"):
        eng.generate([prompt], 1, greedy)
    eng.update_weights(list(ref.items()))
    first = eng.generate([prompt], 1, greedy)
    assert eng.llm.calls[-1] == ("sleep", 2)
    with pytest.raises(RuntimeError, match="sleep_level 2"):
        eng.generate([prompt], 1, greedy)
    eng.update_weights(list(ref.items()))
    assert eng.generate([prompt], 1, greedy)[0][0].token_ids == first[0][0].token_ids


def test_unknown_name_or_shape_rejects_the_whole_call(make_engine, qwen_dir):
    eng = make_engine(qwen_dir)
    before = fake_param(eng, "model.norm.weight")
    calls = list(eng.llm.calls)
    with pytest.raises(ValueError, match=r"'model\.nonexistent\.weight'") as err:
        eng.update_weights([("model.norm.weight", torch.zeros(32)),
                            ("model.nonexistent.weight", torch.zeros(1))])
    assert "nothing was loaded" in str(err.value)
    shape_error = r"'model\.norm\.weight' has shape \(3,\), expected \(32,\)"
    with pytest.raises(ValueError, match=shape_error):
        eng.update_weights([("model.layers.0.input_layernorm.weight", torch.zeros(32)),
                            ("model.norm.weight", torch.zeros(3))])
    assert eng.llm.calls == calls  # no wake-up, no collective_rpc
    assert torch.equal(fake_param(eng, "model.norm.weight"), before)
    assert torch.equal(fake_param(eng, "model.layers.0.input_layernorm.weight"),
                       state(qwen_dir)["model.layers.0.input_layernorm.weight"])


def test_tied_lm_head_alias_takes_effect(make_engine, qwen_dir):
    """vLLM skips lm_head.weight of a tied model; the engine loads it as the embedding."""
    eng = make_engine(qwen_dir)
    seven = eng.tokenizer.convert_tokens_to_ids("7")
    update = [("lm_head.weight" if n == "model.embed_tokens.weight" else n, t)
              for n, t in dominant_token_weights(state(qwen_dir), seven)]
    eng.update_weights(update)
    out = eng.generate(prompts(eng.tokenizer, "1+2"), 2, SamplingParams(max_new_tokens=3, seed=0))
    assert all(c.token_ids == [seven] * 3 for c in out[0])


def test_generation_config_eos_is_a_stop_id(make_engine, tmp_path):
    """A second stop id (Qwen's <|endoftext|> next to <|im_end|>) is passed and cut."""
    path = make_tiny_model_dir(tmp_path, arch="qwen3")
    tok = AutoTokenizer.from_pretrained(path)
    seven = tok.convert_tokens_to_ids("7")
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [tok.eos_token_id, seven]
    (path / "generation_config.json").write_text(json.dumps(gen))
    eng = make_engine(path)
    assert eng.stop_ids == [tok.eos_token_id, seven]
    eng.update_weights(dominant_token_weights(state(path), seven))
    params = SamplingParams(max_new_tokens=4, seed=0, return_logprobs=True)
    out = eng.generate(prompts(tok, "1+1", "2"), 2, params)
    assert all(c.token_ids == [] and c.finish_reason == "stop" and c.stop_token_id == seven
               and len(c.logprobs) == 1 and c.logprobs[0] > -1e-3
               and c.text == "" for g in out for c in g)
    assert all(set(sp.stop_token_ids) == {tok.eos_token_id, seven}
               for sp in eng.llm.last_sampling_params)


def test_stop_cut_mid_completion_keeps_logprobs_aligned(make_engine, qwen_dir):
    """Greedy run, then the same run with its third token made a stop id: cut before it."""
    eng = make_engine(qwen_dir)
    [prompt] = prompts(eng.tokenizer, "8-1")
    params = SamplingParams(temperature=0, max_new_tokens=6, return_logprobs=True)
    [[full]] = eng.generate([prompt], 1, params)
    assert full.finish_reason == "length" and len(full.token_ids) == 6
    third = full.token_ids[2]
    first = full.token_ids.index(third)
    eng.stop_ids = eng.stop_ids + [third]
    [[cut]] = eng.generate([prompt], 1, params)
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[:first]
    assert cut.stop_token_id == third
    assert cut.logprobs == pytest.approx(full.logprobs[:first + 1])  # the stop token's last


def test_logprobs_are_of_the_processed_distribution(make_engine, qwen_dir):
    """log_softmax(top-k/top-p(logits / T)) of each kept token, position by position."""
    eng = make_engine(qwen_dir)
    model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    [prompt] = prompts(eng.tokenizer, "2*3")
    params = SamplingParams(temperature=0.7, top_k=7, top_p=0.9, max_new_tokens=5, seed=3,
                            return_logprobs=True)
    for c in eng.generate([prompt], 3, params)[0]:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
        want = [fake_vllm.top_k_top_p(row / 0.7, 7, 0.9).log_softmax(-1)[t]
                for row, t in zip(logits, c.token_ids)]
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.stack(want),
                                   atol=1e-4, rtol=1e-4)


def test_greedy_sends_one_unseeded_sample(make_engine, qwen_dir):
    eng = make_engine(qwen_dir)
    out = eng.generate(prompts(eng.tokenizer, "5"), 3,
                       SamplingParams(temperature=0, top_k=5, top_p=0.5, seed=9, max_new_tokens=3))
    [sp] = eng.llm.last_sampling_params
    assert (sp.n, sp.seed, sp.temperature, sp.top_k, sp.top_p) == (1, None, 0.0, 0, 1.0)
    assert len(out[0]) == 3 and out[0][0] is not out[0][1]
    assert out[0][0].token_ids == out[0][1].token_ids == out[0][2].token_ids


def test_dtensor_like_tensors_are_gathered(make_engine, qwen_dir):
    class Sharded:  # what the engine may use of a DTensor: the global shape, full_tensor()
        def __init__(self, full):
            self.shape, self._full = full.shape, full

        def full_tensor(self):
            return self._full

    eng = make_engine(qwen_dir)
    eng.update_weights([("model.norm.weight", Sharded(torch.full((32,), 0.5)))])
    assert torch.equal(fake_param(eng, "model.norm.weight"), torch.full((32,), 0.5))


def test_context_overflow_is_an_error_not_a_silent_length(make_engine, qwen_dir):
    eng = make_engine(qwen_dir, max_model_len=24)
    [prompt] = prompts(eng.tokenizer, "(12+34)*56-78")
    assert 10 < len(prompt) < 20
    with pytest.raises(RuntimeError, match="max_model_len"):
        eng.generate([prompt], 1, SamplingParams(temperature=0, max_new_tokens=40))
