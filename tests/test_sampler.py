"""The sampler interface, checked on the Hugging Face engine with a tiny random model."""

import pytest
import torch
from transformers import AutoTokenizer

from cepo.sampler import HFEngine, SamplingParams
from cepo.sampler.conformance import check_sampler_conformance
from tiny_lm import make_tiny_model_dir


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    tok = AutoTokenizer.from_pretrained(path)
    return HFEngine(str(path), tokenizer=tok, max_batch_size=4), tok


def test_hf_engine_conformance(engine):
    sampler, tok = engine
    check_sampler_conformance(sampler, tok,
                              norm_weight=sampler.model.model.norm.weight.detach().clone())


def test_hf_engine_logprobs_match_model(engine):
    """Returned log-probs are log_softmax(logits / T) of the sampled tokens."""
    sampler, tok = engine
    prompt = list(tok.apply_chat_template([{"role": "user", "content": "2*3"}],
                                          add_generation_prompt=True)["input_ids"])
    out = sampler.generate([prompt], 2, SamplingParams(temperature=0.7, max_new_tokens=5, seed=3,
                                                       return_logprobs=True))
    for c in out[0]:
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = sampler.model(ids).logits[0, len(prompt) - 1:-1] / 0.7
        want = logits.log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)


def test_update_weights_rejects_bad_shape(engine):
    sampler, _ = engine
    with pytest.raises(ValueError, match="model.norm.weight"):
        sampler.update_weights([("model.norm.weight", torch.zeros(3))])
