"""The tiny BPE chat model of tests/bpe_model.py: loads offline, renders ChatML with a
system message, stops on two tokens, round-trips text, and fits cepo's prompt rendering."""

import json

import pytest
import torch

from bpe_model import (DEFAULT_SYSTEM_PROMPT, ENDOFTEXT, IM_END, IM_START, build_bpe_chat_model)
from cepo.arithmetic import make_split
from cepo.contexts import render_prompt


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory):
    return build_bpe_chat_model(tmp_path_factory.mktemp("bpe_chat_model"), seed=0)


@pytest.fixture(scope="session")
def tokenizer(bpe_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(bpe_model_dir, local_files_only=True)


@pytest.fixture(scope="session")
def model(bpe_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(bpe_model_dir, local_files_only=True).eval()


def test_folder_loads_as_a_tiny_qwen3_with_a_bpe_vocab(bpe_model_dir, tokenizer, model):
    assert (bpe_model_dir / "model.safetensors").is_file()
    assert not list(bpe_model_dir.glob("*.bin"))
    assert type(model).__name__ == "Qwen3ForCausalLM"
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert cfg.vocab_size == len(tokenizer)
    assert 300 <= len(tokenizer) <= 500
    # a real BPE: merges exist, and common words are single tokens
    merges = json.loads((bpe_model_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert len(merges) > 50
    assert len(tokenizer.tokenize(" the")) == 1
    assert len(tokenizer.tokenize("step by step")) < len("step by step") / 2


def test_special_tokens_pad_eos_and_no_bos(tokenizer):
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token == ENDOFTEXT
    assert tokenizer.bos_token is None and tokenizer.bos_token_id is None
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_START, IM_END)}
    assert len(set(ids.values())) == 3
    assert tokenizer.unk_token_id not in ids.values()
    for tok, i in ids.items():  # written in text, each special token is one id, never split
        assert tokenizer(f"a{tok}b", add_special_tokens=False).input_ids[1] == i
    # no BOS / EOS added around plain text
    assert tokenizer("7+5=12").input_ids == tokenizer("7+5=12", add_special_tokens=False).input_ids


def test_chat_template_renders_system_user_and_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "2+3"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nSolve it.<|im_end|>\n"
                    "<|im_start|>user\n2+3<|im_end|>\n<|im_start|>assistant\n")
    without = tokenizer.apply_chat_template(messages[1:], add_generation_prompt=False,
                                            tokenize=False)
    assert without == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                       "<|im_start|>user\n2+3<|im_end|>\n")
    turn = messages + [{"role": "assistant", "content": "\\boxed{5}"}]
    text = tokenizer.apply_chat_template(turn, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n\\boxed{5}<|im_end|>\n")


def test_generation_config_has_two_stop_tokens(bpe_model_dir, tokenizer, model):
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(bpe_model_dir, local_files_only=True)
    im_end, eot = (tokenizer.convert_tokens_to_ids(t) for t in (IM_END, ENDOFTEXT))
    assert isinstance(gen.eos_token_id, list) and set(gen.eos_token_id) == {im_end, eot}
    assert gen.pad_token_id == eot
    assert model.generation_config.eos_token_id == gen.eos_token_id


@pytest.mark.parametrize("stop", [IM_END, ENDOFTEXT])
def test_generate_stops_on_either_stop_token(tokenizer, model, stop):
    from transformers import LogitsProcessor, LogitsProcessorList

    prompt = torch.tensor([render_prompt(tokenizer, "2+3")])
    stop_id = tokenizer.convert_tokens_to_ids(stop)

    class ForceStopSecond(LogitsProcessor):
        """Greedy, but the second new token is forced to ``stop``."""

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt.shape[1] + 1:
                scores = torch.full_like(scores, float("-inf"))
                scores[:, stop_id] = 0.0
            return scores

    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=8, logits_processor=LogitsProcessorList([ForceStopSecond()]))
    new = out[0, prompt.shape[1]:].tolist()
    assert len(new) == 2 and new[-1] == stop_id


def test_encode_decode_round_trips_text(tokenizer):
    rows = make_split("test", 30, 5)  # unseen by the BPE (it trained on train problems)
    texts = [f"{r['prompt']}\n{r['solution']}" for r in rows]
    texts += ["Ines has 41 stickers and gives away 17.\n41-17=24\nThe answer is \\boxed{24}.",
              "  two  spaces, tabs\tand unicode: café ½ → ∞ 数学", "-12*(3+4)=-84"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    # digits are split one by one, as Qwen-style pre-tokenisation does
    assert len(tokenizer.tokenize("12345")) == 5
    # special tokens survive decoding unless skipped
    ids = tokenizer(f"\\boxed{{5}}{IM_END}", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == f"\\boxed{{5}}{IM_END}"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\\boxed{5}"


@pytest.mark.parametrize("hint", [None, "34"])
def test_render_prompt_uses_the_template_once_without_bos_or_eos(tokenizer, hint):
    ids = render_prompt(tokenizer, "(7+5)*3-4", hint)
    content = "(7+5)*3-4" if hint is None else "(7+5)*3-4\n\n34"
    expected = (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(ids) == expected
    assert ids == tokenizer(expected, add_special_tokens=False).input_ids
    im_start = tokenizer.convert_tokens_to_ids(IM_START)
    assert ids[0] == im_start and ids.count(im_start) == 3  # system, user, assistant: once each
    assert ids[-1] not in (tokenizer.eos_token_id, tokenizer.pad_token_id)
    last = len(ids) - 1 - ids[::-1].index(im_start)  # the generation prompt closes the ids
    assert tokenizer.decode(ids[last:]) == "<|im_start|>assistant\n"


def test_same_seed_same_folder_other_seed_differs(bpe_model_dir, tmp_path):
    again = build_bpe_chat_model(tmp_path / "again", seed=0)
    other = build_bpe_chat_model(tmp_path / "other", seed=1)
    for name in ("tokenizer.json", "model.safetensors", "config.json", "generation_config.json"):
        assert (again / name).read_bytes() == (bpe_model_dir / name).read_bytes(), name
    assert (other / "tokenizer.json").read_bytes() != (again / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
