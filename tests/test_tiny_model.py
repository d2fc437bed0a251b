"""The tiny model shipped in cepo/assets/tiny-arith: loads offline, formats, answers in \\boxed{}."""

import json
from pathlib import Path

import pytest
import torch

from cepo.answers import extract_boxed
from cepo.arithmetic import make_split

ASSET = Path(__file__).resolve().parent.parent / "cepo" / "assets" / "tiny-arith"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ASSET, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(ASSET, local_files_only=True, use_safetensors=True,
                                             dtype=torch.float32)
    return m.eval()


def test_asset_files():
    names = {p.name for p in ASSET.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)  # safetensors only
    assert sum((ASSET / n).stat().st_size for n in names) < 20 * 2**20
    assert "chat_template" in json.loads((ASSET / "tokenizer_config.json").read_text())


def test_tokenizer_chat_template_and_special_tokens(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "(3+4)*5-2"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>(3+4)*5-2<|assistant|>"
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.eos_token_id != tok.pad_token_id
    # the teacher context: "\n\n" must be real tokens (not unknown / pad), and text round-trips
    hinted = "(3+4)*5-2\n\n33"
    ids = tok(hinted, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and tok.pad_token_id not in ids
    assert tok.decode(ids) == hinted
    solution = "3+4=7\n7*5=35\n35-2=33\n\\boxed{33}"
    assert tok.decode(tok(solution, add_special_tokens=False).input_ids) == solution
    full = tok.apply_chat_template([{"role": "user", "content": "1+2*3"},
                                    {"role": "assistant", "content": "1+2=3\n3*3=9\n\\boxed{9}"}],
                                   tokenize=False)
    assert full == "<|user|>1+2*3<|assistant|>1+2=3\n3*3=9\n\\boxed{9}<eos>"


def test_model_config(model, tok):
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.config.vocab_size >= len(tok)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_greedy_generation_answers_in_boxed(model, tok):
    torch.manual_seed(0)
    rows = make_split("test", 12, seed=0)
    tok.padding_side = "left"
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                       add_generation_prompt=True, tokenize=False) for r in rows]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=64, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    texts = tok.batch_decode(new, skip_special_tokens=True)
    answers = [extract_boxed(t) for t in texts]
    assert sum(a is not None and a.lstrip("-").isdigit() for a in answers) >= 10, texts
    # generation stops at EOS: every finished row has an EOS right after its boxed answer
    stopped = sum(tok.eos_token_id in row.tolist() for row in new)
    assert stopped >= 10
