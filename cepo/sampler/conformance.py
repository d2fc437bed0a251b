"""A conformance check every sampler engine must pass (HF on CPU here; vLLM on a GPU)."""

from __future__ import annotations

import torch

from cepo.sampler.base import Completion, SamplingParams


def check_sampler_conformance(sampler, tokenizer, *, norm_name: str = "model.norm.weight",
                              norm_weight: torch.Tensor | None = None) -> None:
    """Assert the interface contract on ``sampler``; raises AssertionError on a breach.

    norm_weight: the current final-norm weight [H] of the engine's model (norm_name is
    its Hugging Face name); negating it negates every logit, so an update that took
    effect must change greedy outputs, and restoring it must restore them.
    """
    eos = tokenizer.eos_token_id
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": c}],
                                             add_generation_prompt=True)
               for c in ("1+2", "(3*4)-5", "7")]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p)
               for p in prompts]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=123, return_logprobs=True)
    out = sampler.generate(prompts, 3, params)
    assert len(out) == len(prompts) and all(len(group) == 3 for group in out)
    for p, group in enumerate(out):
        for c in group:
            assert isinstance(c, Completion) and c.prompt_index == p
            assert len(c.token_ids) <= 6 and eos not in c.token_ids
            assert c.finish_reason in ("stop", "length")
            assert c.finish_reason == "stop" or len(c.token_ids) == 6
            assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 1e-6 for lp in c.logprobs)
            assert isinstance(c.text, str)
    again = sampler.generate(prompts, 3, params)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in out], \
        "the same seed must reproduce the same samples"
    greedy = sampler.generate(prompts, 2, SamplingParams(temperature=0.0, max_new_tokens=6))
    for group in greedy:
        assert group[0].token_ids == group[1].token_ids, "greedy decoding must be deterministic"
        assert group[0].logprobs is None
    if norm_weight is not None:
        sampler.update_weights([(norm_name, -norm_weight)])
        flipped = sampler.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=6))
        assert [g[0].token_ids for g in flipped] != [g[0].token_ids for g in greedy], \
            "update_weights had no effect on generation"
        sampler.update_weights([(norm_name, norm_weight)])
        restored = sampler.generate(prompts, 2, SamplingParams(temperature=0.0, max_new_tokens=6))
        assert [[c.token_ids for c in g] for g in restored] == \
            [[c.token_ids for c in g] for g in greedy], "restoring the weights must restore outputs"
    try:
        sampler.update_weights([("no.such.parameter", torch.zeros(1))])
    except ValueError as e:
        assert "no.such.parameter" in str(e)
    else:
        raise AssertionError("update_weights must reject unknown names")
