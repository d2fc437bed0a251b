"""The step's model passes: one packed pass over all contexts equals one pass per context;
the contexts a rollout does not need are not run; the update's micro-batches cover every
token once."""

import random

import pytest
import torch

import cepo_kernels as ck
from cepo.model import load_causal_lm
from cepo.policy import FusedHeadPolicy
from cepo.step import Responses, context_hidden_states, evidence, micro_batches
from tiny_lm import make_tiny_model_dir


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", hidden=32)
    return FusedHeadPolicy(load_causal_lm(str(path), dtype=torch.float32,
                                          attn_implementation="sdpa")).eval()


def _batch(seed: int, rollouts: int = 7):
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(4, 60) for _ in range(n)]  # noqa: E731
    responses = Responses.of([tok(rng.randint(1, 9)) for _ in range(rollouts)])
    contexts = {"policy": [tok(rng.randint(2, 6)) for _ in range(rollouts)],
                "pos": [tok(rng.randint(3, 8)) for _ in range(rollouts)],
                "neg": [tok(rng.randint(3, 8)) if i % 3 else None for i in range(rollouts)]}
    return contexts, responses


@pytest.mark.parametrize("budget", [12, 40, 4096])  # many micro-batches .. one
def test_one_pass_equals_a_pass_per_context(policy, budget):
    contexts, responses = _batch(0)
    kw = dict(token_budget=budget, pad_id=0, device=torch.device("cpu"))
    together = context_hidden_states(policy, contexts, responses, **kw)
    for name, per_rollout in contexts.items():
        alone = context_hidden_states(policy, {name: per_rollout}, responses, **kw)[name]
        torch.testing.assert_close(together[name], alone, atol=1e-6, rtol=1e-6)
        # and each rollout alone, unpacked: the packing is exact
        for i, ctx in enumerate(per_rollout):
            rows = responses.positions([i])
            if ctx is None:
                assert together[name][rows].abs().max() == 0  # not run
                continue
            single = Responses.of([responses.response_ids[i]])
            one = context_hidden_states(policy, {name: [ctx]}, single, **kw)[name]
            torch.testing.assert_close(together[name][rows], one, atol=1e-5, rtol=1e-5)


def test_micro_batches_cover_every_sequence_once_within_budget():
    contexts, responses = _batch(1, rollouts=11)
    from cepo.step import Sequence
    seqs = [Sequence(c, i, n) for n, per in contexts.items() for i, c in enumerate(per)
            if c is not None]
    seen = []
    for members, batch, index in micro_batches(seqs, responses, 20, torch.device("cpu")):
        assert batch.num_tokens <= 20 or len(members) == 1
        assert index.numel() == sum(len(responses.response_ids[seqs[j].rollout]) for j in members)
        seen += members
    assert sorted(seen) == list(range(len(seqs)))


def test_evidence_skips_the_policy_context_where_the_group_has_a_wrong_answer(policy):
    """CEPO needs lp_policy only for the RLSD fallback: with the policy context given for
    fallback rows only, delta and token advantages equal those of a full three-context pass."""
    contexts, responses = _batch(2)
    has_neg = torch.cat([torch.full((len(r),), c is not None, dtype=torch.bool)
                         for r, c in zip(responses.response_ids, contexts["neg"])])
    adv = torch.cat([torch.full((len(r),), (-1.0) ** i) for i, r in
                     enumerate(responses.response_ids)])
    kw = dict(lam=0.5, eps_w=0.2, temperature=0.7, token_budget=30, pad_id=0,
              device=torch.device("cpu"))
    full = dict(contexts, neg=[c if c is not None else p
                               for c, p in zip(contexts["neg"], contexts["policy"])])
    lean = dict(contexts, policy=[p if c is None else None
                                  for p, c in zip(contexts["policy"], contexts["neg"])])
    a = evidence(policy, full, responses, adv, has_neg, **kw)
    b = evidence(policy, lean, responses, adv, has_neg, **kw)
    torch.testing.assert_close(a.delta, b.delta, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.token_advantages, b.token_advantages, atol=1e-6, rtol=1e-6)
    # against the float64 reference on the same hidden states
    h = context_hidden_states(policy, full, responses, token_budget=30, pad_id=0,
                              device=torch.device("cpu"))
    ref = ck.contrastive_evidence(h["policy"].double(), h["pos"].double(), h["neg"].double(),
                                  policy.head_weight().double(), responses.targets, adv.double(),
                                  has_neg, lam=0.5, eps_w=0.2, temperature=0.7, backend="reference")
    torch.testing.assert_close(b.token_advantages.double(), ref.token_advantages, atol=1e-5,
                               rtol=1e-5)
