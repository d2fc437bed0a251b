"""A conformance check every sampler engine must pass (HF on CPU here; vLLM on a GPU).

Engine-agnostic: it talks to the engine only through ``generate`` / ``update_weights``
and learns about the model only from ``reference_state``, the Hugging Face state dict
the engine starts from. To check that weight updates take effect it pushes weights
that make one chosen token win at every position (``dominant_token_weights``), which
also pins down EOS handling and prompt stripping exactly, then restores the reference.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from cepo.sampler.base import FINISH_REASONS, Completion, SamplingParams

PROMPTS = ("1+2", "(3*4)-5", "9", "12*(3+4)-56/8", "0", "2-1")
"""User messages of the check: different lengths (left padding), none contains a '7'."""


def dominant_token_weights(reference_state: Mapping[str, torch.Tensor], token_id: int,
                           margin: float = 50.0) -> list[tuple[str, torch.Tensor]]:
    """A partial update after which ``token_id`` wins by ``margin`` logits everywhere.

    For Llama / Qwen-style decoders (RMSNorm final norm, residual blocks ending in
    ``o_proj`` and ``down_proj``): zeroing every ``o_proj`` / ``down_proj`` makes each
    block the identity, so the final hidden state is the input embedding of the last
    token. All embedding rows are set to ones (the winner's to twos), which the final
    RMSNorm maps to the same unit vector; with the norm weight ``margin / H`` every
    logit is ``margin`` except the winner's, ``2 * margin``. The LM head gets the same
    matrix (tied or not). Returns (name, tensor) pairs, tensors in the reference dtypes.
    """
    names = list(reference_state)
    embed = [k for k in names if k.endswith("embed_tokens.weight")]
    blocks_out = [k for k in names if k.endswith(("o_proj.weight", "down_proj.weight",
                                                  "o_proj.bias", "down_proj.bias"))]
    if len(embed) != 1 or "model.norm.weight" not in reference_state or not blocks_out:
        raise ValueError("dominant_token_weights: needs a Llama/Qwen-style state dict "
                         "('*embed_tokens.weight', 'model.norm.weight', '*o_proj.weight', "
                         "'*down_proj.weight')")
    table = reference_state[embed[0]]
    vocab, hidden = table.shape
    if not 0 <= token_id < vocab:
        raise ValueError(f"dominant_token_weights: token_id {token_id} is outside the "
                         f"vocabulary of {vocab}")
    rows = torch.ones(vocab, hidden, dtype=table.dtype)
    rows[token_id] = 2.0
    update = [(embed[0], rows)]
    if "lm_head.weight" in reference_state:
        update.append(("lm_head.weight", rows.clone()))
    norm = reference_state["model.norm.weight"]
    update.append(("model.norm.weight", torch.full(norm.shape, margin / hidden, dtype=norm.dtype)))
    update += [(k, torch.zeros_like(reference_state[k], device="cpu")) for k in blocks_out]
    return update


def _prompts(tokenizer) -> list[list[int]]:
    from cepo.contexts import render_prompt

    return [render_prompt(tokenizer, content) for content in PROMPTS]


def _tokens(out: list[list[Completion]]) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in out]


def _stop_ids(sampler, tokenizer) -> list[int]:
    return list(getattr(sampler, "stop_ids", None) or [tokenizer.eos_token_id])


def _check_shapes(out, prompts, n, params: SamplingParams, tokenizer, stop_ids=None) -> None:
    stop_ids = set(stop_ids or [tokenizer.eos_token_id])
    assert isinstance(out, list) and len(out) == len(prompts), \
        f"generate must return one list per prompt ({len(prompts)}), got {len(out)}"
    for p, group in enumerate(out):
        assert len(group) == n, f"prompt {p}: expected {n} completions, got {len(group)}"
        for c in group:
            assert isinstance(c, Completion), f"expected Completion, got {type(c)}"
            assert c.prompt_index == p, f"prompt_index {c.prompt_index} in the group of prompt {p}"
            assert all(isinstance(t, int) for t in c.token_ids), "token_ids must be Python ints"
            assert len(c.token_ids) <= params.max_new_tokens, "more tokens than max_new_tokens"
            assert not stop_ids & set(c.token_ids), \
                "token_ids must stop before the first stop token"
            assert c.finish_reason in FINISH_REASONS, f"finish_reason {c.finish_reason!r}"
            want = "length" if len(c.token_ids) == params.max_new_tokens else "stop"
            assert c.finish_reason == want, \
                f"{len(c.token_ids)}/{params.max_new_tokens} tokens: finish_reason must be {want!r}"
            if c.finish_reason == "stop":
                assert c.stop_token_id in stop_ids, \
                    f"stop_token_id must be the emitted stop id, got {c.stop_token_id}"
            else:
                assert c.stop_token_id is None, "stop_token_id must be None for 'length'"
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True), \
                "text must be token_ids decoded with skip_special_tokens=True"
            if params.return_logprobs:
                trained = len(c.token_ids) + (c.finish_reason == "stop")
                assert c.logprobs is not None and len(c.logprobs) == trained, \
                    "one logprob per response token, plus one for the stop token"
                assert all(math.isfinite(lp) and lp <= 1e-5 for lp in c.logprobs), \
                    f"logprobs must be finite and <= 0, got {c.logprobs}"
            else:
                assert c.logprobs is None, "logprobs must be None unless asked"


def check_sampler_conformance(sampler, tokenizer, reference_state: Mapping[str, torch.Tensor],
                              *, max_new_tokens: int = 6, dominant_text: str = "7") -> None:
    """Assert the ``Sampler`` contract on ``sampler``; raises AssertionError on a breach.

    reference_state: the Hugging Face state dict ({name: tensor}) the engine holds now
    (e.g. ``AutoModelForCausalLM.from_pretrained(path).state_dict()``); the engine is
    left holding it again at the end. The model should be a random or weak one, so that
    samples at temperature 1 vary. dominant_text: a single-token string absent from the
    prompts (and from the engine's stop ids), made to win by the weight-update checks.
    The stop ids are the engine's ``stop_ids`` attribute (else the tokenizer's EOS).
    Checks, in order, with several prompts of different lengths per call: output
    shapes, n per prompt, prompt_index, stop cut, finish reasons and ``stop_token_id``,
    decoded text, logprob count (one more for the stop token) and sign; seed
    reproducibility (and a new seed changes samples); per-prompt ``seeds`` make a
    prompt's samples independent of the rest of the call (``check_per_prompt_seeds``);
    greedy (temperature 0) is deterministic, ignores the seed and equals top_k=1
    sampling; update_weights takes effect (prompt stripped, dominant token at every
    position; weights making each stop id dominant give empty "stop" completions that
    report that id and its logprob), a partial update keeps the weights it does not
    name, restoring the reference restores the outputs; unknown names raise ValueError.
    """
    prompts = _prompts(tokenizer)
    stop_ids = _stop_ids(sampler, tokenizer)
    m = max_new_tokens

    def check(out, n, params):
        _check_shapes(out, prompts, n, params, tokenizer, stop_ids)

    sampled = SamplingParams(temperature=1.0, max_new_tokens=m, seed=123, return_logprobs=True)
    out = sampler.generate(prompts, 3, sampled)
    check(out, 3, sampled)
    assert _tokens(sampler.generate(prompts, 3, sampled)) == _tokens(out), \
        "the same seed must reproduce the same samples"
    other = sampler.generate(prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=m, seed=7))
    check(other, 3, SamplingParams(temperature=1.0, max_new_tokens=m))
    assert _tokens(other) != _tokens(out), "a different seed must give different samples"
    assert len({tuple(c.token_ids) for g in out for c in g}) > 1, "samples must vary at T=1"

    check_per_prompt_seeds(sampler, tokenizer, max_new_tokens=m)

    greedy_params = SamplingParams(temperature=0.0, max_new_tokens=m)
    greedy = sampler.generate(prompts, 2, greedy_params)
    check(greedy, 2, greedy_params)
    for group in greedy:
        assert group[0].token_ids == group[1].token_ids, "greedy decoding must be deterministic"
    seeded = sampler.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=m,
                                                         seed=99, return_logprobs=True))
    check(seeded, 1, SamplingParams(temperature=0, max_new_tokens=m, return_logprobs=True))
    assert [g[0].token_ids for g in seeded] == [g[0].token_ids for g in greedy], \
        "greedy decoding must not depend on the seed"
    top1 = sampler.generate(prompts, 2, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=m,
                                                       seed=5))
    assert _tokens(top1) == _tokens(greedy), \
        "temperature 0 must equal sampling with top_k=1 (argmax)"

    # weight updates: a dominant token, a partial update, a dominant EOS, the reference
    token = tokenizer.encode(dominant_text, add_special_tokens=False)
    assert len(token) == 1, f"dominant_text {dominant_text!r} must be a single token, got {token}"
    token = token[0]
    assert token not in stop_ids and all(token not in p for p in prompts)
    sampler.update_weights(dominant_token_weights(reference_state, token))
    forced_params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=m, seed=1,
                                   return_logprobs=True)
    forced = sampler.generate(prompts, 2, forced_params)
    check(forced, 2, forced_params)
    for group in forced:
        for c in group:
            assert c.token_ids == [token] * m and c.finish_reason == "length", \
                f"update_weights had no effect (or the prompt leaked in): {c.token_ids}"
            assert all(lp > -1e-3 for lp in c.logprobs), "a dominant token has logprob ~ 0"
    # a partial update (the final norm alone, a smaller margin) keeps everything else
    norm = reference_state["model.norm.weight"]
    sampler.update_weights([("model.norm.weight",
                             torch.full(norm.shape, 20.0 / norm.numel(), dtype=norm.dtype))])
    partial = sampler.generate(prompts, 1, greedy_params)
    assert all(g[0].token_ids == [token] * m for g in partial), \
        "a partial update must keep the weights it does not name"
    # every stop id (the tokenizer's EOS and the generation config's others) stops, is
    # reported as stop_token_id and has its own logprob, last in the list
    for stop_id in stop_ids:
        sampler.update_weights(dominant_token_weights(reference_state, stop_id))
        stopped = sampler.generate(prompts, 2, forced_params, seeds=list(range(len(prompts))))
        check(stopped, 2, forced_params)
        for group in stopped:
            for c in group:
                assert c.token_ids == [] and c.finish_reason == "stop" and c.text == "" \
                    and c.stop_token_id == stop_id and len(c.logprobs) == 1 \
                    and c.logprobs[0] > -1e-3, \
                    f"an immediate stop on {stop_id} gives an empty 'stop' completion " \
                    f"reporting it, with its logprob ~ 0; got {c}"

    sampler.update_weights(list(reference_state.items()))
    restored = sampler.generate(prompts, 2, greedy_params)
    assert _tokens(restored) == _tokens(greedy), "restoring the weights must restore the outputs"

    for bad in ([("no.such.parameter", torch.zeros(1))],
                [("model.norm.weight", reference_state["model.norm.weight"]),
                 ("model.nonexistent.weight", torch.zeros(1))]):
        try:
            sampler.update_weights(bad)
        except ValueError as e:
            assert bad[-1][0] in str(e), f"the error must name the unknown parameter: {e}"
        else:
            raise AssertionError(f"update_weights must reject unknown names ({bad[-1][0]!r})")
    assert _tokens(sampler.generate(prompts, 2, greedy_params)) == _tokens(greedy)


def check_per_prompt_seeds(sampler, tokenizer, *, max_new_tokens: int = 6, n: int = 3) -> None:
    """Assert that with ``seeds`` a prompt's samples depend only on (its ids, its seed):
    not on the other prompts of the call, their order or their number. Also: seeds are
    honoured over ``params.seed``, and a repeated prompt with another seed differs;
    ``on_prompt_done`` is called once per prompt with its returned list, samples unchanged."""
    prompts = _prompts(tokenizer)
    stop_ids = _stop_ids(sampler, tokenizer)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=max_new_tokens,
                            return_logprobs=True)
    seeds = [1000 + 17 * p for p in range(len(prompts))]
    together = sampler.generate(prompts, n, params, seeds=seeds)
    _check_shapes(together, prompts, n, params, tokenizer, stop_ids)
    assert len({tuple(c.token_ids) for g in together for c in g}) > 1, "samples must vary at T=1"
    want = _tokens(together)
    for p, prompt in enumerate(prompts):
        alone = sampler.generate([prompt], n, params, seeds=[seeds[p]])
        assert _tokens(alone) == [want[p]], \
            f"prompt {p}: its samples alone differ from its samples among other prompts"
        for a, b in zip(alone[0], together[p]):
            assert a.finish_reason == b.finish_reason and a.stop_token_id == b.stop_token_id
            assert len(a.logprobs) == len(b.logprobs) and all(
                abs(x - y) < 1e-3 for x, y in zip(a.logprobs, b.logprobs)), \
                f"prompt {p}: logprobs alone {a.logprobs} vs together {b.logprobs}"
    order = list(reversed(range(len(prompts))))
    reordered = sampler.generate([prompts[p] for p in order], n, params,
                                 seeds=[seeds[p] for p in order])
    assert _tokens(reordered) == [want[p] for p in order], \
        "a prompt's samples must not depend on the order of the prompts in the call"
    with_seed = sampler.generate(prompts, n, SamplingParams(**{**params.__dict__, "seed": 5}),
                                 seeds=seeds)
    assert _tokens(with_seed) == want, "seeds must take precedence over params.seed"
    calls = []
    called_back = sampler.generate(prompts, n, params, seeds=seeds,
                                   on_prompt_done=lambda p, group: calls.append((p, group)))
    assert sorted(p for p, _ in calls) == list(range(len(prompts))), \
        f"on_prompt_done must be called once per prompt, got prompts {[p for p, _ in calls]}"
    assert all(group is called_back[p] for p, group in calls), \
        "on_prompt_done must be given the very list returned for its prompt"
    assert _tokens(called_back) == want, "on_prompt_done must not change the samples"
    greedy_calls = []
    greedy = sampler.generate(prompts, n, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
                              on_prompt_done=lambda p, group: greedy_calls.append(len(group)))
    assert greedy_calls == [n] * len(prompts) and all(len(g) == n for g in greedy), \
        "greedy: on_prompt_done gets the n (copied) completions of each prompt"
    twice = sampler.generate([prompts[0], prompts[0], prompts[1]], n, params,
                             seeds=[seeds[0], seeds[0] + 1, seeds[1]])
    assert _tokens(twice)[0] == want[0] and _tokens(twice)[2] == want[1]
    assert _tokens(twice)[1] != want[0], "another seed must give other samples for a prompt"
