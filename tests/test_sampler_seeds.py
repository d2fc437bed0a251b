"""Per-prompt seeds on the Hugging Face engine: a prompt's samples depend only on (its
ids, its seed, n, params, weights), whatever else is in the call and however rows are
batched; the sampler draws from the right distribution; the old call form still works."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cepo.contexts import render_prompt
from cepo.sampler import HFEngine, SamplingParams
from cepo.sampler.base import mix_seed
from cepo.sampler.hf_engine import row_uniform, row_uniforms
from tiny_lm import make_tiny_model_dir

CONTENTS = ("1", "(12+34)*56-7", "3/4", "abc", "9*9=", "x+y", "100-1", "(1)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("qwen3_seeds"), arch="qwen3", seed=4)


@pytest.fixture(scope="module")
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def source(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def engine(source, tok, max_batch_size):
    return HFEngine(source, tokenizer=tok, max_batch_size=max_batch_size)


def summary(group):
    return [(c.token_ids, c.finish_reason, c.stop_token_id) for c in group]


def test_a_prompts_samples_do_not_depend_on_the_call(source, tok):
    """Alone, among others, in another order, with another max_batch_size: same tokens,
    same finish, same stop token; log-probs equal to fp32 rounding (different padding and
    batch shapes change the logits' last bits only)."""
    prompts = [render_prompt(tok, c) for c in CONTENTS]
    seeds = [7 * p + 3 for p in range(len(prompts))]
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=12, return_logprobs=True)
    n = 4
    ref = engine(source, tok, 64).generate(prompts, n, params, seeds=seeds)
    assert len({tuple(c.token_ids) for g in ref for c in g}) > 8  # really sampled
    worst = 0.0
    for mbs in (1, 3, 5):
        eng = engine(source, tok, mbs)
        calls = {"together": (list(range(len(prompts))), eng.generate(prompts, n, params, seeds)),
                 "reversed": (list(reversed(range(len(prompts)))), None),
                 "odd ones": (list(range(1, len(prompts), 2)), None)}
        for name, (order, out) in calls.items():
            if out is None:
                out = eng.generate([prompts[p] for p in order], n, params,
                                   seeds=[seeds[p] for p in order])
            for p, group in zip(order, out):
                assert summary(group) == summary(ref[p]), (mbs, name, p)
                for a, b in zip(group, ref[p]):
                    worst = max([worst] + [abs(x - y) for x, y in zip(a.logprobs, b.logprobs)])
        for p in (0, 1, len(prompts) - 1):
            [alone] = eng.generate([prompts[p]], n, params, seeds=[seeds[p]])
            assert summary(alone) == summary(ref[p]), (mbs, "alone", p)
    assert worst < 1e-4, f"log-probs moved by {worst} between batchings"


def test_seed_and_sample_index_decide_the_row(source, tok):
    """n grows by appending samples: the first n samples of n + 2 are the n samples."""
    [prompt] = [render_prompt(tok, "2*3")]
    params = SamplingParams(max_new_tokens=8)
    eng = engine(source, tok, 4)
    three = eng.generate([prompt], 3, params, seeds=[11])[0]
    five = eng.generate([prompt], 5, params, seeds=[11])[0]
    assert summary(five[:3]) == summary(three)
    assert summary(eng.generate([prompt], 3, params, seeds=[12])[0]) != summary(three)


def test_old_call_form_still_works(source, tok):
    prompts = [render_prompt(tok, c) for c in CONTENTS[:3]]
    eng = engine(source, tok, 2)
    seeded = SamplingParams(max_new_tokens=6, seed=5)
    a = eng.generate(prompts, 2, seeded)
    assert [summary(g) for g in eng.generate(prompts, 2, seeded)] == [summary(g) for g in a]
    # params.seed seeds the call: it equals the per-prompt seeds it derives
    b = eng.generate(prompts, 2, SamplingParams(max_new_tokens=6),
                     seeds=[mix_seed(5, p) for p in range(3)])
    assert [summary(g) for g in b] == [summary(g) for g in a]
    # no seed at all: drawn from torch's global RNG, so torch.manual_seed reproduces it
    unseeded = SamplingParams(max_new_tokens=6)
    torch.manual_seed(0)
    c = eng.generate(prompts, 2, unseeded)
    torch.manual_seed(0)
    assert [summary(g) for g in eng.generate(prompts, 2, unseeded)] == [summary(g) for g in c]


def test_seeded_calls_leave_the_global_rng_alone(source, tok):
    eng = engine(source, tok, 2)
    torch.manual_seed(1)
    want = torch.rand(3)
    torch.manual_seed(1)
    eng.generate([render_prompt(tok, "5")], 3, SamplingParams(max_new_tokens=3), seeds=[4])
    assert torch.equal(torch.rand(3), want)


def test_bad_seeds_are_named(source, tok):
    eng = engine(source, tok, 2)
    prompts = [render_prompt(tok, c) for c in ("1", "2")]
    with pytest.raises(ValueError, match="one int per prompt.*1 seeds for 2 prompts"):
        eng.generate(prompts, 1, SamplingParams(), seeds=[1])
    with pytest.raises(ValueError, match="seeds must be Python ints"):
        eng.generate(prompts, 1, SamplingParams(), seeds=[1, 2.5])


def test_mix_seed_and_row_uniform_are_pure_and_spread():
    assert mix_seed(3, 4) == mix_seed(3, 4) != mix_seed(4, 3)
    assert 0 <= mix_seed(-5, 2 ** 80) < 2 ** 62
    u = torch.tensor([row_uniform(mix_seed(9, j), t) for j in range(50) for t in range(100)],
                     dtype=torch.float64)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.01
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert counts.min() > 400 and counts.max() < 600  # 5000 draws, 500 expected per bin


def test_row_uniforms_is_row_uniform_per_key():
    """The per-step batch form gives row_uniform's numbers exactly, negative and huge keys
    included."""
    keys = [mix_seed(9, j) for j in range(40)] + [-5, 0, 2 ** 70, -(2 ** 63)]
    for step in (0, 1, 63, 10 ** 6):
        assert row_uniforms(keys, step) == [row_uniform(k, step) for k in keys]
    assert row_uniforms([], 3) == []


def test_first_token_frequencies_match_the_processed_distribution(source, tok):
    """3000 rows of one token at T=0.8, top_k=6: the empirical frequencies match
    softmax(top_k(logits / T)) (total variation < 0.05), and the reported log-prob of
    each drawn token is that distribution's."""
    [prompt] = [render_prompt(tok, "7-2")]
    eng = engine(source, tok, 3000)
    params = SamplingParams(temperature=0.8, top_k=6, max_new_tokens=1, return_logprobs=True)
    [group] = eng.generate([prompt], 3000, params, seeds=[42])
    with torch.no_grad():
        logits = source(torch.tensor([prompt])).logits[0, -1] / 0.8
    kth = logits.topk(6).values[-1]
    logp = logits.masked_fill(logits < kth, -math.inf).log_softmax(-1)
    first = torch.tensor([c.trained_ids[0] for c in group])
    freq = torch.bincount(first, minlength=logp.numel()).double() / len(group)
    tv = 0.5 * (freq - logp.double().exp()).abs().sum().item()
    assert tv < 0.05, f"total variation {tv}"
    assert set(first.tolist()) <= set(logits.topk(6).indices.tolist())
    reported = torch.tensor([c.logprobs[0] for c in group])
    torch.testing.assert_close(reported, logp[first], atol=1e-5, rtol=1e-5)
