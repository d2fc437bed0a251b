"""The lean decoding step (cepo.sampler.lean_decoder) against the Hugging Face forward:
logits at every step to rounding on Llama, Qwen2 (q / k / v biases) and Qwen3 (q / k
norms), grouped and plain multi-head attention, left padding, rows dropped mid-way, fp32
and bf16; fused projections are views (updates reach them); unsupported models are named;
the engine's completions are the same with and without it."""

import pytest
import torch
import transformers
from bench.trainer import lean_and_model_logits
from cepo.sampler.lean_decoder import LeanWeights, lean_decoder_unsupported


def tiny_model(arch: str, *, kv_heads: int = 2, dtype=torch.float32, seed: int = 0):
    """A random tiny causal LM of ``arch`` (vocab 97, hidden 48, 3 layers, 4 heads)."""
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=kv_heads,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                  bos_token_id=None)
    if arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=12, tie_word_embeddings=True, **common)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(tie_word_embeddings=False, **common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "llama":
        config = transformers.LlamaConfig(tie_word_embeddings=False, rope_theta=500.0,
                                          **common)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).eval().requires_grad_(False)
    with torch.no_grad():  # non-trivial norm weights, so a dropped or misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_logits_match_the_model_fp32(arch, kv_heads):
    model = tiny_model(arch, kv_heads=kv_heads, seed=kv_heads)
    if arch == "qwen2":  # q / k / v biases on by default; make them count
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    hf, lean = lean_and_model_logits(model, drop_at={3: [0, 2, 4], 5: [2]})
    assert [x.shape[0] for x in lean] == [5, 5, 5, 3, 3, 1]
    for a, b in zip(hf, lean):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_logits_match_the_model_bf16(arch):
    model = tiny_model(arch, dtype=torch.bfloat16, seed=3)
    hf, lean = lean_and_model_logits(model, batch=4, steps=5, drop_at={2: [1, 3]})
    for a, b in zip(hf, lean):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), atol=3e-2, rtol=3e-2)


def test_single_row_and_single_step():
    model = tiny_model("qwen3", seed=5)
    hf, lean = lean_and_model_logits(model, batch=1, width=3, steps=1)
    torch.testing.assert_close(lean[0], hf[0], atol=1e-5, rtol=1e-5)


def test_fused_projections_are_views_and_updates_reach_them():
    """After LeanWeights, the q / k / v and gate / up weights are views of one tensor each
    (no copy); writing a module's weight (what a weight update does) changes the lean
    logits exactly as the model's, and so does a q / k norm update after refresh()."""
    model = tiny_model("qwen3", seed=7)
    params_before = sum(p.numel() for p in model.parameters())
    weights = LeanWeights(model)
    layer, attn = weights.layers[0], model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == layer.qkv.data_ptr()
    storage = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert storage(attn.v_proj.weight) == storage(layer.qkv)
    mlp = model.model.layers[0].mlp
    assert storage(mlp.up_proj.weight) == storage(layer.gate_up)
    assert sum(p.numel() for p in model.parameters()) == params_before
    with torch.no_grad():
        attn.k_proj.weight.mul_(-1.5)
        mlp.up_proj.weight.add_(0.25)
        attn.q_norm.weight.mul_(2.0)
    stale = layer.qk_norm[0].clone()
    weights.refresh()
    assert not torch.equal(stale, layer.qk_norm[0])
    hf, lean = lean_and_model_logits(model, steps=3)
    for a, b in zip(hf, lean):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_unsupported_models_are_named():
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4))
    assert "model_type 'mistral'" in lean_decoder_unsupported(mistral)
    qwen2_window = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
        sliding_window=4, max_window_layers=0))
    assert "sliding window" in lean_decoder_unsupported(qwen2_window)
    assert lean_decoder_unsupported(tiny_model("llama")) is None
    with pytest.raises(ValueError, match="LeanWeights: unsupported model: model_type"):
        LeanWeights(mistral)


def test_engine_same_completions_with_and_without(tmp_path):
    """The engine's compact loop gives the same tokens with the lean step as with the
    model's forward, log-probs to 1e-5, at T = 1 and greedy; lean=False really runs the
    model's forward."""
    from transformers import AutoTokenizer

    from cepo.contexts import render_prompt
    from cepo.sampler import HFEngine, SamplingParams
    from tiny_lm import add_frequent_stop_token, make_tiny_model_dir

    contents = ("1", "(12+34)*56-7", "3/4", "abc", "9*9=")
    path = make_tiny_model_dir(tmp_path / "m", arch="qwen3", seed=4, layers=3)
    add_frequent_stop_token(path, contents, head_scale=3.0, samples=4)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [render_prompt(tok, c) for c in contents]
    lean = HFEngine(str(path), tokenizer=tok, max_batch_size=8)
    plain = HFEngine(str(path), tokenizer=tok, max_batch_size=8, lean=False)
    assert lean.lean is not None and plain.lean is None
    with HFEngine(str(path), tokenizer=tok) as closed:
        assert closed.lean is not None
    assert closed.model is None and closed.lean is None  # close() frees the fused weights too
    for params in (SamplingParams(temperature=1.0, max_new_tokens=12, return_logprobs=True),
                   SamplingParams(temperature=0.0, max_new_tokens=9, return_logprobs=True)):
        got = lean.generate(prompts, 3, params, seeds=list(range(5)))
        want = plain.generate(prompts, 3, params, seeds=list(range(5)))
        assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
        for g_got, g_want in zip(got, want):
            for a, b in zip(g_got, g_want):
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                           atol=1e-5, rtol=1e-5)
