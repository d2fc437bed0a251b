"""Two stop tokens (as Qwen's <|im_end|> / <|endoftext|> or Llama-3's <|eot_id|> /
<|end_of_text|>): both engines report the stop token they actually sampled, and its
log-probability, so the trainer trains on the token that was emitted."""


import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fake_vllm
from cepo.contexts import render_prompt
from cepo.sampler import HFEngine, SamplingParams
from cepo.sampler.conformance import check_sampler_conformance
from tiny_lm import add_frequent_stop_token, make_tiny_model_dir

CONTENTS = ("1+2", "(3*4)-5", "9", "abc")


@pytest.fixture(scope="module")
def two_stop_dir(tmp_path_factory):
    """A tiny Llama whose head is scaled up (peaked, non-uniform next-token
    distributions) and whose generation config lists two EOS ids: the tokenizer's and
    the token the model samples most often, so responses often stop on the second."""
    path = make_tiny_model_dir(tmp_path_factory.mktemp("two_stop"), arch="llama", seed=2)
    second = add_frequent_stop_token(path, CONTENTS, head_scale=25.0, samples=8)
    return path, second


def teacher_forced_logprobs(model, prompt, response, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
    logp = (logits / temperature).log_softmax(-1)
    return logp.gather(1, torch.tensor(response)[:, None])[:, 0]


def check_second_stop_token(sampler, path, second):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert sampler.stop_ids == [tok.eos_token_id, second]
    prompts = [render_prompt(tok, c) for c in CONTENTS]
    params = SamplingParams(temperature=0.9, max_new_tokens=12, return_logprobs=True)
    out = sampler.generate(prompts, 6, params, seeds=[100 + p for p in range(len(prompts))])
    on_second = 0
    for prompt, group in zip(prompts, out):
        for c in group:
            assert second not in c.token_ids and tok.eos_token_id not in c.token_ids
            if c.finish_reason == "stop":
                assert c.stop_token_id in (tok.eos_token_id, second)
                assert c.trained_ids == c.token_ids + [c.stop_token_id]
                on_second += c.stop_token_id == second
            else:
                assert c.stop_token_id is None and c.trained_ids == c.token_ids
            assert len(c.logprobs) == len(c.trained_ids)
            want = teacher_forced_logprobs(model, prompt, c.trained_ids, 0.9)
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)
    assert on_second >= 3, f"only {on_second} responses stopped on the second stop token"


def test_hf_reports_the_second_stop_token(two_stop_dir):
    path, second = two_stop_dir
    eng = HFEngine(str(path), tokenizer=AutoTokenizer.from_pretrained(path), max_batch_size=5)
    check_second_stop_token(eng, path, second)


def test_vllm_reports_the_second_stop_token(two_stop_dir, monkeypatch):
    fake_vllm.install(monkeypatch)
    from cepo.sampler.vllm_engine import VLLMEngine

    path, second = two_stop_dir
    with VLLMEngine(str(path), tokenizer=AutoTokenizer.from_pretrained(path)) as eng:
        check_second_stop_token(eng, path, second)


def test_conformance_with_two_stop_tokens(two_stop_dir, monkeypatch):
    """The conformance suite makes each stop id dominant in turn, on both engines."""
    path, second = two_stop_dir
    tok = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    dominant = next(ch for ch in "7QWERTY" if tok.convert_tokens_to_ids(ch) != second)
    with HFEngine(str(path), tokenizer=tok) as eng:
        check_sampler_conformance(eng, tok, reference, dominant_text=dominant)
    fake_vllm.install(monkeypatch)
    from cepo.sampler.vllm_engine import VLLMEngine

    with VLLMEngine(str(path), tokenizer=tok) as eng:
        check_sampler_conformance(eng, tok, reference, dominant_text=dominant)
