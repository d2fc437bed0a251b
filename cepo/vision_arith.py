"""The built-in arithmetic task in image form: the expression is drawn, the text asks for it.

Each row is a problem of ``cepo.arithmetic`` (same split, same seed, same answer and
worked solution) whose expression is rendered into a small RGB image; the prompt is
``"<image>Compute the value of the expression in the image."`` with one ``<image>``
placeholder for the one image. The rendering is deterministic and needs no download: the
PIL default bitmap font (6 x 11 pixel glyphs), black on white, each character scaled 2x
(nearest) and centred in its own 32 x 32 cell, so that a character is exactly one merged
vision token of a Qwen-VL model (patch 16, spatial merge 2). An expression of n characters
is an image of 32 x 32n pixels (5 to 11 characters: 160 to 352 pixels wide).

    python -m cepo.vision_arith --split train --n 2000 --out data/vl-train.jsonl

writes the rows as JSONL with the images as PNG files beside it (``images`` holds paths
relative to the JSONL file), the layout users have for Geometry3K-style data.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os

from PIL import Image, ImageDraw, ImageFont

from cepo import arithmetic

BUILTIN_TASK = "builtin:vision_arithmetic"
IMAGE_PLACEHOLDER = "<image>"
QUESTION = "Compute the value of the expression in the image."
PROMPT = IMAGE_PLACEHOLDER + QUESTION
CELL = 32  # pixels per character cell: one 2x2 group of 16-pixel patches
SCALE = 2  # glyph magnification (nearest neighbour)
CHARSET = "0123456789+-*() "


@functools.lru_cache(maxsize=None)
def _glyph(ch: str) -> Image.Image:
    """One character in its CELL x CELL grey-level cell (cached: the cells never change)."""
    font = ImageFont.load_default_imagefont()  # the built-in bitmap font, no file needed
    left, top, right, bottom = font.getbbox(ch)
    small = Image.new("L", (right - left, bottom - top), 255)
    ImageDraw.Draw(small).text((-left, -top), ch, font=font, fill=0)
    big = small.resize((small.width * SCALE, small.height * SCALE), Image.NEAREST)
    cell = Image.new("L", (CELL, CELL), 255)
    cell.paste(big, ((CELL - big.width) // 2, (CELL - big.height) // 2))
    return cell


def render_expression(expr: str) -> Image.Image:
    """The RGB image of ``expr``: height 32, width 32 * len(expr), one character per cell."""
    if not isinstance(expr, str) or not expr:
        raise ValueError(f"render_expression: expr must be a non-empty string, got {expr!r}")
    bad = sorted(set(expr) - set(CHARSET))
    if bad:
        raise ValueError(f"render_expression: characters {bad} are not drawable (allowed: {CHARSET!r})")
    image = Image.new("L", (CELL * len(expr), CELL), 255)
    for i, ch in enumerate(expr):
        image.paste(_glyph(ch), (CELL * i, 0))
    return image.convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG bytes (deterministic: no metadata, fixed compression)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def make_split(split: str, n: int, seed: int) -> list[dict]:
    """n rows of one split: ``cepo.arithmetic.make_split`` with the expression as an image.

    Each row: ``prompt`` (``"<image>Compute the value..."``), ``answer`` and ``solution``
    (those of the text task), ``expression`` (the text drawn) and ``images`` (a list of
    one PIL RGB image).
    """
    rows = []
    for r in arithmetic.make_split(split, n, seed):
        rows.append({"prompt": PROMPT, "answer": r["answer"], "solution": r["solution"],
                     "expression": r["prompt"], "images": [render_expression(r["prompt"])]})
    return rows


def examples(split: str, n: int, seed: int) -> list:
    """The rows of ``make_split`` as the trainer's ``cepo.data.Example`` (images: one PIL
    image each), for ``--train_data builtin:vision_arithmetic``."""
    from cepo.data import Example

    return [Example(r["prompt"], r["answer"], f"vision-arithmetic-{split}[{i}]", images=r["images"])
            for i, r in enumerate(make_split(split, n, seed))]


def write_jsonl(rows: list[dict], path: str) -> str:
    """Write rows to ``path`` (JSONL) with their images as PNG files in ``<stem>_images/``
    beside it; ``images`` holds paths relative to the JSONL file. Returns ``path``."""
    base = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    image_dir = f"{stem}_images"
    os.makedirs(os.path.join(base, image_dir), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            names = []
            for j, image in enumerate(row["images"]):
                name = f"{image_dir}/{i:06d}_{j}.png"
                with open(os.path.join(base, name), "wb") as g:
                    g.write(png_bytes(image))
                names.append(name)
            out = {k: v for k, v in row.items() if k != "images"}
            out["images"] = names
            f.write(json.dumps(out) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=arithmetic.SPLITS, default="train")
    ap.add_argument("--n", type=int, default=2000, help="number of problems")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="the JSONL file to write (images go beside it)")
    args = ap.parse_args(argv)
    write_jsonl(make_split(args.split, args.n, args.seed), args.out)
    print(f"wrote {args.n} {args.split} rows to {args.out}")


if __name__ == "__main__":
    main()
