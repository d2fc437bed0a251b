"""Packing: plan invariants, response bookkeeping, and packed == one-by-one log-probs.

The model tests use tiny random Qwen3 (tied head) and Llama (untied head) checkpoints in
float32. Flex attention is exact too but compiles for ~70 s on CPU: marked slow.
"""

import logging
import random

import pytest
import torch
import transformers
from torch import nn

from cepo import packing
from cepo.model import (block_causal_mask, body_hidden_states, check_supported, decoder_body,
                        default_attn_implementation, lm_head_weight, load_causal_lm,
                        packed_attention_kwargs)
from cepo.packing import (PackedBatch, balance_across_ranks,
                          pack_by_budget, pack_sequences, padding_micro_batch,
                          response_gather_index)
from tiny_lm import make_tiny_model_dir

HAS_CUDA = torch.cuda.is_available()


def skewed_lengths(n=60, seed=0):
    """Long-tailed lengths like RL rollouts: most short, a few long."""
    rng = random.Random(seed)
    return [max(1, int(rng.lognormvariate(3.5, 0.9))) for _ in range(n)]


# --------------------------------------------------------------------------- planning

def test_pack_by_budget_invariants(caplog, monkeypatch):
    monkeypatch.setattr(packing, "_warned_long", False)
    lengths = [5, 17, 3, 9, 30, 1, 12, 8, 50, 0]
    with caplog.at_level(logging.WARNING, logger="cepo.packing"):
        bins = pack_by_budget(lengths, 32)
        pack_by_budget([40, 50], 32)
    assert sum("exceeds token_budget" in r.message for r in caplog.records) == 1  # once
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert b == sorted(b)
        assert sum(lengths[i] for i in b) <= 32 or len(b) == 1
    assert [8] in bins  # 50 > 32 stands alone
    assert pack_by_budget(lengths, 32) == bins  # deterministic
    assert pack_by_budget([], 10) == []
    with pytest.raises(ValueError, match="token_budget"):
        pack_by_budget([1], 0)
    with pytest.raises(ValueError, match="lengths"):
        pack_by_budget([3, -1], 10)


@pytest.mark.parametrize("budget", [64, 256, 1000])
def test_pack_by_budget_skewed_is_tight(budget):
    lengths = [min(n, budget) for n in skewed_lengths(200, seed=budget)]
    bins = pack_by_budget(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    lower = -(-sum(lengths) // budget)
    assert len(bins) <= 11 * lower // 9 + 1  # first-fit decreasing bound


def test_balance_across_ranks_skewed():
    lengths = skewed_lengths(60)
    for world in (2, 3, 8):
        parts = balance_across_ranks(lengths, world)
        assert len(parts) == world
        assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
        loads = [sum(lengths[i] for i in p) for p in parts]
        assert max(loads) - min(loads) <= max(lengths)
        # far better than contiguous chunks, the naive split
        chunk = -(-len(lengths) // world)
        naive = [sum(lengths[k:k + chunk]) for k in range(0, len(lengths), chunk)]
        assert max(loads) - min(loads) <= max(naive) - min(naive)
        assert max(loads) <= sum(lengths) / world + max(lengths)
        assert balance_across_ranks(lengths, world) == parts  # deterministic
    hand = [100, 90, 80, 10, 10, 10, 5, 5, 5, 5, 3, 1, 1]
    loads = [sum(hand[i] for i in p) for p in balance_across_ranks(hand, 3)]
    assert max(loads) - min(loads) <= 10
    assert balance_across_ranks([4], 2) == [[0], []]  # an idle rank is representable
    with pytest.raises(ValueError, match="world_size"):
        balance_across_ranks([1], 0)


def test_pack_sequences_layout():
    batch = pack_sequences([[1, 2, 3, 4], [5], [7, 8, 9]])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 0, 1, 2]]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 4, 5, 8]
    assert batch.input_ids.dtype == batch.position_ids.dtype == torch.long
    assert (batch.seq_lens, batch.max_seqlen, batch.num_tokens, batch.num_sequences) == (
        [4, 1, 3], 4, 8, 3)
    moved = batch.to("meta")
    assert isinstance(moved, PackedBatch) and moved.input_ids.device.type == "meta"
    assert moved.seq_lens == batch.seq_lens and batch.input_ids.device.type == "cpu"
    with pytest.raises(ValueError, match="padding_micro_batch"):
        pack_sequences([])
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pack_sequences([[1], []])


def test_response_gather_index_by_hand():
    batch = pack_sequences([[1, 2, 3, 4], [5, 6], [7, 8, 9], [10, 11]])
    #                       p=2 r=2       p=1 r=1 p=3 r=0    p=1 r=1
    index, targets = response_gather_index(batch, [2, 1, 3, 1], [2, 1, 0, 1])
    assert index.dtype == targets.dtype == torch.long
    assert index.tolist() == [1, 2, 4, 9]
    assert targets.tolist() == [3, 4, 6, 11]
    assert targets.tolist() == batch.input_ids[0, index + 1].tolist()
    none, none_t = response_gather_index(batch, [4, 2, 3, 2], [0, 0, 0, 0])
    assert none.shape == none_t.shape == (0,)
    with pytest.raises(ValueError, match="sequence 1 has 2 tokens"):
        response_gather_index(batch, [2, 1, 3, 1], [2, 2, 0, 1])
    with pytest.raises(ValueError, match="one entry per packed sequence"):
        response_gather_index(batch, [2, 1, 3], [2, 1, 0])
    with pytest.raises(ValueError, match="no prompt token"):
        response_gather_index(pack_sequences([[1, 2]]), [0], [2])


def test_padding_micro_batch_shape():
    batch, index, targets = padding_micro_batch(pad_id=0)
    assert batch.num_tokens == 2 and index.tolist() == [0] and targets.tolist() == [0]


# --------------------------------------------------------------------------- models

@pytest.fixture(scope="module", params=["qwen3", "llama"])
def tiny_dir(request, tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp(request.param), arch=request.param,
                               hidden=64, layers=2)


# (prompt, response): a 1-token response, a 0-token response, a 1-token sequence
PROMPTS, RESPONSES = [5, 3, 9, 1, 4, 2], [7, 1, 4, 0, 11, 6]


def random_seqs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (p + r,), generator=g).tolist()
            for p, r in zip(PROMPTS, RESPONSES)]


def response_logprobs(body, weight, seqs, prompt_lens, response_lens):
    """Plain-torch log p(response tokens) of one packed row (the reference for tests)."""
    batch = pack_sequences(seqs).to(weight.device)
    index, targets = response_gather_index(batch, prompt_lens, response_lens)
    logits = body_hidden_states(body, batch)[index].float() @ weight.float().T
    return torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]


def assert_packed_equals_alone(model, atol=1e-5):
    body, weight = decoder_body(model), lm_head_weight(model)
    seqs = random_seqs(weight.shape[0])
    with torch.no_grad():
        packed = response_logprobs(body, weight, seqs, PROMPTS, RESPONSES)
        alone = torch.cat([response_logprobs(body, weight, [s], [p], [r])
                           for s, p, r in zip(seqs, PROMPTS, RESPONSES)])
    assert packed.shape == (sum(RESPONSES),)
    torch.testing.assert_close(packed, alone, atol=atol, rtol=atol)
    return seqs, packed


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_equals_one_by_one(tiny_dir, attn):
    model = load_causal_lm(str(tiny_dir), attn_implementation=attn).eval()
    assert model.config._attn_implementation == attn
    seqs, packed = assert_packed_equals_alone(model)
    # and the stock forward of the first sequence (full logits, HF's own head) agrees
    with torch.no_grad():
        full = model(torch.tensor([seqs[0]]), use_cache=False).logits[0].log_softmax(-1)
    p, r = PROMPTS[0], RESPONSES[0]
    want = full[torch.arange(p - 1, p + r - 1), torch.tensor(seqs[0][p:])]
    torch.testing.assert_close(packed[:r], want, atol=1e-5, rtol=1e-5)


def _no_boundary_inference(monkeypatch):
    """Make transformers blind to packing: position ids no longer reveal boundaries (as
    in versions without packed-sequence detection), so only what cepo passes counts."""
    import transformers.masking_utils as mu
    import transformers.modeling_flash_attention_utils as fa

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None,
                        raising=False)
    monkeypatch.setattr(fa, "_is_packed_sequence", lambda *a, **k: False, raising=False)


@pytest.mark.parametrize("attn,dtype", [("eager", torch.float32), ("sdpa", torch.float32),
                                        ("sdpa", torch.bfloat16)])
def test_packed_exact_without_boundary_inference(tiny_dir, attn, dtype, monkeypatch):
    """Exactness comes from the boundaries cepo passes, not from transformers inferring
    them from position ids (5.23 does; a version that does not would leak silently)."""
    _no_boundary_inference(monkeypatch)
    model = load_causal_lm(str(tiny_dir), dtype=dtype, attn_implementation=attn).eval()
    # bf16: packed and one-by-one reduce over different lengths; leakage is far larger
    assert_packed_equals_alone(model, atol=1e-5 if dtype == torch.float32 else 3e-2)
    if dtype == torch.float32:  # the hidden states too, not only the log-probs
        body, seqs = decoder_body(model), random_seqs(model.config.vocab_size, seed=1)
        with torch.no_grad():
            packed = body_hidden_states(body, pack_sequences(seqs))
            alone = torch.cat([body_hidden_states(body, pack_sequences([s])) for s in seqs])
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_block_causal_mask_by_hand():
    batch = pack_sequences([[1, 2, 3], [4], [5, 6]])
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0],
                         [0, 0, 0, 0, 1, 0],
                         [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(block_causal_mask(batch), want)


def test_packed_attention_kwargs_per_implementation():
    batch = pack_sequences([[1, 2, 3], [4], [5, 6]])
    config = transformers.Qwen3Config()
    config._attn_implementation = "sdpa"
    sdpa = packed_attention_kwargs(config, batch, torch.float32)["attention_mask"]
    assert sdpa.shape == (1, 1, 6, 6) and sdpa.dtype == torch.bool
    config._attn_implementation = "eager"
    eager = packed_attention_kwargs(config, batch, torch.bfloat16)["attention_mask"]
    assert eager.dtype == torch.bfloat16  # added to bf16 scores without a T x T upcast
    assert torch.equal(eager == 0, sdpa)
    assert (eager[~sdpa] == torch.finfo(torch.bfloat16).min).all()
    config._attn_implementation = "flash_attention_2"
    flash = packed_attention_kwargs(config, batch, torch.bfloat16)
    assert "attention_mask" not in flash and flash["cu_seq_lens_q"].dtype == torch.int32
    assert flash["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and flash["max_length_k"] == 3
    config._attn_implementation = "paged_attention"
    with pytest.raises(ValueError, match="'paged_attention' cannot run packed rows"):
        packed_attention_kwargs(config, batch, torch.float32)


def test_body_and_head(tiny_dir):
    model = load_causal_lm(str(tiny_dir))
    body, weight = decoder_body(model), lm_head_weight(model)
    assert body is model.model and type(body).__name__ in ("Qwen3Model", "LlamaModel")
    assert weight.shape == (model.config.vocab_size, model.config.hidden_size)
    assert (weight is body.embed_tokens.weight) == model.config.tie_word_embeddings
    batch = pack_sequences([[4, 5, 6], [7, 8]])
    with torch.no_grad():
        hidden = body_hidden_states(body, batch)
    assert hidden.shape == (5, model.config.hidden_size)
    with pytest.raises(ValueError, match=r"one packed row \[1, T\]"):
        body_hidden_states(body, PackedBatch(batch.input_ids[0], batch.position_ids[0],
                                             batch.cu_seqlens, batch.seq_lens, 3))
    with pytest.raises(ValueError, match="cu_seqlens / seq_lens cover 5 / 4 tokens"):
        body_hidden_states(body, PackedBatch(batch.input_ids, batch.position_ids,
                                             batch.cu_seqlens, [3, 1], 3))


def test_padding_micro_batch_gives_zero_gradient_to_every_parameter(tiny_dir):
    model = load_causal_lm(str(tiny_dir))
    body, weight = decoder_body(model), lm_head_weight(model)
    batch, index, targets = padding_micro_batch(pad_id=0)
    logits = body_hidden_states(body, batch)[index] @ weight.T
    lp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    loss = (lp * torch.zeros_like(lp)).sum()  # mask 0: contributes nothing
    loss.backward()
    assert float(loss.detach()) == 0.0
    for name, param in model.named_parameters():
        assert param.grad is not None, name  # FSDP2 reduce-scatters need every grad
        assert not param.grad.any(), name


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """A flash-attn stand-in: attends per sequence using only the varlen kwargs."""
    cu, max_len = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    assert attention_mask is None and kwargs["cu_seq_lens_k"] is cu
    assert isinstance(max_len, int) and max_len == int(cu.diff().max())
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    parts = [nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return torch.cat(parts, 2).transpose(1, 2).contiguous(), None


def test_flash_path_gets_varlen_kwargs(tiny_dir):
    """Flash implementations are detected by name ("flash" in it) and get cu_seqlens and
    max lengths; a registered stand-in checks they arrive, on CPU."""
    transformers.AttentionInterface.register("test_flash_varlen", _varlen_attention)
    model = load_causal_lm(str(tiny_dir), attn_implementation="sdpa")
    # set directly: set_attn_implementation would look for a real flash-attn kernel
    model.config._attn_implementation = "test_flash_varlen"
    assert decoder_body(model).config._attn_implementation == "test_flash_varlen"
    assert_packed_equals_alone(model)


@pytest.mark.slow
def test_packed_equals_one_by_one_flex(tiny_dir):
    model = load_causal_lm(str(tiny_dir), attn_implementation="flex_attention")
    assert_packed_equals_alone(model)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
def test_packed_equals_one_by_one_cuda(tiny_dir):
    for dtype in (torch.bfloat16, torch.float32):
        attn = default_attn_implementation("cuda", dtype)
        model = load_causal_lm(str(tiny_dir), dtype=dtype, attn_implementation=attn).cuda()
        assert_packed_equals_alone(model, atol=1e-5 if dtype == torch.float32 else 3e-2)


# --------------------------------------------------------------------------- checks

def test_unsupported_architectures():
    with pytest.raises(ValueError, match="'gemma2' is not supported"):
        check_supported(transformers.Gemma2Config())
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        check_supported(transformers.GPT2Config())
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        check_supported(transformers.Qwen3Config(final_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        check_supported(transformers.LlamaConfig(attn_logit_softcapping=50.0))
    with pytest.raises(ValueError, match="logits_scaling=8.0"):
        check_supported(transformers.LlamaConfig(logits_scaling=8.0))
    with pytest.raises(ValueError, match="logit_scale"):
        check_supported(transformers.Qwen3Config(logit_scale=0.5))
    for ok in (transformers.Qwen2Config(), transformers.Qwen3Config(),
               transformers.LlamaConfig(), transformers.MistralConfig()):
        check_supported(ok)


def test_head_bias_is_rejected():
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2)
    model = transformers.LlamaForCausalLM(config)
    check_supported(config, model)
    model.lm_head = nn.Linear(16, 32, bias=True)
    with pytest.raises(ValueError, match="LM head has a bias"):
        check_supported(config, model)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        load_causal_lm("/no/such/model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_causal_lm(str(tmp_path))
    transformers.Qwen3Config(vocab_size=32, hidden_size=16).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_causal_lm(str(tmp_path))


def test_default_attn_implementation_on_cpu():
    assert default_attn_implementation("cpu") == "sdpa"
    assert default_attn_implementation(torch.device("cpu")) == "sdpa"
