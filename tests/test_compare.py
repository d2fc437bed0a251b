"""python -m cepo.compare: the summary and table on synthetic runs, option checks, and one
end-to-end run on a tiny budget (2 algorithms x 2 seeds x 1 step)."""

import json
import os
import subprocess
import sys

import pytest

from cepo import compare
from cepo.arithmetic import split_of


def _raw(finals: dict, base: float = 0.4) -> list[dict]:
    """Metrics rows: an evaluation at step 0 (base) and one at the end, per (algo, seed)."""
    rows = []
    for (algo, seed), acc in finals.items():
        rows.append({"algo": algo, "seed": seed, "step": 0, "eval_accuracy": base,
                     "eval_mean_at_k": base / 2})
        rows.append({"algo": algo, "seed": seed, "step": 1, "loss": 0.1})
        rows.append({"algo": algo, "seed": seed, "step": 2, "eval_accuracy": acc,
                     "eval_mean_at_k": acc / 2})
    return rows


def test_summary_pairs_by_seed_and_table_shows_it():
    finals = {("grpo", 10): 0.52, ("grpo", 11): 0.53, ("grpo", 12): 0.53,
              ("cepo", 10): 0.53, ("cepo", 11): 0.5425, ("cepo", 12): 0.515}
    summaries = {job: {"wall_seconds": 100.0 + 10 * (job[0] == "cepo") + job[1] - 10}
                 for job in finals}
    result = compare.summarise(_raw(finals), summaries, ["grpo", "cepo"], [10, 11, 12], "cepo")
    assert result["methods"]["cepo"]["per_seed"] == [0.53, 0.5425, 0.515]
    assert result["methods"]["grpo"]["wall_seconds"]["mean"] == pytest.approx(101.0)
    assert result["methods"]["cepo"]["wall_seconds"]["mean"] == pytest.approx(111.0)
    assert result["base"]["mean"] == pytest.approx(0.4)
    p = result["paired"]["cepo - grpo"]["eval_accuracy"]
    assert p["per_seed"] == pytest.approx([0.01, 0.0125, -0.015])
    assert (p["ci_low"], p["ci_high"]) == pytest.approx((-0.035276, 0.040276), abs=1e-6)
    k = result["paired"]["cepo - grpo"]["eval_mean_at_k"]
    assert k["mean"] == pytest.approx(0.00125)
    result["config"] = {"seeds": [10, 11, 12], "k": 4, "eval_split": "test", "eval_data": None,
                        "eval_problems": 400, "jobs": 1, "wall_seconds": 600,
                        "extra_trainer_args": [], "command": "python -m cepo.compare"}
    result["token_credit"] = {}
    md = compare.table(result)
    assert "400 problems of the built-in task's **test** split" in md
    assert "| cepo | 0.530 | 0.542 | 0.515 | 0.529 ± 0.014 | 0.265 ± 0.007 | 111 ± 1 |" in md
    assert "| cepo - grpo | +1.00 | +1.25 | -1.50 | +0.25 | 1.52 | [-3.53, +4.03] |" in md
    assert "2 degrees of freedom" in md


def test_no_treatment_no_pairs_and_one_seed_has_no_interval():
    finals = {("grpo", 0): 0.5, ("rlsd", 0): 0.6}
    summaries = {job: {"wall_seconds": 1.0} for job in finals}
    assert compare.summarise(_raw(finals), summaries, ["grpo", "rlsd"], [0], "cepo")["paired"] == {}
    one = compare.summarise(_raw(finals), summaries, ["grpo", "rlsd"], [0], "rlsd")
    assert one["paired"]["rlsd - grpo"]["eval_accuracy"]["ci_low"] is None


def test_missing_evaluation_is_a_clear_error():
    raw = [{"algo": "grpo", "seed": 0, "step": 1, "loss": 0.1}]
    with pytest.raises(ValueError, match="grpo seed 0 has no 'eval_accuracy'"):
        compare.summarise(raw, {("grpo", 0): {"wall_seconds": 1}}, ["grpo"], [0], "cepo")


def test_algos_are_the_trainers(capsys):
    assert set(compare.DEFAULT_ALGOS) <= set(compare.trainer_algos())
    with pytest.raises(SystemExit):
        compare._parse(["--algos", "grpo", "nosuchalgo"])
    err = capsys.readouterr().err
    assert "'nosuchalgo' not accepted by the trainer's --algo" in err and "grpo" in err
    args, extra = compare._parse(["--algos", *compare.trainer_algos(), "--", "--steps", "3"])
    assert args.algos == list(compare.trainer_algos()) and extra == ["--steps", "3"]
    assert args.eval_split == "test" and args.seeds == [10, 11, 12, 13, 14] and args.jobs == 1
    with pytest.raises(SystemExit):
        compare._parse(["--seeds", "1", "1"])
    for option, own in (("--algo", "--algos"), ("--seed=3", "--seeds"), ("--eval_every", "--eval_every"),
                        ("--output_dir", "--out")):
        with pytest.raises(SystemExit):
            compare._parse(["--", "--steps", "3", option, "1"])
        err = capsys.readouterr().err
        assert f"trainer option {option.split('=')[0]} after '--'" in err and f"use {own}" in err


def test_end_to_end_tiny_budget(tmp_path):
    """Two algorithms x two seeds x one step on the shipped tiny model, evaluated on the test
    split: the table, the paired row with its interval, the wall times, the credit map."""
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "cepo.compare", "--algos", "grpo", "cepo", "--seeds", "3", "4",
           "--k", "1", "--eval_every", "0", "--jobs", "2", "--out", str(out), "--",
           "--steps", "1", "--num_eval", "4", "--prompts_per_step", "2", "--group_size", "4",
           "--num_train", "20", "--max_new_tokens", "40", "--samples_every", "0",
           "--verifier_workers", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "comparison.json").read_text())
    assert set(result["methods"]) == {"grpo", "cepo"}
    for algo in ("grpo", "cepo"):
        assert len(result["methods"][algo]["per_seed"]) == 2
        assert result["methods"][algo]["wall_seconds"]["mean"] > 0
    pair = result["paired"]["cepo - grpo"]["eval_accuracy"]
    assert pair["ci_low"] is not None and pair["ci_low"] <= pair["mean"] <= pair["ci_high"]
    md = (out / "comparison.md").read_text()
    assert "| cepo - grpo |" in md and "**test** split" in md and "| seed 3 | seed 4 |" in md
    assert result["config"]["eval_split"] == "test"
    for name in ("credit_map.html", "curve_eval_accuracy.png", "raw.jsonl"):
        assert (out / name).exists(), name
    # the runs evaluated on the test split
    prompts = [json.loads(x)["prompt"] for x in
               (out / "runs" / "grpo-seed3" / "eval_samples.jsonl").read_text().splitlines()]
    assert len(prompts) >= 4 and {split_of(p) for p in prompts} == {"test"}


def test_compare_reports_on_test_and_sweep_chooses_on_dev(tmp_path, monkeypatch):
    """The trainer commands: compare passes --eval_split test (trainer options after -- can
    still override it), the sweep --eval_split dev."""
    from cepo import sweep

    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd))
    args, extra = compare._parse(["--algos", "grpo", "--", "--steps", "2"])
    compare._run("grpo", 10, tmp_path / "a", args, extra, threads=1)
    cmd = seen.pop()
    assert cmd[cmd.index("--eval_split") + 1] == "test" and cmd[-2:] == ["--steps", "2"]
    assert cmd[cmd.index("--dump_evidence") + 1] == "false"
    compare._run("cepo", 10, tmp_path / "b", args, extra, threads=1)
    assert seen.pop()[cmd.index("--dump_evidence") + 1] == "true"
    sweep._run(tmp_path / "c", ["--algo", "cepo"], 0, 10, [])
    cmd = seen.pop()
    assert cmd[cmd.index("--eval_split") + 1] == "dev"


def test_a_failed_run_stops_the_comparison():
    """The runs not yet started are cancelled and the error names the failed run."""
    started = []

    def run_one(algo, seed):
        started.append((algo, seed))
        if (algo, seed) == ("cepo", 1):
            raise subprocess.CalledProcessError(1, "torchrun")
        return f"{algo}-{seed}"

    jobs = [(a, s) for s in (1, 2, 3) for a in ("grpo", "cepo")]
    with pytest.raises(RuntimeError, match="the cepo run with seed 1 failed"):
        compare.run_all(jobs, run_one, parallel=1)
    assert started == [("grpo", 1), ("cepo", 1)]
    assert compare.run_all(jobs[:1], run_one, 1) == {("grpo", 1): "grpo-1"}
