"""Vision-language policies (Qwen3-VL, Qwen2.5-VL): images in, the same fused head out.

Data: a prompt holds one ``<image>`` placeholder per image; ``prepare_example`` runs the
checkpoint's image processor on the row's images (``ImageInputs``: patches and the
[t, h, w] patch grid of each image) and replaces each placeholder by
``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>`` (n = the image's token
count), so everything downstream (chat template, hints, contexts, packing, token
budgets) works on plain token ids that already count the image tokens.

Model: ``encode_images`` runs the vision tower on a set of distinct images once
(-> per image its embeddings [n, H] and, for Qwen3-VL, its DeepStack features);
``packed_hidden_states`` runs the language model on one packed, padding-free row of
several sequences: token embeddings with the image embeddings scattered in at the
``<|image_pad|>`` positions, the model's own multimodal rotary positions computed per
sequence (``get_rope_index``: 3-D ids from each image's grid, restarting at every
sequence start) and the sequence boundaries given explicitly as for text models. The
fused LM head applies to its final hidden states unchanged.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

VL_MODEL_TYPES = ("qwen3_vl", "qwen2_5_vl")
IMAGE_PLACEHOLDER = "<image>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
DEFAULT_MAX_PIXELS = 1024 * 1024


def checkpoint_model_type(path: str) -> str | None:
    """``model_type`` of a local checkpoint's config.json (None when there is none)."""
    cfg = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg, encoding="utf-8") as f:
        return json.load(f).get("model_type")


def is_vl_checkpoint(path: str) -> bool:
    """True for a local Qwen3-VL / Qwen2.5-VL checkpoint directory."""
    return checkpoint_model_type(path) in VL_MODEL_TYPES


def is_vl_model(model: nn.Module) -> bool:
    """True for a loaded Qwen3-VL / Qwen2.5-VL model (or a peft wrapper of one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "model_type", None) in VL_MODEL_TYPES


# ----------------------------------------------------------------------------- images

def load_image(value, base_dir: str | None):
    """An RGB PIL image from a path (relative to ``base_dir``), raw bytes, a
    ``datasets.Image`` value (a PIL image, or a dict with "bytes" / "path") or a PIL
    image. Raises ValueError / FileNotFoundError saying what is wrong."""
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    else:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(value))
        elif isinstance(value, (str, os.PathLike)):
            source = os.fspath(value)
            if base_dir is not None and not os.path.isabs(source):
                source = os.path.join(base_dir, source)
            if not os.path.isfile(source):
                raise FileNotFoundError(f"image file {source!r} not found")
        else:
            raise ValueError(f"image of type {type(value).__name__} (expected a path, bytes, a "
                             "datasets.Image value or a PIL image)")
        try:
            image = Image.open(source)
            image.load()
        except Exception as e:  # truncated / not an image
            raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from None
    return image.convert("RGB") if image.mode != "RGB" else image


def check_row_images(prompt: str, images, base_dir: str | None, max_pixels: int) -> list:
    """The row's images as a list (validated), or ValueError with the reason: the number of
    ``<image>`` placeholders differs from the number of images, an image is missing or
    unreadable, or has more than ``max_pixels`` pixels."""
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count != len(images):
        raise ValueError(f"the prompt has {count} '{IMAGE_PLACEHOLDER}' placeholder(s) but "
                         f"{len(images)} image(s); put one '{IMAGE_PLACEHOLDER}' where each "
                         "image goes")
    for k, value in enumerate(images):
        try:
            image = load_image(value, base_dir)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"image {k}: {e}") from None
        w, h = image.size
        if w * h > max_pixels:
            raise ValueError(f"image {k} is {w}x{h} = {w * h} pixels, over the pixel budget "
                             f"max_pixels={max_pixels}; raise --max_pixels or downscale it")
    return list(images)


@dataclass
class ImageInputs:
    """The processed images of one prompt: ``pixel_values`` [P, D] (the patches of all its
    images, image after image), ``grid_thw`` [n, 3] long (each image's patch grid);
    ``key`` identifies the prompt (its data source), so equal keys share embeddings.
    ``images``: the images already resized to (w, h) = grid x patch size, which the
    processor keeps as they are: an engine that runs its own processor (vLLM) gets the
    very same patches from them."""

    key: str
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    images: list | None = None  # the images as RGB PIL, resized to their grids (for vLLM)

    @property
    def num_images(self) -> int:
        return int(self.grid_thw.shape[0])

    def token_counts(self, merge_size: int) -> list[int]:
        """Image tokens per image: t * h * w / merge_size^2."""
        return [int(n) for n in (self.grid_thw.prod(-1) // merge_size ** 2).tolist()]


class ImagePreparer:
    """Turns examples with ``<image>`` placeholders into model-ready ones: the image
    processor of the checkpoint (``AutoImageProcessor``, PIL backend when torchvision is
    absent), with ``min_pixels`` / ``max_pixels`` as its resize bounds."""

    def __init__(self, model_path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_pixels: int | None = None):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(model_path, local_files_only=True)
        size = dict(getattr(self.processor, "size", None) or {})
        size["longest_edge"] = int(max_pixels)
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        self.processor.size = size
        for attr, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels)):
            if value is not None and hasattr(self.processor, attr):
                setattr(self.processor, attr, int(value))
        self.merge_size = int(self.processor.merge_size)
        self.max_pixels = int(max_pixels)
        self.min_pixels = min_pixels

    def image_inputs(self, key: str, images: list) -> ImageInputs:
        """The processed images of one prompt (PIL images in, see ImageInputs)."""
        from PIL import Image

        out = self.processor(images=images, return_tensors="pt")
        grid = out["image_grid_thw"].long()
        patch = int(self.processor.patch_size)
        resized = [im.resize((int(w) * patch, int(h) * patch), Image.Resampling.BICUBIC)
                   for im, (_, h, w) in zip(images, grid.tolist())]
        return ImageInputs(key, out["pixel_values"].float(), grid, resized)

    def prepare(self, example, base_dir: str | None = None):
        """``example`` with its images processed (``example.vision``) and each placeholder
        expanded into the image's vision tokens; examples without images pass unchanged."""
        if not getattr(example, "images", None):
            return example
        if getattr(example, "vision", None) is not None:
            return example
        pil = [load_image(v, base_dir) for v in example.images]
        vision = self.image_inputs(example.source, pil)
        return replace(example, prompt=expand_placeholders(
            example.prompt, vision.token_counts(self.merge_size)), vision=vision)


def expand_placeholders(prompt: str, token_counts: list[int]) -> str:
    """Each ``<image>`` replaced by the vision tokens of its image (``token_counts`` in
    order); the number of placeholders must match."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(token_counts):
        raise ValueError(f"prompt has {len(parts) - 1} '{IMAGE_PLACEHOLDER}' placeholders for "
                         f"{len(token_counts)} images")
    out = parts[0]
    for n, rest in zip(token_counts, parts[1:]):
        out += VISION_START + IMAGE_PAD * n + VISION_END + rest
    return out


_EXPANDED = re.compile(re.escape(VISION_START) + f"(?:{re.escape(IMAGE_PAD)})*"
                       + re.escape(VISION_END))


def collapse_image_tokens(ids: list[int], image_token_id: int) -> list[int]:
    """Token ids with each run of ``<|image_pad|>`` ids cut to one: the prompt form an
    engine that expands placeholders itself (vLLM) takes, with the images alongside."""
    out: list[int] = []
    for t in ids:
        if t == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(t)
    return out


def display_prompt(prompt: str) -> str:
    """An expanded prompt with its vision tokens folded back into ``<image>`` (for logs)."""
    return _EXPANDED.sub(IMAGE_PLACEHOLDER, prompt)


def check_vision_tokens(tokenizer, config) -> None:
    """The tokenizer must spell the vision tokens as single ids matching the model's."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, IMAGE_PAD, VISION_END)}
    want = {VISION_START: config.vision_start_token_id, IMAGE_PAD: config.image_token_id,
            VISION_END: config.vision_end_token_id}
    bad = [t for t in ids if ids[t] != want[t]]
    if bad:
        raise ValueError(f"model: the tokenizer maps {bad[0]!r} to {ids[bad[0]]}, the model "
                         f"expects {want[bad[0]]}; use the checkpoint's own tokenizer")


# ----------------------------------------------------------------------------- the model

def vl_inner(base: nn.Module) -> nn.Module:
    """The ``Qwen*VLModel`` (vision tower ``.visual``, text model ``.language_model``)."""
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "visual") or not hasattr(inner, "language_model"):
        raise ValueError(f"model: {type(base).__name__} has no .model.visual / "
                         ".model.language_model (not a Qwen VL model)")
    return inner


def vision_tower(base: nn.Module) -> nn.Module:
    return vl_inner(base).visual


def dummy_image(base: nn.Module) -> ImageInputs:
    """The smallest image the tower takes (one merged token): used by a rank that has no
    image in a pass, so every rank runs the (sharded) vision tower equally often."""
    vc = vision_tower(base).config
    m = vc.spatial_merge_size
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    g = torch.Generator().manual_seed(0)
    return ImageInputs("__dummy__", torch.randn(m * m, dim, generator=g),
                       torch.tensor([[1, m, m]], dtype=torch.long))


Encoded = dict  # key -> list over the prompt's images of (embeds [n, H], [deepstack [n, H]])


def encode_images(base: nn.Module, images: list[ImageInputs]) -> Encoded:
    """Run the vision tower ONCE over the distinct images (by key) of ``images``.

    Returns key -> per image (embeddings [n_i, H], DeepStack features: a list of
    [n_i, H], empty for Qwen2.5-VL). ``images`` empty: the dummy image is encoded (and
    returned under its key) so collectives match across ranks."""
    distinct: dict[str, ImageInputs] = {}
    for im in images:
        if im is not None and im.key not in distinct:
            distinct[im.key] = im
    if not distinct:
        dummy = dummy_image(base)
        distinct[dummy.key] = dummy
    inner = vl_inner(base)
    device = inner.get_input_embeddings().weight.device
    pixels = torch.cat([im.pixel_values for im in distinct.values()]).to(device)
    grid = torch.cat([im.grid_thw for im in distinct.values()]).to(device)
    out = inner.get_image_features(pixels, grid, return_dict=True)
    embeds = list(out.pooler_output)                      # per image [n_i, H]
    deep = getattr(out, "deepstack_features", None) or []
    deep = [list(level) for level in deep]                # [levels][images] -> [n_i, H]
    result: Encoded = {}
    k = 0
    for key, im in distinct.items():
        per = []
        for _ in range(im.num_images):
            per.append((embeds[k], [level[k] for level in deep]))
            k += 1
        result[key] = per
    return result


def image_token_mask(base: nn.Module, ids: torch.Tensor, images: ImageInputs | None) -> torch.Tensor:
    """[L] bool: the positions of one sequence (``ids`` [L]) that hold its images' tokens:
    the first sum(token counts) ``<|image_pad|>`` ids. One a policy samples in its
    response is text (the sampler embeds it as a token, with text positions)."""
    mask = ids == vl_inner(base).config.image_token_id
    expected = sum(images.token_counts(vision_tower(base).config.spatial_merge_size)) if images else 0
    if int(mask.sum()) > expected:
        mask[mask.nonzero()[expected:, 0]] = False
    return mask


def mrope_positions(base: nn.Module, ids: torch.Tensor, images: ImageInputs | None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """[3, L] multimodal rotary position ids of one sequence (``ids`` [L]), from the
    model's own ``get_rope_index``; a sequence without images gets 0..L-1 on all three.
    mask: its image-token positions (``image_token_mask``, computed when not given)."""
    inner = vl_inner(base)
    mask = image_token_mask(base, ids, images) if mask is None else mask
    if images is None or not bool(mask.any()):
        return torch.arange(ids.numel(), device=ids.device).expand(3, -1)
    pos, _ = inner.get_rope_index(ids[None], mm_token_type_ids=mask.int()[None],
                                  image_grid_thw=images.grid_thw.to(ids.device))
    return pos[:, 0]


def packed_hidden_states(base: nn.Module, batch, seq_images: list[ImageInputs | None],
                         encoded: Encoded, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """[T, H] final hidden states of one packed row of a VL model (see the module doc).

    seq_images: the images of each packed sequence (None: text only), in pack order; a
    response segment of a shared-context batch (``batch.prefix_of``) carries its
    context's images, which only the context segment places;
    encoded: their embeddings (``encode_images``), by key. The image embeddings are
    scattered into the ``<|image_pad|>`` positions sequence by sequence, image by image.
    anchor: a scalar added times 0 to the input embeddings (a dummy image's output), so
    its backward runs where a real image's would: FSDP2's per-block reduce-scatters then
    come in the same order on every rank."""
    from cepo.model import run_packed

    if len(seq_images) != batch.num_sequences:
        raise ValueError(f"packed_hidden_states: {len(seq_images)} image entries for "
                         f"{batch.num_sequences} packed sequences")
    inner = vl_inner(base)
    lm = inner.language_model
    ids = batch.input_ids
    embeds = lm.get_input_embeddings()(ids)                      # [1, T, H]
    if anchor is not None:
        embeds = embeds + 0.0 * anchor
    rows, deep_rows, positions, masks = [], None, [], []
    starts = batch.cu_seqlens.tolist()
    prefix_of = batch.prefix_of or [-1] * batch.num_sequences
    for k, images in enumerate(seq_images):
        seq_ids = ids[0, starts[k]:starts[k + 1]]
        if prefix_of[k] >= 0:  # a response after its shared context (cepo.shared_context):
            # the positions of (context + response) from the model's own rope index, its
            # part of them; its images are the context's, placed there
            p = prefix_of[k]
            full = torch.cat([ids[0, starts[p]:starts[p + 1]], seq_ids])
            full_mask = image_token_mask(base, full, images)
            c = starts[p + 1] - starts[p]
            masks.append(full_mask[c:])
            positions.append(mrope_positions(base, full, images, full_mask)[:, c:])
            continue
        masks.append(image_token_mask(base, seq_ids, images))
        positions.append(mrope_positions(base, seq_ids, images, masks[-1]))
        if images is None:
            continue
        for emb, deep in encoded[images.key]:
            rows.append(emb)
            if deep:
                deep_rows = deep_rows or [[] for _ in deep]
                for level, d in enumerate(deep):
                    deep_rows[level].append(d)
    image_mask = torch.cat(masks)                                # [T]
    n_image_tokens = int(image_mask.sum())
    n_rows = sum(int(r.shape[0]) for r in rows)
    if n_rows != n_image_tokens:
        raise ValueError(f"packed_hidden_states: the row has {n_image_tokens} image tokens but "
                         f"its images give {n_rows} embeddings (a context lost or gained "
                         "image tokens?)")
    extra = {}
    if rows:
        image_embeds = torch.cat(rows).to(embeds.dtype)
        embeds = embeds.masked_scatter(image_mask[None, :, None].expand_as(embeds), image_embeds)
        if deep_rows is not None:
            extra = dict(visual_pos_masks=image_mask[None],
                         deepstack_visual_embeds=[torch.cat(d).to(embeds.dtype)
                                                  for d in deep_rows])
    mrope = torch.cat(positions, dim=1)[:, None]                # [3, 1, T]
    position_ids = torch.cat([batch.position_ids[None], mrope])  # [4, 1, T]: text row first
    out = run_packed(lm, batch, inputs_embeds=embeds, position_ids=position_ids, **extra)
    return out.last_hidden_state[0]


def language_lora_targets(names: list[str]) -> str:
    """A peft ``target_modules`` regex matching the given projection names inside the
    language model only (the vision tower has modules of the same names)."""
    alternatives = "|".join(re.escape(n) for n in names)
    return rf".*language_model\..*\.({alternatives})"
