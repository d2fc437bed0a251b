"""Packing: invariants, response bookkeeping, and packed == one-by-one log-probs."""

import pytest
import torch
import transformers

from cepo.model import body_hidden_states, check_supported, decoder_body, lm_head_weight, load_causal_lm
from cepo.packing import (balance_across_ranks, pack_by_budget, pack_sequences,
                          response_gather_index)
from tiny_lm import make_tiny_model_dir


def test_pack_by_budget_invariants():
    lengths = [5, 17, 3, 9, 30, 1, 12, 8, 50]
    bins = pack_by_budget(lengths, 32)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 32 or len(b) == 1  # 50 > 32 stands alone
    assert [8] in bins
    assert pack_by_budget(lengths, 32) == bins  # deterministic
    assert pack_by_budget([], 10) == []


def test_balance_across_ranks_skewed():
    lengths = [100, 90, 80, 10, 10, 10, 5, 5, 5, 5, 3, 1, 1]
    parts = balance_across_ranks(lengths, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths[3:])  # within one small sequence
    assert balance_across_ranks([4], 2) == [[0], []]  # an idle rank is representable


def test_response_gather_index_by_hand():
    batch = pack_sequences([[1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert batch.cu_seqlens.tolist() == [0, 4, 6, 9]
    index, targets = response_gather_index(batch, [2, 1, 3], [2, 1, 0])
    assert index.tolist() == [1, 2, 4]
    assert targets.tolist() == [3, 4, 6]
    with pytest.raises(ValueError):
        response_gather_index(batch, [2, 1, 3], [2, 2, 0])


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def tiny_dir(request, tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp(request.param), arch=request.param)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_equals_one_by_one(tiny_dir, attn):
    model = load_causal_lm(str(tiny_dir), attn_implementation=attn).eval()
    body, weight = decoder_body(model), lm_head_weight(model)
    g = torch.Generator().manual_seed(0)
    vocab = weight.shape[0]
    prompt_lens, response_lens = [5, 3, 9, 4], [7, 1, 4, 11]
    seqs = [torch.randint(4, vocab, (p + r,), generator=g).tolist()
            for p, r in zip(prompt_lens, response_lens)]

    def logprobs(hidden, index, targets):
        return torch.log_softmax(hidden[index] @ weight.T, -1).gather(1, targets[:, None])[:, 0]

    with torch.no_grad():
        batch = pack_sequences(seqs)
        index, targets = response_gather_index(batch, prompt_lens, response_lens)
        packed = logprobs(body_hidden_states(body, batch), index, targets)
        alone = []
        for s, p, r in zip(seqs, prompt_lens, response_lens):
            one = pack_sequences([s])
            i, t = response_gather_index(one, [p], [r])
            alone.append(logprobs(body_hidden_states(body, one), i, t))
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)
    # and a plain padded forward of the first sequence agrees too
    with torch.no_grad():
        full = model(torch.tensor([seqs[0]])).logits[0].log_softmax(-1)
    want = full[torch.arange(4, 11), torch.tensor(seqs[0][5:12])]
    torch.testing.assert_close(packed[:7], want, atol=1e-5, rtol=1e-5)


def test_unsupported_architectures():
    with pytest.raises(ValueError, match="softcapping"):
        check_supported(transformers.Qwen3Config(final_logit_softcapping=30.0))
    gemma = transformers.Gemma2Config()
    with pytest.raises(ValueError, match="gemma2"):
        check_supported(gemma)
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        load_causal_lm("/no/such/model")
