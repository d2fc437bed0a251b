"""``python -m cepo.compare``: the algorithms from one start, same budget and seeds, with
paired differences and their confidence intervals.

Runs ``torchrun -m cepo.train`` for every (algorithm, seed), one run at a time by default
(so the wall times compare), with held-out evaluation (greedy, and mean over k samples) at
fixed intervals on one fixed eval set: the built-in task's **test** split
(``--eval_split test``), which no setting was chosen on (settings are chosen on the dev
split, e.g. by ``python -m cepo.sweep``). Then writes under ``--out`` (default results/):

- comparison.json and comparison.md: per-seed and mean final held-out accuracy per
  method; the paired differences ``--treatment`` (cepo) - every other method, per seed,
  their mean and the 95% confidence interval from Student's t on the paired differences
  (n seeds, n - 1 degrees of freedom; quantile computed by cepo.stats, no scipy); wall
  time per method (the trainer's own, per run); decisive-versus-template |delta|;
- learning-curve PNGs, raw.jsonl (every metrics row, labelled), the token-credit map
  (credit_map.html / .png).

``--algos`` takes any algorithm the trainer accepts (``--algo`` of cepo.train). Extra
trainer options after ``--`` are passed to every run (e.g. ``-- --arith_ops 4``, or a real
model and dataset on a GPU: with ``--eval_data`` a file, that file is the held-out set and
``--eval_split`` does not apply). Runs that finished earlier (summary.json in their
directory) are reused, not re-run.
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

from cepo.config import option_given
from cepo.distributed import free_port
from cepo.stats import paired_difference

DEFAULT_ALGOS = ("grpo", "rlsd", "opsd", "sdpo", "cepo")  # the CEPO paper's comparison
EVIDENCE_ALGOS = ("rlsd", "cepo")  # the algorithms with a token-level evidence delta


def trainer_algos() -> tuple[str, ...]:
    """The values the trainer's ``--algo`` accepts (read from TrainConfig, so a new
    algorithm is accepted here as soon as the trainer has it)."""
    import typing

    from cepo.config import TrainConfig

    return typing.get_args(typing.get_type_hints(TrainConfig)["algo"])


# trainer options this command sets per run, and the option of its own that sets them
OWN_TRAINER_FLAGS = {"--algo": "--algos", "--seed": "--seeds", "--output_dir": "--out",
                     "--eval_every": "--eval_every", "--eval_samples": "--k",
                     "--eval_split": "--eval_split"}


def _run(algo: str, seed: int, run_dir: Path, args, extra: list[str], threads: int) -> Path:
    if (run_dir / "summary.json").exists():  # finished earlier: reuse (delete to rerun)
        return run_dir
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_port", str(free_port()),
           "-m", "cepo.train", "--algo", algo, "--seed", str(seed), "--output_dir", str(run_dir),
           "--eval_every", str(args.eval_every), "--eval_samples", str(args.k),
           "--dump_evidence", "true" if algo in EVIDENCE_ALGOS else "false", "--progress", "false",
           "--checkpoint_every", "0", "--export", "false", "--eval_split", args.eval_split, *extra]
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with (run_dir / "stdout.log").open("w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return run_dir


def run_all(jobs: list[tuple[str, int]], run_one, parallel: int) -> dict:
    """{(algo, seed): run_one(algo, seed)}, ``parallel`` at a time, in the order given. A
    failed run stops the comparison: runs not yet started are cancelled and the error
    names the run and its log."""
    import threading

    stop = threading.Event()

    def guarded(algo, seed):
        if stop.is_set():  # an earlier run failed: do not start this one
            return None
        try:
            return run_one(algo, seed)
        except BaseException:
            stop.set()
            raise

    with ThreadPoolExecutor(parallel) as pool:
        futures = {job: pool.submit(guarded, *job) for job in jobs}
    for (algo, seed), future in futures.items():
        if future.exception() is not None:
            raise RuntimeError(f"compare: the {algo} run with seed {seed} failed "
                               f"({future.exception()}); see its stdout.log. Runs not yet "
                               "started were not started; finished ones are reused on a rerun"
                               ) from future.exception()
    return {job: future.result() for job, future in futures.items()}


def split_trainer_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this command's arguments, trainer options after ``--``)."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def _parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(prog="python -m cepo.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14],
                    help="training seeds (the pairs of the paired differences); default "
                         "10-14, unused by any earlier choice of settings")
    ap.add_argument("--algos", nargs="+", default=list(DEFAULT_ALGOS),
                    help="any of the trainer's --algo values (" + ", ".join(trainer_algos())
                         + "); default: " + " ".join(DEFAULT_ALGOS))
    ap.add_argument("--treatment", default="cepo",
                    help="the method whose paired difference to every other is reported")
    ap.add_argument("--eval_split", choices=("dev", "test"), default="test",
                    help="built-in held-out split to report on (test: no setting was chosen "
                         "on it; dev: the split settings are chosen on)")
    ap.add_argument("--eval_every", type=int, default=10)
    ap.add_argument("--k", type=int, default=4, help="samples per problem for mean@k")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs in parallel (more than 1: faster, but wall times no longer compare)")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    ap.add_argument("--out", default="results")
    own, extra = split_trainer_args(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(own)
    accepted = trainer_algos()
    unknown = [a for a in args.algos if a not in accepted]
    if unknown:
        ap.error(f"--algos: {', '.join(map(repr, unknown))} not accepted by the trainer's --algo "
                 f"(it accepts: {', '.join(accepted)})")
    if len(set(args.algos)) != len(args.algos) or len(set(args.seeds)) != len(args.seeds):
        ap.error("--algos and --seeds must not repeat a value")
    if args.jobs < 1 or args.k < 0 or args.nproc < 1:
        ap.error("--jobs and --nproc must be >= 1, --k >= 0")
    for option, own_flag in OWN_TRAINER_FLAGS.items():
        if option_given(extra, option):
            ap.error(f"trainer option {option} after '--': this command sets it for every run; "
                     f"use {own_flag} instead")
    return args, extra


def main(argv: list[str] | None = None) -> dict:
    """Run every (algorithm, seed), then write the comparison (see the module docstring)."""
    args, extra = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # OMP_NUM_THREADS when set (e.g. 1 on a shared machine), else the cores shared by the jobs
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 2) // args.jobs))
    jobs = [(a, s) for s in args.seeds for a in args.algos]
    dirs = run_all(jobs, lambda algo, seed: _run(algo, seed, out / "runs" / f"{algo}-seed{seed}",
                                                 args, extra, threads), args.jobs)
    wall = time.time() - t0

    raw = []
    for (algo, seed), d in dirs.items():
        raw += [{"algo": algo, "seed": seed, **r} for r in _rows(d)]
    (out / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
    summaries = {job: json.loads((d / "summary.json").read_text()) for job, d in dirs.items()}
    trainer_config = json.loads((dirs[jobs[0]] / "config.json").read_text())
    result = summarise(raw, summaries, args.algos, args.seeds, args.treatment)
    result["config"] = {"seeds": args.seeds, "algos": args.algos, "eval_every": args.eval_every,
                        "k": args.k, "jobs": args.jobs, "eval_split": args.eval_split,
                        "eval_data": trainer_config.get("eval_data"),
                        "eval_problems": summaries[jobs[0]].get("eval_problems"),
                        "extra_trainer_args": extra, "wall_seconds": round(wall),
                        "command": "python -m cepo.compare " + " ".join(
                            sys.argv[1:] if argv is None else argv),
                        "trainer_config": trainer_config}

    # credit map and decisive-token statistics (the algorithms with a token-level delta)
    from transformers import AutoTokenizer

    from cepo import credit
    tokenizer = AutoTokenizer.from_pretrained(trainer_config["model"], local_files_only=True)
    examples, stats = {}, {}
    for algo in [a for a in EVIDENCE_ALGOS if a in args.algos]:
        rows = [r for s in args.seeds for r in credit.read_evidence(dirs[(algo, s)])]
        stats[algo] = credit.decisive_stats(rows, tokenizer)
        examples[algo] = credit.pick_rollouts(credit.read_evidence(dirs[(algo, args.seeds[0])]))
    if examples:
        credit.render_html(examples, tokenizer, out / "credit_map.html")
        credit.render_png(examples, tokenizer, out / "credit_map.png")
    result["token_credit"] = stats
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    _plot_curves(raw, args, out)
    (out / "comparison.md").write_text(table(result))
    print((out / "comparison.md").read_text())
    return result


def summarise(raw: list[dict], summaries: dict, algos: list[str], seeds: list[int],
              treatment: str) -> dict:
    """Per method: final greedy accuracy and mean@k per seed (mean, std), wall time per run;
    the base model (first evaluation); the paired differences treatment - each other method.

    raw: metrics rows labelled with "algo" and "seed"; summaries: (algo, seed) -> the run's
    summary.json (for "wall_seconds")."""
    def evals(algo, seed, key):
        values = [r[key] for r in raw if r["algo"] == algo and r["seed"] == seed
                  and r.get(key) is not None]
        if not values:
            raise ValueError(f"compare: run {algo} seed {seed} has no {key!r} in its metrics "
                             "(was the held-out set empty?)")
        return values

    result = {"base": _mean_std([evals(algos[0], s, "eval_accuracy")[0] for s in seeds])}
    has_k = any("eval_mean_at_k" in r for r in raw)
    if has_k:
        result["base"]["mean_at_k"] = _mean_std([evals(algos[0], s, "eval_mean_at_k")[0]
                                                 for s in seeds])
    result["methods"] = {}
    for algo in algos:
        entry = _mean_std([evals(algo, s, "eval_accuracy")[-1] for s in seeds])
        if has_k:
            entry["mean_at_k"] = _mean_std([evals(algo, s, "eval_mean_at_k")[-1] for s in seeds])
        entry["wall_seconds"] = _mean_std([summaries[(algo, s)]["wall_seconds"] for s in seeds])
        result["methods"][algo] = entry
    result["paired"] = {}
    if treatment in algos:
        for other in algos:
            if other == treatment:
                continue
            key = f"{treatment} - {other}"
            m = result["methods"]
            result["paired"][key] = {"eval_accuracy": paired_difference(
                m[treatment]["per_seed"], m[other]["per_seed"])}
            if has_k:
                result["paired"][key]["eval_mean_at_k"] = paired_difference(
                    m[treatment]["mean_at_k"]["per_seed"], m[other]["mean_at_k"]["per_seed"])
    return result


def _pm(d: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{d['mean'] * scale:.{digits}f} ± {d['std'] * scale:.{digits}f}"


def _ci(p: dict) -> str:
    if p["ci_low"] is None:
        return "n/a (1 seed)"
    return f"[{100 * p['ci_low']:+.2f}, {100 * p['ci_high']:+.2f}]"


def table(result: dict) -> str:
    """comparison.md: accuracy per seed and mean, paired differences with their 95% CI
    (in accuracy points), wall time, and the token-credit statistics."""
    cfg = result["config"]
    seeds, k = cfg["seeds"], cfg["k"]
    has_k = "mean_at_k" in result["base"]
    held_out = (f"{cfg['eval_problems']} problems of the built-in task's **{cfg['eval_split']}** "
                f"split" if not cfg.get("eval_data") or cfg["eval_data"] == "builtin:arithmetic"
                else f"the first {cfg['eval_problems']} rows of {cfg['eval_data']}")
    lines = [f"Final greedy accuracy on {held_out}, per training seed; {len(seeds)} seeds.", "",
             "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | "
             + (f"mean@{k} (mean ± std) | " if has_k else "") + "wall time per run (s) |",
             "|---" * (len(seeds) + 3 + has_k) + "|"]

    def row(name, d, wall):
        cells = [f"{x:.3f}" for x in d["per_seed"]] + [_pm(d)]
        if has_k:
            cells.append(_pm(d["mean_at_k"]))
        cells.append(wall)
        return f"| {name} | " + " | ".join(cells) + " |"

    lines.append(row("base (step 0)", result["base"], "-"))
    for algo, d in result["methods"].items():
        lines.append(row(algo, d, f"{d['wall_seconds']['mean']:.0f} ± {d['wall_seconds']['std']:.0f}"))
    if result["paired"]:
        level = next(iter(result["paired"].values()))["eval_accuracy"]["level"]
        lines += ["", f"Paired differences (same seed), in accuracy points; {100 * level:.0f}% "
                  f"confidence interval: mean ± t(n-1) × sd / sqrt(n), Student's t with "
                  f"{len(seeds) - 1} degrees of freedom (cepo.stats).", "",
                  "| difference | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | mean | sd | 95% CI | " + (f"mean@{k}: mean [95% CI] |" if has_k else ""),
                  "|---" * (len(seeds) + 4 + has_k) + "|"]
        for name, p in result["paired"].items():
            a = p["eval_accuracy"]
            sd = "-" if a["sd"] is None else f"{100 * a['sd']:.2f}"
            cells = [f"{100 * x:+.2f}" for x in a["per_seed"]] + [f"{100 * a['mean']:+.2f}", sd,
                                                                  _ci(a)]
            if has_k:
                b = p["eval_mean_at_k"]
                cells.append(f"{100 * b['mean']:+.2f} {_ci(b)}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "The interval covers the seed-to-seed variation of training on this fixed "
                  "held-out set; an interval that contains 0 means no detectable difference at "
                  "this number of seeds."]
    lines += ["", f"Seeds {', '.join(map(str, seeds))}; {cfg['jobs']} run(s) at a time; wall "
              f"time of this invocation {cfg['wall_seconds']} s (runs finished earlier are reused, "
              f"not re-run); extra trainer arguments {cfg['extra_trainer_args']}.",
              f"Command: `{cfg['command']}`"]
    if result.get("token_credit"):
        lines += ["", "| algorithm | mean abs(delta), decisive tokens | template tokens |",
                  "|---|---|---|"]
        for algo, s in result["token_credit"].items():
            dec, tpl = s["mean_abs_delta_decisive"], s["mean_abs_delta_template"]
            fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"| {algo} | {fmt(dec)} ({s['tokens_decisive']} tokens) | "
                         f"{fmt(tpl)} ({s['tokens_template']} tokens) |")
    return "\n".join(lines) + "\n"


def _plot_curves(raw: list[dict], args, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, title in (("eval_accuracy", "held-out greedy accuracy"),
                       ("eval_mean_at_k", f"held-out mean@{args.k}"), ("reward_mean", "train reward")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for algo in args.algos:
            steps = sorted({r["step"] for r in raw if r["algo"] == algo and r.get(key) is not None})
            means, stds = [], []
            for st in steps:
                vals = [r[key] for r in raw if r["algo"] == algo and r["step"] == st and r.get(key) is not None]
                means.append(statistics.fmean(vals))
                stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.plot(steps, means, label=algo, marker="o" if key != "reward_mean" else None)
            ax.fill_between(steps, [m - s for m, s in zip(means, stds)],
                            [m + s for m, s in zip(means, stds)], alpha=0.2)
        ax.set_xlabel("step")
        ax.set_title(f"{title} (mean ± std over {len(args.seeds)} seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"curve_{key}.png", dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()
