"""The sampler interface, checked on the Hugging Face engine with tiny random models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TopKLogitsWarper, TopPLogitsWarper

from cepo.contexts import render_prompt
from cepo.sampler import HFEngine, SamplingParams
from cepo.sampler.conformance import check_sampler_conformance, dominant_token_weights
from tiny_lm import make_tiny_model_dir


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("qwen3"), arch="qwen3")


@pytest.fixture(scope="module")
def engine(qwen_dir):
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    return HFEngine(str(qwen_dir), tokenizer=tok, max_batch_size=4), tok


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def prompt_ids(tok, *contents):
    return [render_prompt(tok, c) for c in contents]


def test_conformance_qwen3_from_path(engine, qwen_dir):
    """Tied embeddings, built from a model directory."""
    sampler, tok = engine
    check_sampler_conformance(sampler, tok, load(qwen_dir).state_dict())


def test_conformance_llama_from_model(tmp_path):
    """Untied head, built from an in-memory PreTrainedModel, two rows per micro-batch."""
    path = make_tiny_model_dir(tmp_path, arch="llama", seed=1)
    source = load(path)
    with HFEngine(source, tokenizer=AutoTokenizer.from_pretrained(path), max_batch_size=2) as eng:
        check_sampler_conformance(eng, eng.tokenizer, source.state_dict())


def teacher_forced_logits(model, prompt, response):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0]
    return logits[len(prompt) - 1:-1]  # [len(response), V]


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (7, 0.9)])
def test_logprobs_are_of_the_sampling_distribution(engine, top_k, top_p):
    """log_softmax(logits / T) of the sampled token, after top-k / top-p truncation."""
    sampler, tok = engine
    [prompt] = prompt_ids(tok, "2*3")
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, max_new_tokens=5, seed=3,
                            return_logprobs=True)
    for c in sampler.generate([prompt], 3, params)[0]:
        scores = teacher_forced_logits(sampler.model, prompt, c.trained_ids) / 0.7
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        want = scores.log_softmax(-1).gather(1, torch.tensor(c.trained_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)


def test_greedy_logprobs_are_raw(engine):
    sampler, tok = engine
    [prompt] = prompt_ids(tok, "8-1")
    [[c]] = sampler.generate([prompt], 1, SamplingParams(temperature=0, max_new_tokens=4,
                                                         return_logprobs=True))
    logits = teacher_forced_logits(sampler.model, prompt, c.trained_ids)
    assert c.trained_ids == logits.argmax(-1).tolist()
    want = logits.log_softmax(-1).gather(1, torch.tensor(c.trained_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)


def test_left_padding_and_micro_batches_do_not_change_greedy(engine):
    sampler, tok = engine
    prompts = prompt_ids(tok, "1", "(12+34)*56-7", "3/4", "abc")
    params = SamplingParams(temperature=0, max_new_tokens=5)
    batched = sampler.generate(prompts, 1, params)
    alone = [sampler.generate([p], 1, params)[0] for p in prompts]
    assert [g[0].token_ids for g in batched] == [g[0].token_ids for g in alone]


def test_seeded_generate_leaves_the_global_rng_alone(engine):
    sampler, tok = engine
    prompts = prompt_ids(tok, "5+5")
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    sampler.generate(prompts, 2, SamplingParams(max_new_tokens=3, seed=11))
    assert torch.equal(torch.rand(3), want)


def test_engine_holds_its_own_copy(qwen_dir):
    source = load(qwen_dir)
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    eng = HFEngine(source, tokenizer=tok)
    copy = eng.model
    assert copy is not source and copy.lm_head.weight is copy.model.embed_tokens.weight  # tied
    for (name, a), b in zip(source.state_dict().items(), copy.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    before = source.model.norm.weight.clone()
    eng.update_weights([("model.norm.weight", torch.zeros(before.shape))])
    assert torch.equal(source.model.norm.weight, before)
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())
    eng.close()
    assert eng.model is None


def test_checkpoint_generation_config_does_not_leak(qwen_dir):
    """top_k / repetition_penalty in generation_config.json must not alter sampling."""
    source = load(qwen_dir)
    source.generation_config.top_k = 1
    source.generation_config.repetition_penalty = 5.0
    source.generation_config.do_sample = False
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    eng = HFEngine(source, tokenizer=tok)
    [prompt] = prompt_ids(tok, "6*7")
    params = SamplingParams(max_new_tokens=5, seed=0, return_logprobs=True)
    group = eng.generate([prompt], 4, params)[0]
    assert len({tuple(c.token_ids) for c in group}) > 1  # really sampled, not top-1
    for c in group:
        logits = teacher_forced_logits(eng.model, prompt, c.trained_ids)
        want = logits.log_softmax(-1).gather(1, torch.tensor(c.trained_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)


def test_generation_config_eos_ids_also_stop(qwen_dir):
    """Qwen instruct checkpoints stop on several ids (<|im_end|>, <|endoftext|>)."""
    source = load(qwen_dir)
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    seven = tok.convert_tokens_to_ids("7")
    source.generation_config.eos_token_id = [tok.eos_token_id, seven]
    eng = HFEngine(source, tokenizer=tok)
    assert eng.stop_ids == [tok.eos_token_id, seven]
    eng.update_weights(dominant_token_weights(source.state_dict(), seven))
    out = eng.generate(prompt_ids(tok, "1+1"), 2, SamplingParams(max_new_tokens=4, seed=0))
    assert all(c.token_ids == [] and c.finish_reason == "stop" and c.stop_token_id == seven
               for c in out[0])


def test_update_weights_errors_name_every_problem(engine):
    sampler, _ = engine
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape \(3,\)"):
        sampler.update_weights([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match=r"'module\.model\.norm\.weight', 'bogus'"):
        sampler.update_weights([("module.model.norm.weight", torch.zeros(32)),
                                ("bogus", torch.zeros(1))])


def test_bad_arguments_are_named(engine):
    sampler, tok = engine
    for field, kwargs in [("temperature", dict(temperature=-1)), ("top_p", dict(top_p=0)),
                          ("top_k", dict(top_k=-2)), ("max_new_tokens", dict(max_new_tokens=0))]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="n must be"):
        sampler.generate(prompt_ids(tok, "1"), 0, SamplingParams())
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] is empty"):
        sampler.generate([[5], []], 1, SamplingParams())
    assert sampler.generate([], 3, SamplingParams()) == []


def test_prompt_done_fires_between_micro_batches(engine, monkeypatch):
    """on_prompt_done reports a prompt right after the micro-batch that completes it,
    before the next micro-batch is generated: scoring can overlap generation."""
    sampler, tok = engine
    events = []
    real = sampler._generate_batch

    def batch(prompts, keys, params, *images, **kwargs):
        events.append(("batch", len(prompts)))
        return real(prompts, keys, params, *images, **kwargs)

    monkeypatch.setattr(sampler, "_generate_batch", batch)
    prompts = prompt_ids(tok, "a", "bb", "ccc")  # 3 prompts x 2 samples, 4 rows per batch
    out = sampler.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=3),
                           seeds=[1, 2, 3], on_prompt_done=lambda p, g: events.append(("done", p)))
    assert [e[0] for e in events] == ["batch", "done", "done", "batch", "done"]
    assert sorted(e[1] for e in events if e[0] == "done") == [0, 1, 2]
    assert all(len(g) == 2 for g in out)
