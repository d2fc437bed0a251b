"""The trainer on a realistic tokenizer: byte-level BPE, a ChatML template with a system
prompt, two stop tokens (<|im_end|> and <|endoftext|>); what a user reads after a run
(samples.jsonl, eval_samples.jsonl, --help, summary.json, the export)."""

import json
import subprocess
import sys

import pytest

from bpe_model import build_bpe_chat_model
from train_cli import rows, step_rows, subprocess_env, train

SMALL = ("--prompts_per_step", "4", "--group_size", "4", "--max_new_tokens", "12",
         "--num_eval", "6", "--eval_every", "0", "--progress", "false", "--token_budget", "512",
         "--checkpoint_every", "0", "--lr", "1e-3")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return build_bpe_chat_model(tmp_path_factory.mktemp("bpe") / "model")


def test_bpe_chat_model_end_to_end(bpe, tmp_path):
    from transformers import AutoTokenizer

    from cepo.arithmetic import make_split
    from cepo.contexts import render_prompt

    tok = AutoTokenizer.from_pretrained(bpe, local_files_only=True)
    system = "Solve it step by step; put the final answer in \\boxed{}."
    lengths = sorted(len(render_prompt(tok, r["prompt"], system_prompt=system))
                     for r in make_split("train", 200, 0))
    limit = lengths[len(lengths) // 2]
    dropped = sum(n > limit for n in lengths)
    eval_kept = sum(len(render_prompt(tok, r["prompt"], system_prompt=system)) <= limit
                    for r in make_split("dev", 6, 0))
    assert 0 < eval_kept < 6
    out = tmp_path / "run"
    proc = train(out, bpe, *SMALL, "--steps", "2", "--num_train", "200", "--system_prompt",
                 system, "--max_prompt_tokens", str(limit), "--samples_every", "2",
                 "--samples_per_step", "5", "--reward_fn", "plugins_for_tests:digits_reward")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"dropped {dropped} of 200 training prompts longer than max_prompt_tokens={limit}" \
        in proc.stderr

    # the sampler's token log-probs, the stop token included, equal the trainer's
    steps = step_rows(out)
    assert sorted(steps) == [1, 2]
    for r in steps.values():
        assert r["logprob_diff_mean"] < 1e-5 and r["logprob_diff_max"] < 1e-4, r
        assert {"verifier_status_ok", "verifier_status_wrong", "update_skipped"} <= set(r)

    # samples.jsonl: every samples_every-th step, samples_per_step rows, readable fields
    samples = rows(out, "samples.jsonl")
    assert [s["step"] for s in samples] == [2] * 5
    for s in samples:
        assert set(s) == {"step", "prompt", "response", "extracted", "gold", "reward", "status",
                          "truncated", "advantage"}
        assert isinstance(s["response"], str) and s["gold"] and 0.0 <= s["reward"] <= 1.0
    evals = rows(out, "eval_samples.jsonl")
    assert sorted({e["step"] for e in evals}) == [0, 2] and len(evals) == 2 * eval_kept

    summary = json.loads((out / "summary.json").read_text())
    assert summary["peak_memory_gb"] > 0.1
    exported = json.loads((out / "export" / "tokenizer_config.json").read_text())
    assert "local_files_only" not in exported and "is_local" not in exported
    again = AutoTokenizer.from_pretrained(out / "export", local_files_only=True)
    assert again.apply_chat_template([{"role": "user", "content": "1+1"}], tokenize=False) == \
        tok.apply_chat_template([{"role": "user", "content": "1+1"}], tokenize=False)


def test_a_step_without_signal_says_the_update_was_skipped(bpe, tmp_path):
    proc = train(tmp_path / "flat", bpe, *SMALL, "--steps", "1", "--num_eval", "2",
                 "--reward_fn", "plugins_for_tests:constant_reward")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "update skipped" in proc.stderr
    assert "lr_scheduler.step()" not in proc.stderr  # PyTorch's warning is not shown instead
    assert step_rows(tmp_path / "flat")[1]["update_skipped"] == 1.0


def test_help_shows_every_options_text():
    proc = subprocess.run([sys.executable, "-m", "cepo.train", "--help"], capture_output=True,
                          text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for phrase in ("Initial lambda: weight of the token-level evidence",
                   "How the final answer is taken from a response",
                   "A system message put before every prompt",
                   "Drop prompts longer than this many tokens",
                   "Stop the run after this many consecutive steps"):
        assert phrase in text, phrase


def test_real_model_defaults_are_the_papers(tmp_path):
    """Without --model the tiny model's own settings apply; with one, the paper's."""
    from cepo.config import parse_config

    tiny = parse_config([])
    assert tiny.lr == 1e-4 and tiny.steps == 120 and tiny.max_new_tokens == 64
    real = parse_config(["--model", str(tmp_path)])
    assert real.lr == 5e-6 and real.steps == 50 and real.prompts_per_step == 32
    assert parse_config(["--model", str(tmp_path), "--lr", "1e-5"]).lr == 1e-5
    assert parse_config(["--steps", "3"]).lr == 1e-4  # flags still override the tiny config


def test_answer_extraction_options_are_the_verifiers():
    import typing

    from cepo.answers import ANSWER_EXTRACTION_MODES
    from cepo.config import TrainConfig

    hint = typing.get_type_hints(TrainConfig)["answer_extraction"]
    assert typing.get_args(hint) == ANSWER_EXTRACTION_MODES
