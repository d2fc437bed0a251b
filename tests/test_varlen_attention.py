"""cepo.varlen_attention: SDPA per packed sequence equals the T x T block-mask path and the
stock one-sequence forward, in values and gradients, with grouped-query heads, a sliding
window, bf16, and leaves the model's own attention implementation untouched."""

from __future__ import annotations

import pytest
import torch
import transformers

from cepo import varlen_attention
from cepo.model import body_hidden_states, decoder_body, packed_attention_kwargs
from cepo.packing import pack_sequences

LENGTHS = [9, 1, 17, 2, 30, 5]  # a 1-token sequence, and sequences past the window below


def _model(kind: str, dtype=torch.float32):
    common = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    elif kind == "mistral-window":  # window 8 < most sequences: the band matters
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=8,
                                                                           **common))
    else:
        raise ValueError(kind)
    model.config._attn_implementation = "sdpa"
    return model.to(dtype).eval()


def _seqs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def _masked(body, batch):
    """The T x T block-diagonal mask path (what cepo ran before the varlen function)."""
    kwargs = packed_attention_kwargs(body.config, batch, body.get_input_embeddings().weight.dtype)
    return body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                **kwargs).last_hidden_state[0]


@pytest.mark.parametrize("kind", ["qwen3", "mistral-window"])
def test_varlen_equals_each_sequence_alone(kind):
    model = _model(kind)
    body = decoder_body(model)
    seqs = _seqs(model.config.vocab_size)
    with torch.no_grad():
        packed = body_hidden_states(body, pack_sequences(seqs))
        # the stock forward of each sequence, transformers' own masks (sliding window incl.)
        alone = torch.cat([body(input_ids=torch.tensor([s]), use_cache=False).last_hidden_state[0]
                           for s in seqs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert body.config._attn_implementation == "sdpa"  # restored after the packed forward


def test_varlen_equals_block_mask_path_values_and_gradients():
    model = _model("qwen3")
    body = decoder_body(model)
    batch = pack_sequences(_seqs(model.config.vocab_size, seed=1))
    probe = torch.randn(batch.num_tokens, 64, generator=torch.Generator().manual_seed(2))
    grads = []
    for run in (lambda: body_hidden_states(body, batch), lambda: _masked(body, batch)):
        model.zero_grad(set_to_none=True)
        h = run()
        (h * probe).sum().backward()
        grads.append((h.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                   if p.grad is not None}))
    (h1, g1), (h2, g2) = grads
    torch.testing.assert_close(h1, h2, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 5
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-4, rtol=1e-4, msg=name)


def test_varlen_bf16_close_to_fp32():
    seqs = _seqs(61)
    with torch.no_grad():
        ref = body_hidden_states(decoder_body(_model("qwen3")), pack_sequences(seqs))
        low = body_hidden_states(decoder_body(_model("qwen3", torch.bfloat16)), pack_sequences(seqs))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=5e-2, rtol=5e-2)


def test_implementation_restored_on_error_and_generation_unaffected():
    model = _model("qwen3")
    body = decoder_body(model)
    with pytest.raises(RuntimeError, match="boom"):
        with varlen_attention.packed_forward(body.config):
            assert body.config._attn_implementation == varlen_attention.NAME
            raise RuntimeError("boom")
    assert body.config._attn_implementation == "sdpa"
    body_hidden_states(body, pack_sequences(_seqs(61)))
    # a padded batch through the model's own path still uses its mask (left padding)
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits[0, -1]
        alone = model(input_ids=ids[:1, 2:]).logits[0, -1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_varlen_refuses_what_it_cannot_run():
    model = _model("qwen3")
    body = decoder_body(model)
    with varlen_attention.packed_forward(body.config):
        with pytest.raises(ValueError, match="packed rows only"):
            body(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
        with pytest.raises(ValueError, match="one packed row of 4 tokens"):
            body(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False, cepo_seq_bounds=[0, 4])
