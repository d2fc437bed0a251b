"""Crash safety, the hard way: SIGKILL in the middle of a step, a half-written metrics line,
a checkpoint cut off mid-write, a second run on a live run's directory, non-finite updates."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_cli
from train_cli import free_port, rows, step_rows, subprocess_env
from tiny_lm import make_tiny_model_dir
COMMON = ("--prompts_per_step", "4", "--group_size", "4", "--max_new_tokens", "10",
          "--num_eval", "4", "--eval_every", "0", "--progress", "false", "--samples_every", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def train(out: Path, model: Path, *args: str, env: dict | None = None):
    return train_cli.train(out, model, *COMMON, *args, env=env)


def test_sigkill_mid_step_then_resume_loses_nothing(tiny, tmp_path):
    args = ("--steps", "5", "--checkpoint_every", "2", "--reward_fn",
            "plugins_for_tests:kill_trainer_once")
    whole = train(tmp_path / "whole", tiny, *args)
    assert whole.returncode == 0, whole.stderr[-3000:]

    armed = tmp_path / "kill"
    # 4 greedy evaluations, then 16 scores per step: call 4 + 16 * 2 + 7 is inside step 3
    armed.write_text(str(4 + 16 * 2 + 7))
    killed = train(tmp_path / "b", tiny, *args, env={"CEPO_TEST_KILL": str(armed)})
    assert killed.returncode != 0 and not armed.exists()  # killed by the plugin
    out = tmp_path / "b"
    assert max(step_rows(out)) == 2  # steps 1-2 logged; step 3 was cut short
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.12')  # a line half written when the process died
    cut = out / "checkpoints" / "step_000004.tmp"  # a checkpoint cut off mid-write
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(b"\x00" * 10)

    resumed = train(out, tiny, *args, "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = step_rows(tmp_path / "whole"), step_rows(out)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]  # no step lost, none twice
    for step in a:
        for key in ("loss", "reward_mean", "accuracy", "trained_tokens", "response_length"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-6, abs=1e-9), (step, key)
    prompts = lambda o: [(r["step"], r["prompt"], r["response"]) for r in rows(o, "samples.jsonl")]  # noqa: E731
    assert prompts(tmp_path / "whole") == prompts(out)  # same data order, same samples


def test_a_live_runs_directory_is_locked(tiny, tmp_path):
    out = tmp_path / "live"
    holder = subprocess.Popen(
        [sys.executable, "-c", train_cli.HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = train(out, tiny, "--steps", "1")
        assert second.returncode != 0 and f"PID {holder.pid}" in second.stderr
        assert not (out / "metrics.jsonl").exists()  # it wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_non_finite_updates_are_skipped_then_stop_the_run(tiny, tmp_path):
    proc = train(tmp_path / "nan", tiny, "--steps", "6", "--max_bad_steps", "2",
                 "--reward_fn", "plugins_for_tests:nan_reward", "--checkpoint_every", "0")
    assert proc.returncode != 0 and "max_bad_steps=2" in proc.stderr
    logged = step_rows(tmp_path / "nan")
    assert sorted(logged) == [1]  # step 2 stopped the run before it was logged
    assert logged[1]["nonfinite_update"] == 1.0
    assert "optimizer step skipped" in proc.stderr


def test_worker_stops_when_its_launcher_is_killed(tiny, tmp_path):
    """torchrun's workers live in a session of their own: SIGKILL on the launcher leaves
    them running. The worker notices (re-parented) and stops at the next step boundary."""
    import signal
    import time

    out = tmp_path / "orphan"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--master_port", str(free_port()), "-m", "cepo.train", "--model", str(tiny), "--output_dir",
           str(out), *COMMON, "--steps", "200", "--checkpoint_every", "0", "--reward_fn",
           "plugins_for_tests:digits_reward"]
    launcher = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() or not step_rows(out):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()
        time.sleep(0.5)
    worker = int((out / ".lock").read_text())
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the orphaned worker kept training after its launcher was killed")
    assert max(step_rows(out)) < 200
