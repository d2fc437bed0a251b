"""The built-in task in image form (cepo.vision_arith) and the tiny Qwen3-VL shipped in
cepo/assets/tiny-vl: deterministic rendering, the text task's answers, and an asset that
loads offline and answers held-out image problems at its recorded accuracy."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cepo import arithmetic, vision_arith
from cepo.answers import extract_boxed

ASSET = Path(__file__).resolve().parent.parent / "cepo" / "assets" / "tiny-vl"
IMAGE_SPAN = "<|vision_start|><|image_pad|><|vision_end|>"


# ---------------------------------------------------------------- rendering and data


def test_rendering_is_deterministic_and_one_cell_per_character():
    expr = "(7+15)*3-19"
    a, b = vision_arith.render_expression(expr), vision_arith.render_expression(expr)
    assert a.mode == "RGB" and a.size == (32 * len(expr), 32)
    assert vision_arith.png_bytes(a) == vision_arith.png_bytes(b)
    pixels = np.asarray(a)
    assert set(np.unique(pixels)) <= {0, 255}  # black on white, no antialiasing
    assert (pixels[..., 0] == pixels[..., 2]).all()  # grey
    # a character's cell is the same wherever it stands, and different characters differ
    cells = {}
    for i, ch in enumerate(expr):
        cell = pixels[:, 32 * i:32 * (i + 1)]
        assert (cell == 0).any(), f"character {ch!r} drew nothing"
        if ch in cells:
            assert (cells[ch] == cell).all()
        cells[ch] = cell
    other = np.asarray(vision_arith.render_expression("1+2*3"))
    assert (other[:, 32:64] == cells["+"]).all()
    distinct = [c.tobytes() for c in cells.values()]
    assert len(set(distinct)) == len(distinct)


def test_rendering_rejects_bad_input():
    with pytest.raises(ValueError, match="not drawable"):
        vision_arith.render_expression("2/3")
    with pytest.raises(ValueError, match="non-empty"):
        vision_arith.render_expression("")


@pytest.mark.parametrize("split", ["train", "test"])
def test_rows_match_the_text_task(split):
    text = arithmetic.make_split(split, 64, seed=3)
    rows = vision_arith.make_split(split, 64, seed=3)
    assert [r["answer"] for r in rows] == [t["answer"] for t in text]
    assert [r["solution"] for r in rows] == [t["solution"] for t in text]
    assert [r["expression"] for r in rows] == [t["prompt"] for t in text]
    for r in rows:
        assert r["prompt"].count(vision_arith.IMAGE_PLACEHOLDER) == len(r["images"]) == 1
        assert r["prompt"] == "<image>Compute the value of the expression in the image."
        assert r["images"][0].size == (32 * len(r["expression"]), 32)
        assert r["expression"] not in r["prompt"]  # the problem is only in the image
        assert arithmetic.split_of(r["expression"]) == split


def test_write_jsonl_layout(tmp_path):
    rows = vision_arith.make_split("test", 5, seed=0)
    path = vision_arith.write_jsonl(rows, str(tmp_path / "vl.jsonl"))
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert [line["answer"] for line in lines] == [r["answer"] for r in rows]
    for line, row in zip(lines, rows):
        assert set(line) == {"prompt", "answer", "solution", "expression", "images"}
        (rel,) = line["images"]
        assert not Path(rel).is_absolute()  # relative to the JSONL file
        with Image.open(tmp_path / rel) as im:
            assert (np.asarray(im.convert("RGB")) == np.asarray(row["images"][0])).all()
    vision_arith.main(["--split", "train", "--n", "3", "--out", str(tmp_path / "cli.jsonl")])
    assert len((tmp_path / "cli.jsonl").read_text().splitlines()) == 3


# ---------------------------------------------------------------- the shipped asset


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ASSET, local_files_only=True)


@pytest.fixture(scope="module")
def image_processor():
    from transformers import AutoImageProcessor
    return AutoImageProcessor.from_pretrained(ASSET, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForImageTextToText
    m = AutoModelForImageTextToText.from_pretrained(ASSET, local_files_only=True, use_safetensors=True,
                                                    dtype=torch.float32)
    return m.eval()


def test_asset_files():
    names = {p.name for p in ASSET.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "preprocessor_config.json", "chat_template.json", "README.md",
            "build_figures.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)  # safetensors only
    assert sum((ASSET / n).stat().st_size for n in names) < 8 * 2**20


def test_tokenizer_extends_tiny_arith(tok):
    from transformers import AutoTokenizer
    text_tok = AutoTokenizer.from_pretrained(ASSET.parent / "tiny-arith", local_files_only=True)
    assert {t: i for t, i in tok.get_vocab().items() if i < len(text_tok)} == text_tok.get_vocab()
    assert len(tok) == len(text_tok) + 4
    # string content (the trainer's placeholder replaced) and list content (processor style) agree
    as_string = tok.apply_chat_template([{"role": "user", "content": IMAGE_SPAN + "Q"}],
                                        add_generation_prompt=True, tokenize=False)
    as_list = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                     {"type": "text", "text": "Q"}]}],
                                      add_generation_prompt=True, tokenize=False)
    assert as_string == as_list == "<|user|>" + IMAGE_SPAN + "Q<|assistant|>"
    ids = tok(IMAGE_SPAN, add_special_tokens=False).input_ids
    assert len(ids) == 3 and tok.unk_token_id not in ids


def test_model_config(model, tok):
    cfg = model.config
    assert cfg.model_type == "qwen3_vl"
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.eos_token_id == model.generation_config.eos_token_id == tok.eos_token_id
    assert cfg.text_config.pad_token_id == tok.pad_token_id
    assert cfg.text_config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def encode(tok, image_processor, rows, hints=None):
    """Left-padded generation inputs for rows of cepo.vision_arith (what Qwen3VLProcessor
    does: one <|image_pad|> per merged 2x2 patch group)."""
    vision = image_processor(images=[r["images"][0] for r in rows], return_tensors="pt")
    counts = (vision["image_grid_thw"].prod(-1) // image_processor.merge_size ** 2).tolist()
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    seqs = []
    for r, n, hint in zip(rows, counts, hints or [None] * len(rows)):
        content = r["prompt"] + ("" if hint is None else "\n\n" + hint)
        text = tok.apply_chat_template([{"role": "user", "content": content.replace("<image>", IMAGE_SPAN)}],
                                       add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False).input_ids
        at = ids.index(pad_id)
        seqs.append(ids[:at] + [pad_id] * n + ids[at + 1:])
    width = max(map(len, seqs))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
    return dict(input_ids=input_ids, attention_mask=(torch.arange(width) >= width - torch.tensor(
        [len(s) for s in seqs])[:, None]).long(), mm_token_type_ids=(input_ids == pad_id).long(),
        pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])


def greedy_answers(model, tok, image_processor, rows, hints=None):
    enc = encode(tok, image_processor, rows, hints)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=64, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [extract_boxed(t) for t in texts], texts


def test_image_tokens_per_character(tok, image_processor):
    rows = vision_arith.make_split("test", 4, seed=0)
    enc = encode(tok, image_processor, rows)
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    for row, ids in zip(rows, enc["input_ids"]):
        assert int((ids == pad_id).sum()) == len(row["expression"])
    assert enc["image_grid_thw"].tolist() == [[1, 2, 2 * len(r["expression"])] for r in rows]


def test_generates_boxed_answers_from_image_prompts(model, tok, image_processor):
    rows = vision_arith.make_split("test", 12, seed=0)
    answers, texts = greedy_answers(model, tok, image_processor, rows)
    assert sum(a is not None and a.lstrip("-").isdigit() for a in answers) >= 10, texts
    # the answer is read from the image: the correct hint helps, as the teachers need
    hinted, _ = greedy_answers(model, tok, image_processor, rows, [r["answer"] for r in rows])
    assert sum(a == r["answer"] for a, r in zip(hinted, rows)) >= sum(
        a == r["answer"] for a, r in zip(answers, rows))


def test_held_out_greedy_accuracy_matches_the_build():
    """Greedy accuracy on the README's 200 test problems: the recorded figure (up to
    thread-count rounding), in the range where RL has signal."""
    figures = json.loads((ASSET / "build_figures.json").read_text())
    assert 0.2 <= figures["greedy_accuracy"] <= 0.6
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ASSET, local_files_only=True)
    ip = AutoImageProcessor.from_pretrained(ASSET, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(ASSET, local_files_only=True,
                                                        dtype=torch.float32).eval()
    rows = vision_arith.make_split("dev", figures["test_problems"], seed=figures["seed"])
    correct = 0
    for i in range(0, len(rows), 50):
        answers, _ = greedy_answers(model, tok, ip, rows[i:i + 50])
        correct += sum(a == r["answer"] for a, r in zip(answers, rows[i:i + 50]))
    assert abs(correct / len(rows) - figures["greedy_accuracy"]) <= 0.03


def test_auto_processor_where_torchvision_is_installed():
    """transformers' Qwen3VLProcessor needs a video processor, which needs torchvision
    (absent from the CPU stack); where it is installed the asset loads as a processor too."""
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(ASSET, local_files_only=True)
    row = vision_arith.make_split("test", 1, seed=0)[0]
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": vision_arith.QUESTION}]}],
                                         add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=row["images"], return_tensors="pt")
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == len(row["expression"])


def test_build_script_encodes_as_the_asset_expects(tok, image_processor):
    """scripts/build_tiny_vl.py trained on the inputs this file generates from."""
    spec = importlib.util.spec_from_file_location(
        "build_tiny_vl", Path(__file__).resolve().parent.parent / "scripts" / "build_tiny_vl.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert tok.chat_template == build.CHAT_TEMPLATE
    rows = vision_arith.make_split("test", 6, seed=1)
    hints = [None, "7", None, "12", None, None]
    ours = encode(tok, image_processor, rows, hints)
    theirs = build.Processor(tok, image_processor)(
        text=[build.chat_prompt(tok, build.user_content(r, h)) for r, h in zip(rows, hints)],
        images=[r["images"][0] for r in rows], padding=True)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(ours[key], theirs[key]), key


def test_examples_for_the_trainer():
    """builtin:vision_arithmetic rows as the trainer's Examples, valid for its image checks."""
    from cepo.data import Example
    examples = vision_arith.examples("test", 6, seed=0)
    rows = arithmetic.make_split("test", 6, seed=0)
    assert all(isinstance(e, Example) for e in examples)
    assert [e.answer for e in examples] == [r["answer"] for r in rows]
    assert [e.source for e in examples] == [f"vision-arithmetic-test[{i}]" for i in range(6)]
    vision = pytest.importorskip("cepo.vision")
    for e in examples:
        assert len(vision.check_row_images(e.prompt, e.images, None, 16384)) == 1


def test_trainer_prepares_the_builtin_rows_for_the_asset(tok):
    """cepo.vision (the trainer's image path) accepts the asset and expands each row's
    placeholder into one image token per character of the expression."""
    vision = pytest.importorskip("cepo.vision")
    from transformers import AutoConfig
    vision.check_vision_tokens(tok, AutoConfig.from_pretrained(ASSET, local_files_only=True))
    preparer = vision.ImagePreparer(str(ASSET), max_pixels=16384)
    texts = arithmetic.make_split("test", 5, seed=2)
    for example, text in zip(vision_arith.examples("test", 5, seed=2), texts):
        prepared = preparer.prepare(example)
        assert prepared.prompt.count("<|image_pad|>") == len(text["prompt"])
        assert prepared.vision.grid_thw.tolist() == [[1, 2, 2 * len(text["prompt"])]]
        assert vision.display_prompt(prepared.prompt) == vision_arith.PROMPT


def test_build_script_rebuilds_the_shipped_files(tmp_path):
    """A 2-step run of scripts/build_tiny_vl.py writes the asset's files: the same model
    config, tokenizer, image processor and chat template, byte for byte, and a model that
    loads and generates."""
    import os
    import subprocess
    import sys
    out = tmp_path / "tiny-vl"
    script = Path(__file__).resolve().parent.parent / "scripts" / "build_tiny_vl.py"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--max_steps", "2", "--eval_every", "2",
                    "--warmup", "1", "--num_train", "64", "--num_test", "2", "--num_dev", "2",
                    "--batch_size", "8"], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "chat_template.json"):
        assert (out / name).read_bytes() == (ASSET / name).read_bytes(), name
    figures = json.loads((out / "build_figures.json").read_text())
    assert figures["sft_steps"] == 2 and figures["test_problems"] == 2
    assert "2 steps of 8" in (out / "README.md").read_text()
