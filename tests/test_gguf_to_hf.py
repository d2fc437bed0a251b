"""scripts/gguf_to_hf.py on a tiny GGUF written here (no download, no 93 MB model).

The GGUF is a random 2-layer Llama with the real byte-level BPE tokenizer and ChatML
template of tests/bpe_model.py, written with the ``gguf`` package the way llama.cpp lays
it out (``token_embd``, ``blk.N.*``, tied output, tokenizer metadata). Skipped when
``gguf`` is not installed (``pip install gguf``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF

from bpe_model import CHAT_TEMPLATE, ENDOFTEXT, IM_END, SPECIAL_TOKENS, train_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gguf_to_hf.py"
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 96, 2, 4, 2


def _load_script():
    spec = importlib.util.spec_from_file_location("gguf_to_hf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A float32 GGUF of a random tiny Llama with a BPE tokenizer; returns its tensors."""
    tok = train_tokenizer(seed)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {"token_embd.weight": rand(len(tokens), HIDDEN),
               "output_norm.weight": (1 + rand(HIDDEN)).astype(np.float32)}
    for i in range(LAYERS):
        tensors.update({
            f"blk.{i}.attn_norm.weight": (1 + rand(HIDDEN)).astype(np.float32),
            f"blk.{i}.attn_q.weight": rand(HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_k.weight": rand(KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": rand(KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": rand(HIDDEN, HEADS * head_dim),
            f"blk.{i}.ffn_norm.weight": (1 + rand(HIDDEN)).astype(np.float32),
            f"blk.{i}.ffn_gate.weight": rand(FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": rand(FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": rand(HIDDEN, FFN),
        })

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL
                       for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab[IM_END])
    w.add_pad_token_id(vocab[ENDOFTEXT])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny-llama"
    summary = _load_script().convert(tiny_gguf[0], out)
    return out, summary


def test_converted_folder_loads_and_matches_the_gguf_weights(tiny_gguf, converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tensors = tiny_gguf
    out, summary = converted
    assert summary["architecture"] == "LlamaForCausalLM"
    assert summary["max_logit_diff"] <= 1e-4
    assert summary["tied_embeddings"] and summary["chat_template"]
    assert (out / "model.safetensors").is_file()
    assert not list(out.parent.glob(".tiny-llama.*")), "staging folder left behind"

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tok_config and "is_local" not in tok_config

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    sd = model.state_dict()
    # Tensors llama.cpp does not permute come back exactly as written.
    np.testing.assert_array_equal(sd["model.embed_tokens.weight"].numpy(),
                                  tensors["token_embd.weight"])
    np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), tensors["token_embd.weight"])
    for i in range(LAYERS):
        for ours, theirs in (("mlp.gate_proj", "ffn_gate"), ("mlp.down_proj", "ffn_down"),
                             ("self_attn.v_proj", "attn_v"), ("input_layernorm", "attn_norm")):
            np.testing.assert_array_equal(sd[f"model.layers.{i}.{ours}.weight"].numpy(),
                                          tensors[f"blk.{i}.{theirs}.weight"])

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT
    text = tok.apply_chat_template([{"role": "user", "content": "What is 7+5?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tok(text).input_ids
    assert tok.convert_tokens_to_ids(IM_END) in ids
    assert tok.decode(ids) == text  # byte-level BPE round-trips


def test_refuses_a_file_that_is_not_gguf(tmp_path):
    script = _load_script()
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(script.ConversionError, match="is not a GGUF file"):
        script.convert(fake, tmp_path / "out")
    with pytest.raises(script.ConversionError, match="no file"):
        script.convert(tmp_path / "missing.gguf", tmp_path / "out")
    assert script.main(["--gguf", str(fake), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_out_unless_overwrite(tiny_gguf, tmp_path):
    script = _load_script()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(script.ConversionError, match="--overwrite"):
        script.convert(tiny_gguf[0], out)
    assert (out / "keep.txt").read_text() == "x"
    script.convert(tiny_gguf[0], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_failed_check_leaves_nothing_behind(tiny_gguf, tmp_path, monkeypatch):
    script = _load_script()

    def mismatch(model, tokenizer, folder, atol):
        raise script.ConversionError("logits differ")

    monkeypatch.setattr(script, "compare", mismatch)
    with pytest.raises(script.ConversionError, match="logits differ"):
        script.convert(tiny_gguf[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_compare_detects_changed_weights(tiny_gguf, converted):
    """The check itself can fail: a folder whose weights were altered is refused."""
    import torch

    script = _load_script()
    model, tokenizer = script.load_gguf(Path(tiny_gguf[0]))
    out, _ = converted
    assert script.compare(model, tokenizer, out, 1e-4) <= 1e-4
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.05)
    with pytest.raises(script.ConversionError, match="logits differ"):
        script.compare(model, tokenizer, out, 1e-4)
