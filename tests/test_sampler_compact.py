"""The Hugging Face engine's compact decoding loop (rows leave the batch as they stop)
against ``model.generate``: the same completions, token for token, on full attention,
a sliding window shorter than the sequences and two stop tokens; rows really leave the
batch; models it cannot serve fall back to ``generate`` (or are refused when asked)."""


import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cepo.contexts import render_prompt
from cepo.sampler import HFEngine, SamplingParams
from cepo.sampler.conformance import check_sampler_conformance
from tiny_lm import add_frequent_stop_token, make_tiny_model_dir, make_tokenizer

CONTENTS = ("1", "(12+34)*56-7", "3/4", "abc", "9*9=", "x+y", "100-1")


def mistral_dir(path, window: int):
    """A tiny Mistral whose sliding window (``window`` tokens) is shorter than its prompts."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    config = transformers.MistralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=window,
        max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(5)
    model = transformers.MistralForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    model.generation_config.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["qwen3", "llama_two_stops", "mistral_window4"])
def model_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "qwen3":
        path = make_tiny_model_dir(root, arch="qwen3", seed=4)
    elif request.param == "llama_two_stops":
        path = make_tiny_model_dir(root, arch="llama", seed=2)
    else:
        path = mistral_dir(root / "m", window=4)
    # peaked distributions and the most sampled token as a second stop: rows stop at very
    # different steps
    add_frequent_stop_token(path, CONTENTS, head_scale=3.0, samples=4)
    return path


def summary(out):
    return [[(c.token_ids, c.finish_reason, c.stop_token_id) for c in g] for g in out]


PARAMS = [SamplingParams(temperature=1.0, max_new_tokens=12, return_logprobs=True),
          SamplingParams(temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=8,
                         return_logprobs=True),
          SamplingParams(temperature=0.0, max_new_tokens=10, return_logprobs=True)]


@pytest.mark.parametrize("params", PARAMS, ids=["T1", "topk_topp_short", "greedy"])
@pytest.mark.parametrize("max_batch_size", [3, 64])
def test_compact_equals_generate(model_dir, params, max_batch_size):
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [render_prompt(tok, c) for c in CONTENTS]
    seeds = [31 * p + 7 for p in range(len(prompts))]
    compact = HFEngine(str(model_dir), tokenizer=tok, max_batch_size=max_batch_size)
    assert compact.compact
    reference = HFEngine(str(model_dir), tokenizer=tok, max_batch_size=max_batch_size,
                         decode="generate")
    assert not reference.compact
    got = compact.generate(prompts, 4, params, seeds=seeds)
    want = reference.generate(prompts, 4, params, seeds=seeds)
    assert summary(got) == summary(want)
    for g_got, g_want in zip(got, want):
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                       atol=1e-5, rtol=1e-5)
    if params is PARAMS[0]:  # sampled at T = 1: rows stop at many different steps
        lengths = {len(c.token_ids) for g in got for c in g}
        assert len(lengths) > 4, "rows stopped at about the same step: nothing was compacted"
        assert {c.finish_reason for g in got for c in g} == {"stop", "length"}


def count_forwards(eng, monkeypatch) -> list[tuple[int, int]]:
    """Record the input shape [rows, tokens] of every forward the engine runs: the model's
    (the prompt, and every step without the lean decoder) and the lean decoder's steps."""
    from cepo.sampler.lean_decoder import LeanDecoder

    shapes = []
    forward, lean_forward = eng.model.forward, LeanDecoder.forward

    def counting(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    def lean_counting(self, tokens, positions):
        shapes.append((tokens.shape[0], 1))
        return lean_forward(self, tokens, positions)

    eng.model.forward = counting
    monkeypatch.setattr(LeanDecoder, "forward", lean_counting)
    return shapes


@pytest.mark.parametrize("lean", [True, False])
def test_rows_leave_the_batch(model_dir, lean, monkeypatch):
    """Each decode forward carries only the rows still running: over a call, the rows fed
    after the prompt's forward sum to sum(len(trained response) - 1); the prompt forward
    runs each prompt once, not once per sample. With the lean decoder (qwen3, llama) and
    with the model's forward at every step."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    eng = HFEngine(str(model_dir), tokenizer=tok, max_batch_size=64, lean=lean)
    assert (eng.lean is not None) == (lean and "mistral" not in str(model_dir))
    batch_sizes = count_forwards(eng, monkeypatch)
    out = eng.generate([render_prompt(tok, c) for c in CONTENTS], 4,
                       SamplingParams(max_new_tokens=12, return_logprobs=True),
                       seeds=list(range(len(CONTENTS))))
    prefill, decode = batch_sizes[0], batch_sizes[1:]
    assert prefill[0] == len(CONTENTS)
    assert all(shape[1] == 1 for shape in decode)
    rows = [shape[0] for shape in decode]
    assert rows == sorted(rows, reverse=True) and rows[-1] < rows[0]
    assert sum(rows) == sum(len(c.trained_ids) - 1 for g in out for c in g)


def test_prompts_are_reported_at_the_step_their_last_row_stops(model_dir, monkeypatch):
    """With on_prompt_done, compact decoding reports a prompt as soon as its last row
    stops, before the decoding of the other rows ends; every prompt once, and the
    completions are those of a call without the callback."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    eng = HFEngine(str(model_dir), tokenizer=tok, max_batch_size=64)
    prompts = [render_prompt(tok, c) for c in CONTENTS]
    params = SamplingParams(max_new_tokens=12, return_logprobs=True)
    seeds = list(range(len(CONTENTS)))
    plain = eng.generate(prompts, 2, params, seeds=seeds)
    reported = []
    forwards = count_forwards(eng, monkeypatch)
    out = eng.generate(prompts, 2, params, seeds=seeds,
                       on_prompt_done=lambda p, group: reported.append((p, len(forwards), group)))
    assert sorted(p for p, _, _ in reported) == list(range(len(CONTENTS)))
    assert any(at < len(forwards) for _, at, _ in reported)  # before the last forward
    assert summary(out) == summary(plain)
    assert all(group is out[p] for p, _, group in reported)
    for p, _, group in reported:  # a reported group is final: its rows' own lengths
        lengths = [len(c.token_ids) for c in group]
        assert lengths == [len(c.token_ids) for c in plain[p]]


def test_shared_prompt_rows():
    """Runs of identical adjacent rows (same ids and mask) are found; x[first][expand]
    rebuilds the batch; a batch without repeats (or of one row) gives (None, None)."""
    from cepo.sampler.hf_engine import shared_prompt_rows

    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [0, 5, 6], [7, 8, 9], [0, 5, 6], [0, 0, 6]])
    mask = torch.tensor([[0, 1, 1]] * 3 + [[1, 1, 1], [0, 1, 1], [0, 1, 1]])
    mask[5] = torch.tensor([1, 1, 1])  # same ids as a padded row, but a real 0 token
    first, expand = shared_prompt_rows(ids, mask)
    assert first.tolist() == [0, 3, 4, 5]
    assert expand.tolist() == [0, 0, 0, 1, 2, 3]
    assert torch.equal(ids[first][expand], ids) and torch.equal(mask[first][expand], mask)
    assert shared_prompt_rows(ids[3:], mask[3:]) == (None, None)
    assert shared_prompt_rows(ids[:1], mask[:1]) == (None, None)
    ids[5], mask[5] = ids[4], mask[4]
    assert shared_prompt_rows(ids, mask)[0].tolist() == [0, 3, 4]


def test_conformance_of_both_decoders(tmp_path):
    """The sampler conformance suite on the compact loop and on generate."""
    path = make_tiny_model_dir(tmp_path / "m", arch="qwen3", seed=1)
    tok = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    for decode in ("compact", "generate"):
        with HFEngine(str(path), tokenizer=tok, max_batch_size=3, decode=decode) as eng:
            check_sampler_conformance(eng, tok, reference)


def test_decode_choice_and_errors(tmp_path):
    from vl_model import make_tiny_vl_dir

    path = make_tiny_model_dir(tmp_path / "m", arch="qwen3", seed=1)
    tok = AutoTokenizer.from_pretrained(path)
    with pytest.raises(ValueError, match="decode must be 'auto', 'compact' or 'generate'"):
        HFEngine(str(path), tokenizer=tok, decode="fast")
    vl = make_tiny_vl_dir(tmp_path / "vl", arch="qwen3_vl")
    vl_tok = AutoTokenizer.from_pretrained(vl)
    assert not HFEngine(str(vl), tokenizer=vl_tok).compact  # auto: generate for VL
    with pytest.raises(ValueError, match="decode='compact' needs a text model"):
        HFEngine(str(vl), tokenizer=vl_tok, decode="compact")
