"""A tiny random causal LM with a local character-level tokenizer, saved like a hub checkpoint.

Tests use it to run the trainer end to end without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHARS = list("0123456789+-*/=()., \n\\{}abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:?")
SPECIALS = ["<pad>", "<eos>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
                 "{% else %}{{ m['content'] }}<eos>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(path: Path | None, *, specials: list[str] = SPECIALS,
                   chars: list[str] = CHARS):
    """A PreTrainedTokenizerFast over single characters plus special tokens (``<pad>``,
    ``<eos>``, then the additional ones: the chat markers, and for vision-language tests the
    vision tokens), saved to ``path`` unless it is None."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=specials[2:])
    fast.chat_template = CHAT_TEMPLATE
    if path is not None:
        fast.save_pretrained(path)
    return fast


def make_tiny_model_dir(path: Path, *, arch: str = "qwen3", seed: int = 0, hidden: int = 32,
                        layers: int = 2) -> Path:
    """Save a random tiny model (safetensors) + tokenizer + generation config to ``path``."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=hidden // 4, tie_word_embeddings=True, **common)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "llama":
        config = transformers.LlamaConfig(tie_word_embeddings=False, **common)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    (path / "tiny_lm.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return path


def add_frequent_stop_token(path: Path, contents, *, head_scale: float, samples: int) -> int:
    """Scale the saved model's LM head by ``head_scale`` (peaked next-token distributions)
    and make the token it samples most often (``samples`` per user message of
    ``contents``, 12 new tokens, through ``model.generate``) a second stop token in
    generation_config.json, so responses stop at many different steps and some on each
    stop token. Returns the second stop token's id."""
    from collections import Counter

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cepo.contexts import render_prompt
    from cepo.sampler import HFEngine, SamplingParams

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(path)
    out = HFEngine(str(path), tokenizer=tok, decode="generate").generate(
        [render_prompt(tok, c) for c in contents], samples, SamplingParams(max_new_tokens=12),
        seeds=list(range(len(contents))))
    counts = Counter(t for g in out for c in g for t in c.token_ids)
    second = next(t for t, _ in counts.most_common() if t not in tok.all_special_ids)
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [tok.eos_token_id, second]
    (path / "generation_config.json").write_text(json.dumps(gen))
    return second
