"""Tiny random Qwen3-VL / Qwen2.5-VL checkpoints (config, safetensors, tokenizer, processor) and
synthetic image datasets, built locally for the multimodal tests: nothing is downloaded.

The tokenizer is character-level plus the Qwen special tokens the vision path needs
(``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``, ``<|video_pad|>``); images are
cut into 8-pixel patches (merge 2), so a 32 x 48 image is 4 x 6 patches = 6 image tokens.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

import tiny_lm

CHARS = tiny_lm.CHARS + ["<", ">"]
SPECIALS = tiny_lm.SPECIALS + ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                               "<|video_pad|>"]
PATCH = 8
MERGE = 2


def make_image_processor():
    """The PIL image processor (torchvision is not a dependency, so no full Qwen processor,
    whose video processor needs it: the trainer loads tokenizer and image processor apart)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})


def make_tiny_vl_dir(path: Path, *, arch: str = "qwen3_vl", seed: int = 0, hidden: int = 32,
                     layers: int = 2) -> Path:
    """Save a random tiny Qwen3-VL ("qwen3_vl") or Qwen2.5-VL ("qwen2_5_vl") checkpoint."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_lm.make_tokenizer(None, specials=SPECIALS, chars=CHARS)  # saved below
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    heads = 4
    head_dim = hidden // heads
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    if arch == "qwen3_vl":
        text.update(head_dim=head_dim, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=2,
                      out_hidden_size=hidden, patch_size=PATCH, spatial_merge_size=MERGE,
                      temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision,
                                            tie_word_embeddings=True, **tokens)
        cls = transformers.Qwen3VLForConditionalGeneration
    elif arch == "qwen2_5_vl":
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": [2, 1, 1]})
        vision = dict(depth=2, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=2,
                      out_hidden_size=hidden, patch_size=PATCH, spatial_merge_size=MERGE,
                      temporal_patch_size=2, window_size=2 * PATCH * MERGE,
                      fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                               tie_word_embeddings=False, **tokens)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    make_image_processor().save_pretrained(path)
    (path / "tiny_vl.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return path


def synthetic_image(width: int, height: int, seed: int = 0):
    """A random RGB PIL image (never blank: the vision tower sees real variation)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_image_dataset(root: Path, n: int = 6, *, seed: int = 0, name: str = "data.jsonl",
                       sizes=((32, 48), (48, 32), (32, 32))) -> Path:
    """A jsonl of "What is a + b? <image>" rows, each with one image file (paths relative to
    the jsonl), of varying sizes; answer a + b. Returns the jsonl path."""
    import random

    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        w, h = sizes[i % len(sizes)]
        rel = f"img/{i}.png"
        synthetic_image(w, h, seed=seed * 1000 + i).save(root / rel)
        lines.append({"prompt": f"<image>What is {a}+{b}? Answer in \\boxed{{}}.",
                      "answer": str(a + b), "images": [rel]})
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path
