"""``python -m cepo.sweep``: why does (or doesn't) CEPO beat GRPO here? One-factor sweeps.

Trains GRPO and CEPO at their defaults, then CEPO with one setting changed at a time
(hint template, wrong-answer strategy, lambda0, T_warm / schedule, eps_w, training-task
difficulty; GRPO too where the change applies to it), every variant over the same seeds
(default 2: the sweep is 12 variants; more with --seeds) and the same fixed held-out set,
and writes under ``--out`` (default
results/sweep/): sweep.json (per variant: final greedy accuracy mean, std, per seed, and
the curve), sweep.md (a table, in the order run) and raw.jsonl (every metrics row,
labelled with its variant and seed). Extra
trainer options after ``--`` go to every run (e.g. ``-- --steps 30``).

The evaluation set is never changed: "harder task" changes the training prompts only.
Settings are chosen here, so every run evaluates on the built-in task's dev split
(``--eval_split dev``); ``python -m cepo.compare`` reports on the test split, which no
sweep looks at.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cepo.contexts import NATURAL_HINT_TEMPLATE
from cepo.distributed import free_port

HARD_TRAIN = "train_3ops.jsonl"

VARIANTS: dict[str, list[str]] = {
    "grpo": ["--algo", "grpo"],
    "cepo": ["--algo", "cepo"],
    "cepo, natural-language hint": ["--algo", "cepo", "--hint_template", NATURAL_HINT_TEMPLATE],
    "cepo, wrong answer most_frequent": ["--algo", "cepo", "--wrong_answer_strategy",
                                         "most_frequent"],
    "cepo, wrong answer random": ["--algo", "cepo", "--wrong_answer_strategy", "random"],
    "cepo, lam0 0.25": ["--algo", "cepo", "--lam0", "0.25"],
    "cepo, lam0 1.0": ["--algo", "cepo", "--lam0", "1.0"],
    "cepo, lambda constant (no decay)": ["--algo", "cepo", "--lam_schedule", "constant"],
    "cepo, eps_w 0.1": ["--algo", "cepo", "--eps_w", "0.1"],
    "cepo, eps_w 0.5": ["--algo", "cepo", "--eps_w", "0.5"],
    "grpo, harder task (3-op prompts)": ["--algo", "grpo", "--train_data", HARD_TRAIN,
                                         "--eval_data", "builtin:arithmetic"],
    "cepo, harder task (3-op prompts)": ["--algo", "cepo", "--train_data", HARD_TRAIN,
                                         "--eval_data", "builtin:arithmetic"],
}
OPTIONAL: dict[str, list[str]] = {  # not in the default sweep (budget); --variants NAME
    "rlsd": ["--algo", "rlsd"],
    "cepo, T_warm 10": ["--algo", "cepo", "--t_warm", "10"],
    "grpo, lr x0.5": ["--algo", "grpo", "--lr_scale", "0.5"],
    "cepo, lr x0.5": ["--algo", "cepo", "--lr_scale", "0.5"],
}


def write_hard_train(path: Path, num_train: int = 2000) -> Path:
    """The built-in train split restricted to 3-operation problems (the eval set is kept)."""
    from cepo.arithmetic import make_split

    rows = [r for r in make_split("train", num_train * 2, seed=0)
            if r["solution"].count("\n") == 3][:num_train]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _resolve(args: list[str], out: Path, base_lr: float) -> list[str]:
    """Replace placeholders: the harder-task file path and --lr_scale (x the base lr)."""
    resolved, it = [], iter(args)
    for a in it:
        if a == "--lr_scale":
            resolved += ["--lr", repr(base_lr * float(next(it)))]
        elif a == HARD_TRAIN:
            resolved.append(str(out / HARD_TRAIN))
        else:
            resolved.append(a)
    return resolved


def _run(run_dir: Path, args: list[str], seed: int, eval_every: int, extra: list[str]) -> Path:
    if (run_dir / "summary.json").exists():  # finished earlier: reuse (delete to rerun)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--master_port", str(free_port()), "-m", "cepo.train", "--seed", str(seed),
           "--output_dir", str(run_dir), "--eval_every", str(eval_every), "--progress", "false",
           "--checkpoint_every", "0", "--export", "false", "--eval_split", "dev", *args, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with (run_dir / "stdout.log").open("w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return run_dir


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m cepo.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    known = {**VARIANTS, **OPTIONAL}
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(known),
                    metavar="NAME", help="default: " + "; ".join(VARIANTS) + ". Also: "
                    + "; ".join(OPTIONAL))
    ap.add_argument("--eval_every", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    ap.add_argument("--out", default="results/sweep")
    from cepo.compare import split_trainer_args

    own, extra = split_trainer_args(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(own)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_hard_train(out / HARD_TRAIN)
    from cepo.config import TrainConfig

    base_lr = TrainConfig().lr
    if "--lr" in extra:
        base_lr = float(extra[extra.index("--lr") + 1])

    t0 = time.time()
    jobs = [(name, seed) for name in args.variants for seed in args.seeds]
    slug = lambda name: "".join(c if c.isalnum() else "_" for c in name)  # noqa: E731
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = dict(zip(jobs, pool.map(lambda job: _run(
            out / "runs" / f"{slug(job[0])}-seed{job[1]}",
            _resolve(known[job[0]], out, base_lr), job[1], args.eval_every, extra), jobs)))
    wall = time.time() - t0

    result = {"config": {"seeds": args.seeds, "eval_every": args.eval_every,
                         "extra_trainer_args": extra, "wall_seconds": round(wall)},
              "variants": {}}
    for name in args.variants:
        curves = [_curve(dirs[(name, s)]) for s in args.seeds]
        finals = [c[-1][1] for c in curves]
        result["variants"][name] = {
            "args": known[name], "mean": statistics.fmean(finals),
            "std": statistics.stdev(finals) if len(finals) > 1 else 0.0, "per_seed": finals,
            "base": curves[0][0][1], "curves": curves}
    raw = []
    for (name, seed), d in dirs.items():
        raw += [{"variant": name, "seed": seed, **json.loads(x)}
                for x in (d / "metrics.jsonl").read_text().splitlines() if x]
    (out / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    (out / "sweep.md").write_text(_table(result))
    print((out / "sweep.md").read_text())
    return result


def _table(result: dict) -> str:
    variants = result["variants"]
    grpo = variants.get("grpo", {}).get("mean")
    lines = ["| variant | final greedy accuracy (mean ± std) | per seed | vs GRPO default |",
             "|---|---|---|---|"]
    for name, v in variants.items():
        vs = f"{v['mean'] - grpo:+.3f}" if grpo is not None else "n/a"
        lines.append(f"| {name} | {v['mean']:.3f} ± {v['std']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in v['per_seed'])} | {vs} |")
    first = next(iter(variants.values()))
    cfg = result["config"]
    lines += ["", f"Base model: {first['base']:.3f}. Seeds {cfg['seeds']}; extra trainer "
              f"arguments {cfg['extra_trainer_args']}; wall time of this invocation "
              f"{cfg['wall_seconds']} s (runs finished earlier are reused, not re-run)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
