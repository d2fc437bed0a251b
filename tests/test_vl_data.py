"""Image datasets for vision-language policies (cepo.data with image_field, cepo.vision):
jsonl / parquet / saved datasets dirs; paths, raw bytes and datasets.Image values; every
bad row named with its reason, raised or skipped."""

import json
import logging

import pytest

from cepo.data import load_examples
from cepo.vision import IMAGE_PAD, VISION_END, VISION_START, ImagePreparer
from vl_model import make_image_dataset, make_tiny_vl_dir, png_bytes, synthetic_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_vl_dir(tmp_path_factory.mktemp("vl") / "m", arch="qwen3_vl")


def load(path, **kw):
    return load_examples(str(path), image_field="images", **kw)


def test_jsonl_relative_paths_prepare(tmp_path, model_dir):
    path = make_image_dataset(tmp_path / "d", n=3)
    examples = load(path, on_bad_row="error")
    assert len(examples) == 3 and all(len(ex.images) == 1 for ex in examples)
    assert examples[0].images[0] == str(tmp_path / "d" / "img" / "0.png")
    prep = ImagePreparer(str(model_dir))
    ex = prep.prepare(examples[0])
    n = ex.vision.token_counts(prep.merge_size)[0]
    assert ex.prompt.startswith(VISION_START + IMAGE_PAD * n + VISION_END + "What is")
    assert ex.vision.key == examples[0].source and ex.answer == examples[0].answer
    assert prep.prepare(ex) is ex  # prepared once


def test_parquet_bytes_and_datasets_dir(tmp_path, model_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = [synthetic_image(32, 48, seed=i) for i in range(2)]
    table = pa.table({"prompt": ["<image> a?", "<image><image> b?"], "answer": ["1", "2"],
                      "images": [[{"bytes": png_bytes(imgs[0]), "path": None}],
                                 [{"bytes": png_bytes(imgs[0]), "path": None},
                                  {"bytes": png_bytes(imgs[1]), "path": None}]]})
    pq.write_table(table, tmp_path / "d.parquet")
    examples = load(tmp_path / "d.parquet", on_bad_row="error")
    assert [len(ex.images) for ex in examples] == [1, 2]
    ds = datasets.Dataset.from_dict(
        {"prompt": ["<image> c?"], "answer": ["3"], "images": [[imgs[1]]]},
        features=datasets.Features({"prompt": datasets.Value("string"),
                                    "answer": datasets.Value("string"),
                                    "images": datasets.Sequence(datasets.Image())}))
    ds.save_to_disk(str(tmp_path / "saved"))
    (saved,) = load(tmp_path / "saved", on_bad_row="error")
    prep = ImagePreparer(str(model_dir))
    a, b = prep.prepare(examples[1]), prep.prepare(saved)
    assert a.vision.num_images == 2
    assert a.vision.pixel_values[-b.vision.pixel_values.shape[0]:].equal(b.vision.pixel_values)
    # raw bytes (a binary column) load as the same image
    pq.write_table(pa.table({"prompt": ["<image> c?"], "answer": ["3"],
                             "images": [[png_bytes(imgs[1])]]}), tmp_path / "raw.parquet")
    (raw,) = load(tmp_path / "raw.parquet", on_bad_row="error")
    assert prep.prepare(raw).vision.pixel_values.equal(b.vision.pixel_values)


BAD_ROWS = [
    ({"prompt": "<image> x?", "answer": "1", "images": ["img/missing.png"]}, "not found"),
    ({"prompt": "<image> x?", "answer": "1", "images": ["img/garbage.png"]}, "unreadable image"),
    ({"prompt": "<image><image> x?", "answer": "1", "images": ["img/ok.png"]},
     "2 '<image>' placeholder(s) but 1 image(s)"),
    ({"prompt": "x?", "answer": "1", "images": ["img/ok.png"]},
     "0 '<image>' placeholder(s) but 1 image(s)"),
    ({"prompt": "<image> x?", "answer": "1", "images": ["img/big.png"]},
     "over the pixel budget max_pixels=4096"),
]


@pytest.mark.parametrize("row,reason", BAD_ROWS, ids=["missing", "unreadable", "too-few-images",
                                                      "no-placeholder", "over-budget"])
def test_bad_rows_are_named(tmp_path, row, reason, caplog):
    (tmp_path / "img").mkdir()
    synthetic_image(32, 32).save(tmp_path / "img" / "ok.png")
    synthetic_image(80, 64).save(tmp_path / "img" / "big.png")  # 5120 pixels
    (tmp_path / "img" / "garbage.png").write_bytes(b"not a png at all")
    good = {"prompt": "<image> y?", "answer": "2", "images": ["img/ok.png"]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError) as e:
        load(path, on_bad_row="error", max_pixels=4096)
    assert f"{path}:2: field 'images': " in str(e.value) and reason in str(e.value)
    with caplog.at_level(logging.WARNING):
        examples = load(path, on_bad_row="skip", max_pixels=4096)
    assert [ex.answer for ex in examples] == ["2"]
    assert "skipped 1 bad row" in caplog.text and reason in caplog.text


def test_text_rows_unchanged_without_image_field(tmp_path):
    """A text model never looks at images: the same file loads as before."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "<image> x?", "answer": "1"}) + "\n")
    (ex,) = load_examples(str(path))
    assert ex.prompt == "<image> x?" and ex.images is None and ex.vision is None


def test_paper_config_parses(model_dir):
    """cepo/configs/qwen3-vl-2b-geo3k.yaml: the paper's multimodal settings."""
    from cepo.config import CONFIG_DIR, parse_config

    cfg = parse_config(["--config", str(CONFIG_DIR / "qwen3-vl-2b-geo3k.yaml"),
                        "--model", str(model_dir)])
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lr, cfg.prompts_per_step, cfg.group_size) == \
        (16, 32, 5e-6, 32, 8)
    assert (cfg.lam0, cfg.t_warm, cfg.eps_w, cfg.clip_low, cfg.clip_high, cfg.steps,
            cfg.max_new_tokens) == (0.5, 25, 0.2, 0.2, 0.28, 50, 2048)
    assert not cfg.train_vision and cfg.image_field == "images"


def test_config_errors():
    from cepo.config import parse_config

    with pytest.raises(ValueError, match="'train_vision' needs full fine-tuning"):
        parse_config(["--train_vision", "true", "--lora_rank", "4"])
    with pytest.raises(ValueError, match="'min_pixels'"):
        parse_config(["--min_pixels", "10", "--max_pixels", "5"])


def test_unknown_multimodal_model_type_is_named(tmp_path):
    from safetensors.torch import save_file

    import torch
    from cepo.model import load_causal_lm

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model_type 'llava' is not supported.*qwen3_vl, "
                                         "qwen2_5_vl"):
        load_causal_lm(str(tmp_path))


def test_max_prompt_tokens_counts_image_tokens(tmp_path, model_dir):
    from functools import partial

    from transformers import AutoTokenizer

    from cepo.build import drop_long_prompts
    from cepo.contexts import render_prompt

    path = make_image_dataset(tmp_path / "d", n=1, sizes=((64, 64),))  # 16 image tokens
    examples = load(path)
    render = partial(render_prompt, AutoTokenizer.from_pretrained(model_dir))
    limit = len(render(examples[0].prompt))  # "<image>" is 7 characters: 7 tokens here
    assert drop_long_prompts(examples, render, limit, "training") == examples
    prep = ImagePreparer(str(model_dir))
    with pytest.raises(ValueError, match="drops every training prompt"):
        drop_long_prompts(examples, render, limit, "training", prep.prepare)
    assert drop_long_prompts(examples, render, limit + 11, "training", prep.prepare) == examples


def test_builtin_vision_arithmetic_datasets():
    """--train_data builtin:vision_arithmetic (tiny-vl.yaml): image examples for both splits."""
    from cepo.build import load_datasets
    from cepo.config import CONFIG_DIR, parse_config

    cfg = parse_config(["--config", str(CONFIG_DIR / "tiny-vl.yaml"), "--num_train", "5",
                        "--num_eval", "3"])
    train, evals = load_datasets(cfg)
    assert (len(train), len(evals)) == (5, 3)
    assert all(len(ex.images) == 1 and ex.prompt.count("<image>") == 1 for ex in train + evals)
    assert train[0].source.startswith("vision-arithmetic-train")
    from cepo import build, vision_arith
    assert build.VISION_TASK == vision_arith.BUILTIN_TASK
