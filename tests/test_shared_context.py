"""Shared-context packing (cepo.shared_context): a context run once for all the responses
that follow it gives every response token the hidden state of its own (context +
response) sequence, on full attention, grouped-query heads and a sliding window shorter
than the sequences; the plan covers every sequence once within the budget; the teacher
pass uses it and stays exact."""

import random

import pytest
import torch
import transformers

from cepo.model import body_hidden_states, decoder_body, run_packed, supports_shared_contexts
from cepo.packing import pack_sequences, response_gather_index
from cepo.shared_context import SharedContext, pack_shared_contexts, plan_shared_contexts


def _model(kind: str, dtype=torch.float32, attn="sdpa"):
    common = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "mistral-window":  # window 6 < most context + response lengths
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=6,
                                                                           **common))
    else:
        raise ValueError(kind)
    model.config._attn_implementation = attn
    return model.to(dtype).eval()


def _groups(seed: int, groups: int = 4, per_group: int = 5):
    """(contexts, responses) per sequence: ``groups`` distinct contexts (1 to 9 tokens),
    each followed by ``per_group`` responses of 1 to 12 tokens, interleaved."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(1, 61) for _ in range(n)]  # noqa: E731
    ctx = [tok(n) for n in [1, 9, 4, 7][:groups]]
    contexts, responses = [], []
    for j in range(per_group):
        for g in range(groups):
            contexts.append(ctx[g])
            responses.append(tok(1 if (g + j) % 6 == 0 else rng.randint(2, 12)))
    return contexts, responses


def _plain(body, contexts, responses):
    """Each (context + response) as its own packed sequence: rows predicting the responses."""
    batch = pack_sequences([c + r for c, r in zip(contexts, responses)])
    index, _ = response_gather_index(batch, [len(c) for c in contexts],
                                     [len(r) for r in responses])
    return body_hidden_states(body, batch)[index]


def _shared(body, contexts, responses, budget=4096):
    """The same rows from shared-context micro-batches, in sequence order."""
    out = [None] * len(contexts)
    for parts in plan_shared_contexts(contexts, [len(r) for r in responses], budget):
        batch, index, members = pack_shared_contexts(parts, responses)
        h = body_hidden_states(body, batch)[index]
        start = 0
        for i in members:
            out[i] = h[start:start + len(responses[i])]
            start += len(responses[i])
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["qwen3", "llama", "mistral-window"])
@pytest.mark.parametrize("budget", [4096, 30])  # one micro-batch; contexts split over several
@pytest.mark.parametrize("group_queries", [512, 0])  # one attention call per context; per response
def test_shared_contexts_equal_separate_sequences(kind, budget, group_queries, monkeypatch):
    from cepo import varlen_attention

    monkeypatch.setattr(varlen_attention, "GROUP_QUERIES", group_queries)
    model = _model(kind)
    body = decoder_body(model)
    contexts, responses = _groups(0)
    with torch.no_grad():
        want = _plain(body, contexts, responses)
        got = _shared(body, contexts, responses, budget)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_shared_contexts_bf16_close_and_gradients_equal():
    contexts, responses = _groups(1, groups=3, per_group=4)
    with torch.no_grad():
        low = _shared(decoder_body(_model("qwen3", torch.bfloat16)), contexts, responses)
        ref = _plain(decoder_body(_model("qwen3")), contexts, responses)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=5e-2, rtol=5e-2)
    # gradients through a shared context: the sum of what each sequence sends back
    model = _model("qwen3")
    body = decoder_body(model)
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for run in (_plain, _shared):
        model.zero_grad(set_to_none=True)
        (run(body, contexts, responses) * probe).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name, want in grads[0].items():  # sums of many terms: tolerance relative to the scale
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5,
                                   atol=1e-6 * float(want.abs().max()), msg=name)


def test_plan_covers_every_sequence_once_within_budget():
    contexts, responses = _groups(2, groups=4, per_group=6)
    lens = [len(r) for r in responses]
    for budget in (1, 15, 40, 4096):
        plan = plan_shared_contexts(contexts, lens, budget)
        seen = [i for parts in plan for p in parts for i in p.members]
        assert sorted(seen) == list(range(len(contexts)))
        for parts in plan:
            for p in parts:
                assert p.members and all(contexts[i] == p.context for i in p.members)
            tokens = sum(len(p.context) + sum(lens[i] for i in p.members) for p in parts)
            single = len(parts) == 1 and len(parts[0].members) == 1
            assert tokens <= budget or single
    # one budget large enough: each distinct context appears exactly once
    [parts] = plan_shared_contexts(contexts, lens, 4096)
    assert len(parts) == 4 and sorted(len(p.members) for p in parts) == [6] * 4
    assert plan_shared_contexts([], [], 10) == []
    with pytest.raises(ValueError, match="2 contexts for 1 response lengths"):
        plan_shared_contexts([[1], [2]], [3], 10)


def test_pack_layout_positions_and_index():
    parts = [SharedContext([7, 8, 9], [2, 0]), SharedContext([5], [1])]
    responses = [[10, 11], [12], [13, 14, 15]]
    batch, index, members = pack_shared_contexts(parts, responses)
    assert members == [2, 0, 1]
    assert batch.input_ids[0].tolist() == [7, 8, 9, 13, 14, 15, 10, 11, 5, 12]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 0, 1]
    assert batch.seq_lens == [3, 3, 2, 1, 1] and batch.prefix_of == [-1, 0, 0, -1, 3]
    assert batch.cu_seqlens.tolist() == [0, 3, 6, 8, 9, 10]
    # response tokens 13 14 15 | 10 11 | 12, each predicted from the row before it
    assert index.tolist() == [2, 3, 4, 2, 6, 8]
    assert batch.input_ids[0, index + 1].tolist()[:3] == [13, 14, 15]
    assert batch.to("cpu").prefix_of == batch.prefix_of
    with pytest.raises(ValueError, match="context is empty"):
        pack_shared_contexts([SharedContext([], [0])], responses)
    with pytest.raises(ValueError, match="response of sequence 0 is empty"):
        pack_shared_contexts([SharedContext([1], [0])], [[]])


def test_only_sdpa_text_models_share_contexts():
    assert supports_shared_contexts(_model("qwen3"))
    eager = _model("qwen3", attn="eager")
    assert not supports_shared_contexts(eager)
    batch, _, _ = pack_shared_contexts([SharedContext([1, 2], [0])], [[3]])
    with pytest.raises(ValueError, match="needs the 'sdpa' attention"):
        run_packed(decoder_body(eager), batch, input_ids=batch.input_ids,
                   position_ids=batch.position_ids)


def test_teacher_pass_shares_contexts_and_stays_exact(tmp_path, monkeypatch):
    """context_hidden_states (the teacher phase) on G rollouts per group under one context
    per group and name: the same hidden states as plain packing, from fewer tokens."""
    import cepo.step as step
    from cepo.model import load_causal_lm
    from cepo.policy import FusedHeadPolicy
    from cepo.step import Responses, context_hidden_states
    from tiny_lm import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path / "m", hidden=32)
    policy = FusedHeadPolicy(load_causal_lm(str(path), dtype=torch.float32,
                                            attn_implementation="sdpa")).eval()
    rng = random.Random(4)
    tok = lambda n: [rng.randrange(4, 60) for _ in range(n)]  # noqa: E731
    groups, g = 3, 4
    responses = Responses.of([tok(rng.randint(1, 9)) for _ in range(groups * g)])
    per_group = {name: [tok(rng.randint(3, 8)) for _ in range(groups)]
                 for name in ("policy", "pos", "neg")}
    contexts = {name: [ctx[r // g] if name != "neg" or r // g != 1 else None
                       for r in range(groups * g)] for name, ctx in per_group.items()}
    fed = []
    forward = type(policy).forward

    def counting(self, batch, index, *args, **kwargs):
        fed.append(batch.num_tokens)
        return forward(self, batch, index, *args, **kwargs)

    monkeypatch.setattr(type(policy), "forward", counting)
    for budget in (4096, 25):
        kw = dict(token_budget=budget, pad_id=0, device=torch.device("cpu"))
        fed.clear()
        shared = context_hidden_states(policy, contexts, responses, **kw)
        shared_tokens = sum(fed)
        with monkeypatch.context() as m:
            m.setattr(step, "supports_shared_contexts", lambda model: False)
            fed.clear()
            plain = context_hidden_states(policy, contexts, responses, **kw)
            plain_tokens = sum(fed)
        for name in contexts:
            torch.testing.assert_close(shared[name], plain[name], atol=1e-6, rtol=1e-6)
        assert shared["neg"][responses.positions([4, 5, 6, 7])].abs().max() == 0  # not run
        if budget == 4096:  # every context once, every (name, response) once
            contexts_once = sum(len(c) for name, ctx in per_group.items()
                                for k, c in enumerate(ctx) if name != "neg" or k != 1)
            responses_fed = sum(len(responses.response_ids[r]) for name, per in contexts.items()
                                for r, c in enumerate(per) if c is not None)
            assert shared_tokens == contexts_once + responses_fed
        assert shared_tokens < plain_tokens


def test_segment_sources():
    parts = [SharedContext([7, 8, 9], [2, 0]), SharedContext([5], [1])]
    batch, _, members = pack_shared_contexts(parts, [[10, 11], [12], [13, 14, 15]])
    from cepo.shared_context import segment_sources
    assert segment_sources(batch, members) == [2, 2, 0, 1, 1]
    plain = pack_sequences([[1, 2], [3, 4, 5]])
    assert segment_sources(plain, [4, 9]) == [4, 9]


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_vision_language_groups_share_their_image_context(tmp_path, monkeypatch, arch):
    """Two prompts with different images, three rollouts each, three contexts: the
    shared-context pass (each image context once) equals plain packing, fp32 1e-6, feeds
    fewer tokens, and the update's gradients match too."""
    import cepo.step as step
    from cepo.contexts import build_contexts
    from cepo.model import load_causal_lm
    from cepo.policy import FusedHeadPolicy
    from cepo.step import Responses, context_hidden_states
    from cepo.vision import ImagePreparer, expand_placeholders
    from transformers import AutoTokenizer
    from vl_model import make_tiny_vl_dir, synthetic_image

    path = make_tiny_vl_dir(tmp_path / "m", arch=arch)
    model = load_causal_lm(str(path), dtype=torch.float32, attn_implementation="sdpa").eval()
    assert supports_shared_contexts(model)
    tok, prep = AutoTokenizer.from_pretrained(path), ImagePreparer(str(path))
    images, ctx = [], {"policy": [], "pos": [], "neg": []}
    for p, size in enumerate([(32, 48), (48, 32)]):
        im = prep.image_inputs(f"p{p}", [synthetic_image(*size, seed=p)])
        prompt = expand_placeholders(f"<image> what is {p}+4?", im.token_counts(prep.merge_size))
        policy_ids, pos_ids, neg_ids = (c[0] for c in build_contexts(tok, [prompt], ["7"], ["8"]))
        for _ in range(3):
            images.append(im)
            ctx["policy"].append(policy_ids)
            ctx["pos"].append(pos_ids)
            ctx["neg"].append(neg_ids)
    responses = Responses.of([tok(r, add_special_tokens=False).input_ids for r in
                              ("7", "it is 8", "3+4=7", "5", "it is five", "4+1=5")])
    policy = FusedHeadPolicy(model)
    fed = []
    forward = type(policy).forward

    def counting(self, batch, index, *args, **kwargs):
        if batch is not None:
            fed.append(batch.num_tokens)
        return forward(self, batch, index, *args, **kwargs)

    monkeypatch.setattr(type(policy), "forward", counting)
    kw = dict(token_budget=4096, pad_id=tok.pad_token_id, device=torch.device("cpu"),
              images=images)
    shared = context_hidden_states(policy, ctx, responses, **kw)
    shared_tokens = sum(fed)
    fed.clear()
    with monkeypatch.context() as m:
        m.setattr(step, "supports_shared_contexts", lambda model: False)
        plain = context_hidden_states(policy, ctx, responses, **kw)
    for name in ctx:
        torch.testing.assert_close(shared[name], plain[name], atol=1e-6, rtol=1e-6)
    assert shared_tokens < sum(fed)
    # the update: a group's image prompt once, gradients as with plain packing
    grads = []
    for share in (True, False):
        with monkeypatch.context() as m:
            if not share:
                m.setattr(step, "supports_shared_contexts", lambda model: False)
            model.zero_grad(set_to_none=True)
            step.ppo_update(policy, ctx["policy"], responses, list(range(6)),
                            token_advantages=torch.linspace(-1, 1, responses.num_tokens),
                            old_logprobs=None, ref_logprobs=None, global_tokens=50.0,
                            world_size=1, clip_low=0.2, clip_high=0.28, temperature=1.0,
                            kl_coef=0.0, token_budget=4096, pad_id=tok.pad_token_id,
                            device=torch.device("cpu"), images=images)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name, want in grads[1].items():
        torch.testing.assert_close(grads[0][name], want, rtol=1e-4,
                                   atol=1e-6 * float(want.abs().max()), msg=name)
