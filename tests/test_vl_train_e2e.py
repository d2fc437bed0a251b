"""The trainer end to end on tiny random vision-language models (Qwen3-VL, Qwen2.5-VL) with
an image dataset: torchrun, 1 and 2 processes (FSDP2 shards vision and decoder blocks),
full fine-tuning and LoRA, then the export reloaded with AutoModelForImageTextToText."""

import json
from pathlib import Path

import pytest
import torch

from launch import torchrun
from vl_model import make_image_dataset, make_tiny_vl_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_dataset(tmp_path_factory.mktemp("vl_data"), n=6)


def run_train(out: Path, model: Path, data: Path, *args: str, nproc: int = 1):
    return torchrun(["-m", "cepo.train", "--model", str(model), "--output_dir", str(out),
                     "--train_data", str(data), "--eval_data", str(data),
                     "--prompts_per_step", "2", "--group_size", "4", "--max_new_tokens", "8",
                     "--num_eval", "2", "--eval_every", "0", "--checkpoint_every", "0",
                     "--reward_fn", "plugins_for_tests:digits_reward", "--progress", "false",
                     "--token_budget", "96", "--lr", "1e-3", "--steps", "2", *args],
                    nproc=nproc)


def step_rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def check_run_and_export(out: Path, model_dir: Path, lora: bool, vision: bool) -> None:
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    steps = step_rows(out)
    assert len(steps) == 2 and any(abs(r["loss"]) > 1e-6 for r in steps)
    for r in steps:  # the sync check: sampler (pixels, padded batch) == trainer (packed)
        assert r["logprob_diff_max"] < 1e-4, r
    samples = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].startswith("<image>What is") for s in samples)
    export = out / "export"
    reloaded = AutoModelForImageTextToText.from_pretrained(export, local_files_only=True)
    initial = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True)
    assert type(reloaded) is type(initial)
    assert AutoImageProcessor.from_pretrained(export).size["longest_edge"] == 1048576
    names = load_file(str(export / "model.safetensors")).keys()
    assert not any("lora" in n for n in names)
    new, old = reloaded.state_dict(), initial.state_dict()
    changed = [k for k in old if not torch.equal(new[k], old[k])]
    assert any("language_model.layers" in k for k in changed)
    # the tower is frozen unless --train_vision
    assert any(".visual." in f".{k}" for k in changed) == vision
    if lora:  # LoRA adapts the attention / MLP projections only
        assert all(k.endswith("proj.weight") for k in changed), changed


@pytest.mark.parametrize("arch,lora,algo,vision", [("qwen3_vl", False, "cepo", False),
                                                   ("qwen2_5_vl", True, "rlsd", False),
                                                   ("qwen3_vl", False, "grpo", True)])
def test_vl_one_and_two_processes(tmp_path, data, arch, lora, algo, vision):
    """Same global batch, 1 vs 2 processes: equal losses (one mini-batch); both export a
    loadable model. With 2 mini-batches the update passes reuse the step's embeddings.
    --train_vision runs the tower per micro-batch with gradients (a rank without images
    runs a dummy one, in the same backward order)."""
    model = make_tiny_vl_dir(tmp_path / "model", arch=arch)
    extra = ["--algo", algo] + (["--lora_rank", "4", "--lora_alpha", "8"] if lora else [])
    extra += ["--train_vision", "true"] if vision else []
    extra += ["--mini_batches", "2"] if lora else []  # later passes reuse the step's embeddings
    run_train(tmp_path / "one", model, data, *extra)
    run_train(tmp_path / "two", model, data, *extra, nproc=2)
    one, two = step_rows(tmp_path / "one"), step_rows(tmp_path / "two")
    if not lora:  # mini-batches are cut from each rank's items: 1 vs 2 processes differ
        assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], rel=1e-4,
                                                           abs=1e-7)
    for out in ("one", "two"):
        check_run_and_export(tmp_path / out, model, lora, vision)
