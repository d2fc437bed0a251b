"""Prompt/answer datasets: JSONL, Parquet, saved Hugging Face datasets, or a dataset name.

Every bad row is reported with where it came from (file and line, or dataset index) and
which field is missing, then skipped or turned into an error (``on_bad_row``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One prompt with its ground-truth answer; ``source`` says where it came from."""

    prompt: str
    answer: str
    source: str
    solution: str | None = None  # a worked reference solution, when the data has one (opsd)
    images: list | None = None   # multimodal rows: the validated image values (paths absolute)
    vision: object = None        # set by cepo.vision.ImagePreparer: the processed images


def _field(row: dict, name: str):
    value = row
    for part in name.split("."):  # dotted paths reach into nested dicts
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _rows(path: str, split: str):
    """(source, row-or-error) pairs from a file, a saved dataset dir, or a dataset name."""
    if os.path.isfile(path):
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{line_no}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield where, f"malformed JSON ({e.msg})"
                        continue
                    yield where, row if isinstance(row, dict) else "not a JSON object"
            return
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            for i, row in enumerate(pq.read_table(path).to_pylist()):
                yield f"{path}[row {i}]", row
            return
        raise ValueError(f"data: cannot read {path!r}: unknown extension (use .jsonl, .json, "
                         ".parquet, or a directory saved with datasets.save_to_disk)")
    import datasets
    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"data: {path!r} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
        name = path
    else:
        if os.sep in path or path.startswith("."):
            raise FileNotFoundError(f"data: no file or directory at {path!r}")
        try:
            ds = datasets.load_dataset(path, split=split)
        except Exception as e:
            raise ValueError(f"data: could not load Hugging Face dataset {path!r} (split {split!r}): "
                             f"{e}. Offline machines need a local file or a saved dataset dir") from e
        name = path
    for i, row in enumerate(ds):
        yield f"{name}[{i}]", row


def _absolute(value, base_dir: str | None):
    if isinstance(value, str) and base_dir is not None and not os.path.isabs(value):
        return os.path.join(base_dir, value)
    return value


def load_examples(path_or_name: str, *, prompt_field: str = "prompt", answer_field: str = "answer",
                  split: str = "train", on_bad_row: str = "skip",
                  solution_field: str | None = None, image_field: str | None = None,
                  max_pixels: int | None = None) -> list[Example]:
    """Load {prompt, answer} examples; bad rows are skipped with a warning or raise.

    solution_field: read into ``Example.solution`` where a row has a non-empty one (opsd).
    image_field (multimodal policies): the field holding each row's images (a list, or
    one value): paths relative to the data file (or saved dataset dir), raw bytes or
    ``datasets.Image`` values; the prompt holds one ``<image>`` per image. A row whose
    placeholders do not match its images, with a missing or unreadable image, or an
    image over ``max_pixels`` pixels is a bad row (cepo.vision.check_row_images)."""
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    examples, bad = [], []
    for where, row in _rows(path_or_name, split):
        if isinstance(row, str):
            bad.append(f"{where}: {row}")
            continue
        prompt, answer = _field(row, prompt_field), _field(row, answer_field)
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            bad.append(f"{where}: missing or empty field '{prompt_field}'")
            continue
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            bad.append(f"{where}: missing or empty field '{answer_field}'")
            continue
        solution = _field(row, solution_field) if solution_field else None
        solution = str(solution).strip() if solution is not None and str(solution).strip() else None
        images = None
        if image_field is not None:
            from cepo.vision import DEFAULT_MAX_PIXELS, check_row_images

            base_dir = (os.path.dirname(os.path.abspath(path_or_name))
                        if os.path.isfile(path_or_name) else
                        os.path.abspath(path_or_name) if os.path.isdir(path_or_name) else None)
            try:
                images = check_row_images(str(prompt), _field(row, image_field), base_dir,
                                          max_pixels or DEFAULT_MAX_PIXELS)
            except ValueError as e:
                bad.append(f"{where}: field '{image_field}': {e}")
                continue
            images = [_absolute(v, base_dir) for v in images]
        examples.append(Example(str(prompt), str(answer).strip(), where, solution=solution,
                                images=images))
    if bad:
        listing = "\n  ".join(bad[:5]) + (f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        if on_bad_row == "error":
            raise ValueError(f"data: {len(bad)} bad row(s) in {path_or_name!r}:\n  {listing}\n"
                             "fix them, or pass --on_bad_row skip")
        log.warning("data: skipped %d bad row(s) in %s:\n  %s", len(bad), path_or_name, listing)
    if not examples:
        raise ValueError(f"data: no usable rows in {path_or_name!r} (fields '{prompt_field}', "
                         f"'{answer_field}'); set --prompt_field / --answer_field")
    return examples


def step_prompts(train: list[Example], step: int, *, prompts_per_step: int, seed: int,
                 rank: int, world_size: int) -> tuple[list[Example], list[int]]:
    """This rank's prompts for a step and their sampling seeds.

    The data stream is a seeded permutation per epoch; step s takes positions
    [s P, (s + 1) P), so a resumed run continues exactly. Rank r takes every world-th
    prompt; each prompt's seed depends on its global position only, so the samples do
    not depend on the number of ranks.
    """
    import random

    start = step * prompts_per_step
    picked, seeds = [], []
    orders: dict[int, list[int]] = {}
    for pos in range(start + rank, start + prompts_per_step, world_size):
        epoch, i = divmod(pos, len(train))
        if epoch not in orders:
            order = list(range(len(train)))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            orders[epoch] = order
        picked.append(train[orders[epoch][i]])
        seeds.append((seed * 1_000_003 + pos) % 2**31)
    return picked, seeds
