"""The trainer end to end, through torchrun, on a tiny random model (CPU, gloo, FSDP2)."""

import json
from pathlib import Path

import pytest
import torch

from launch import torchrun
from tiny_lm import make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def run_train(out: Path, model: Path, *args: str, nproc: int = 1, check: bool = True):
    """Run ``torchrun -m cepo.train`` with small settings; returns the CompletedProcess."""
    return torchrun(["-m", "cepo.train", "--model", str(model), "--output_dir", str(out),
                     "--prompts_per_step", "4", "--group_size", "4", "--max_new_tokens", "10",
                     "--num_eval", "4", "--eval_every", "0", "--checkpoint_every", "0",
                     "--reward_fn", "plugins_for_tests:digits_reward", "--progress", "false",
                     "--steps", "2", *args], nproc=nproc, check=check)


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("algo", ["grpo", "rlsd", "cepo"])
def test_two_processes_match_one(tiny, tmp_path, algo):
    """Same global batch: the 2-process FSDP2 run gives the 1-process losses."""
    run_train(tmp_path / "one", tiny, "--algo", algo)
    run_train(tmp_path / "two", tiny, "--algo", algo, nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == 2 and any(abs(x) > 1e-6 for x in one)  # something was trained
    assert one == pytest.approx(two, rel=1e-4, abs=1e-7)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    for name in ("metrics.jsonl", "training_curves.png", "config.json", "export/model.safetensors"):
        assert (tmp_path / "two" / name).exists(), name
    rows = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in rows if "loss" in r][0]
    for key in ("reward_mean", "accuracy", "response_length", "clip_frac_low", "clip_frac_high",
                "entropy", "lambda", "skipped_rollouts", "verifier_timeouts", "tokens_per_second",
                "time_generate", "time_score", "time_teacher", "time_update", "peak_memory_gb"):
        assert key in step, key
    # the sampler's token log-probs equal the trainer's at every step (fp32 HF engine):
    # the weights were synced after each update (a missed sync shows ~1e-3 here)
    for out in ("one", "two"):
        for r in (json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text()
                  .splitlines()):
            if "loss" in r:
                assert r["logprob_diff_mean"] < 1e-5 and r["logprob_diff_max"] < 1e-4, (out, r)
    if algo != "grpo":
        assert "delta_abs_wrong" in step and "weight_clipped_frac" in step
        assert step["lambda"] == 0.5
    else:
        assert step["lambda"] == 0.0


def test_resume_continues_exactly(tiny, tmp_path):
    """4 steps straight == 2 steps, a crash (last checkpoint lost), resume, 2 more steps."""
    args = ("--steps", "4", "--checkpoint_every", "2")
    run_train(tmp_path / "a", tiny, *args)
    run_train(tmp_path / "b", tiny, *args)
    import shutil
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000004")
    shutil.rmtree(tmp_path / "b" / "export")
    run_train(tmp_path / "b", tiny, *args, "--resume", "true")
    from safetensors.torch import load_file
    a = load_file(tmp_path / "a" / "export" / "model.safetensors")
    b = load_file(tmp_path / "b" / "export" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-6)


def test_lora_kl_and_mini_batches_two_processes(tiny, tmp_path):
    """LoRA under FSDP2 with activation checkpointing, a KL reference and two mini-batches;
    the export is merged."""
    run_train(tmp_path / "lora", tiny, "--lora_rank", "4", "--lora_alpha", "8",
              "--lora_target_modules", "[q_proj,v_proj]", "--kl_coef", "0.1",
              "--mini_batches", "2", "--lr", "0.01", "--gradient_checkpointing", "true", nproc=2)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "export")
    assert not any("lora" in n for n, _ in model.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny)
    q = "model.layers.0.self_attn.q_proj.weight"
    moved = (model.state_dict()[q] - base.state_dict()[q]).abs().max()
    assert moved > 0  # the adapter was trained and merged
    rows = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("approx_kl", 0) != 0 or r.get("ratio_mean", 1) != 1 for r in rows if "loss" in r)
    # merged LoRA weights reach the sampler: its log-probs match the trainer's old log-probs
    assert all(r["logprob_diff_mean"] < 1e-5 for r in rows if "loss" in r)


def test_hanging_reward_function_does_not_stall(tiny, tmp_path):
    run_train(tmp_path / "hang", tiny, "--reward_fn", "plugins_for_tests:hang_sometimes",
              "--verifier_timeout", "0.5", "--steps", "1")
    rows = [json.loads(x) for x in (tmp_path / "hang" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("verifier_timeouts", 0) for r in rows) > 0


def test_bad_inputs_give_clear_errors(tiny, tmp_path):
    proc = run_train(tmp_path / "x", tiny, "--no_such_option", "1", check=False)
    assert proc.returncode != 0 and "no_such_option" in proc.stderr
    proc = run_train(tmp_path / "x", tmp_path / "missing-model", check=False)
    assert proc.returncode != 0 and "missing-model" in proc.stderr
    proc = run_train(tmp_path / "x", tiny, "--cpu_offload", "true", check=False)
    assert proc.returncode != 0 and "'cpu_offload'" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    proc = run_train(tmp_path / "x", tiny, "--train_data", str(bad), "--on_bad_row", "error",
                     check=False)
    assert proc.returncode != 0 and "bad.jsonl:2" in proc.stderr and "'answer'" in proc.stderr
