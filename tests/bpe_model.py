"""A tiny random causal LM with a REAL byte-level BPE tokenizer and a ChatML chat template.

The character-level tokenizer of ``tiny_lm.py`` hides the bugs a real checkpoint shows:
multi-character tokens, several stop tokens, a system prompt in the template, no BOS.
This builder trains a byte-level BPE (the ``tokenizers`` library, offline, seeded) on the
built-in arithmetic task plus a little English, wraps it as a ``PreTrainedTokenizerFast``
laid out like Qwen's instruct tokenizers, and saves it beside a random Qwen3 model:

- special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos); no BOS;
- chat template: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, a default
  system message when the conversation has none, ``<|im_start|>assistant\\n`` as the
  generation prompt;
- ``generation_config.json`` stops on BOTH ``<|im_end|>`` and ``<|endoftext|>``;
- the model: Qwen3ForCausalLM, hidden 64, 2 layers, 4 heads, 2 KV heads, tied embeddings,
  vocab = the tokenizer's size, safetensors.

Usage (tests/ is on sys.path under pytest): ``from bpe_model import build_bpe_chat_model``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
"""Ids 0, 1, 2 in this order (the BPE trainer puts special tokens first)."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
VOCAB_SIZE = 400
"""Target vocabulary: 3 special tokens + the 256-byte alphabet + ~140 merges."""

CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""ChatML with an optional system message (a default one when none is given)."""

PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Pre-tokenisation as in Qwen2-style tokenizers: words with an optional leading space or
symbol, every digit on its own, runs of punctuation, newlines, spaces."""

_NAMES = ["Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack"]
_THINGS = ["apples", "pencils", "cookies", "marbles", "books", "stickers", "coins", "cards"]
_SENTENCES = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Let's think step by step.",
    "The answer is the number of items left at the end.",
    "First we add, then we subtract, and finally we multiply.",
    "How many are there in total? Write the result as a whole number.",
    "She gives some of them to her friend and keeps the rest.",
    "Each box holds the same number of items, so we multiply.",
    "Check the result: it must be an integer.",
    "You are a helpful assistant.",
]


def _english(rng: random.Random, n: int) -> list[str]:
    """n short word problems in plain English with their one-line solutions."""
    lines = []
    for _ in range(n):
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        a, b = rng.randint(2, 60), rng.randint(1, 30)
        lines.append(f"{name} has {a} {thing} and buys {b} more. How many {thing} does "
                     f"{name} have now?\n{a}+{b}={a + b}\nThe answer is \\boxed{{{a + b}}}.")
    return lines


def training_corpus(seed: int = 0) -> list[str]:
    """The texts the BPE is trained on: arithmetic problems with worked solutions (the
    built-in task's train split), simple English word problems and fixed sentences."""
    from cepo.arithmetic import make_split

    rng = random.Random(f"bpe-corpus-{seed}")
    rows = make_split("train", 300, seed)
    arithmetic = [f"{r['prompt']}\n{r['solution']}" for r in rows]
    return arithmetic + _english(rng, 200) + _SENTENCES * 5


def train_tokenizer(seed: int = 0, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``training_corpus(seed)``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_corpus(seed), trainer=trainer)
    return tok


def build_bpe_chat_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a loadable Hugging Face causal-LM folder to ``out_dir`` and return it.

    Offline and seeded (the same seed gives the same tokenizer and weights). Loads with
    ``AutoTokenizer.from_pretrained(out_dir, local_files_only=True)`` and
    ``AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)``.
    """
    import torch
    import transformers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(seed), bos_token=None,
                                   eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None,
                                   additional_special_tokens=[IM_START],
                                   model_max_length=1024, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)

    ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = transformers.Qwen3Config(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT])
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
        pad_token_id=ids[ENDOFTEXT], do_sample=True, temperature=1.0, top_p=1.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "bpe_model.json").write_text(json.dumps({"builder": "tests/bpe_model.py",
                                                        "seed": seed}))
    return out_dir
