"""``python -m cepo.compare``: GRPO vs RLSD vs CEPO from one start, same budget and seeds.

Runs ``torchrun -m cepo.train`` for every (algorithm, seed), with held-out evaluation
(greedy, and mean over k samples) at fixed intervals on one fixed eval set, then writes
under ``--out`` (default results/): comparison.json, comparison.md (mean +- std table),
learning-curve PNGs, raw.jsonl (every metrics row, labelled), the token-credit map
(credit_map.html / .png) and decisive-versus-template |delta| statistics. Extra trainer
options after ``--`` are passed to every run (e.g. a real model and dataset on a GPU).
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

from cepo.distributed import free_port

ALGOS = ("grpo", "rlsd", "cepo")


def _run(algo: str, seed: int, run_dir: Path, args, extra: list[str], threads: int) -> Path:
    if (run_dir / "summary.json").exists():  # finished earlier: reuse (delete to rerun)
        return run_dir
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_port", str(free_port()),
           "-m", "cepo.train", "--algo", algo, "--seed", str(seed), "--output_dir", str(run_dir),
           "--eval_every", str(args.eval_every), "--eval_samples", str(args.k),
           "--dump_evidence", "true" if algo != "grpo" else "false", "--progress", "false",
           "--checkpoint_every", "0", "--export", "false", *extra]
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with (run_dir / "stdout.log").open("w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return run_dir


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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m cepo.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    ap.add_argument("--eval_every", type=int, default=10)
    ap.add_argument("--k", type=int, default=4, help="samples per problem for mean@k")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    ap.add_argument("--out", default="results")
    own, extra = split_trainer_args(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(own)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    jobs = [(a, s) for s in args.seeds for a in args.algos]
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = dict(zip(jobs, pool.map(
            lambda job: _run(job[0], job[1], out / "runs" / f"{job[0]}-seed{job[1]}", args, extra,
                             threads), jobs)))
    wall = time.time() - t0

    raw = []
    for (algo, seed), d in dirs.items():
        raw += [{"algo": algo, "seed": seed, **r} for r in _rows(d)]
    (out / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))

    def final(algo, seed, key):
        evals = [r for r in raw if r["algo"] == algo and r["seed"] == seed and key in r]
        return evals[-1][key]

    def first(algo, seed, key):
        return next(r[key] for r in raw if r["algo"] == algo and r["seed"] == seed and key in r)

    result = {"base": {}, "config": {"seeds": args.seeds, "eval_every": args.eval_every, "k": args.k,
                                     "extra_trainer_args": extra, "wall_seconds": round(wall),
                                     "trainer_config": json.loads((dirs[jobs[0]] / "config.json").read_text())}}
    base_runs = [(args.algos[0], s) for s in args.seeds]
    result["base"] = _mean_std([first(a, s, "eval_accuracy") for a, s in base_runs])
    result["base"]["mean_at_k"] = _mean_std([first(a, s, "eval_mean_at_k") for a, s in base_runs])
    for algo in args.algos:
        result[algo] = _mean_std([final(algo, s, "eval_accuracy") for s in args.seeds])
        result[algo]["mean_at_k"] = _mean_std([final(algo, s, "eval_mean_at_k") for s in args.seeds])

    # credit map and decisive-token statistics (CEPO and RLSD)
    from transformers import AutoTokenizer

    from cepo import credit
    model_path = result["config"]["trainer_config"]["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    examples, stats = {}, {}
    for algo in [a for a in ("cepo", "rlsd") if a in args.algos]:
        rows = [r for s in args.seeds for r in credit.read_evidence(dirs[(algo, s)])]
        stats[algo] = credit.decisive_stats(rows, tokenizer)
        examples[algo] = credit.pick_rollouts(credit.read_evidence(dirs[(algo, args.seeds[0])]))
    if examples:
        credit.render_html(examples, tokenizer, out / "credit_map.html")
        credit.render_png(examples, tokenizer, out / "credit_map.png")
    result["token_credit"] = stats
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    _plot_curves(raw, args, out)
    (out / "comparison.md").write_text(_table(result, args))
    print((out / "comparison.md").read_text())
    return result


def _table(result: dict, args) -> str:
    f = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    lines = [f"| model | greedy accuracy | mean@{args.k} |", "|---|---|---|",
             f"| base | {f(result['base'])} | {f(result['base']['mean_at_k'])} |"]
    for algo in args.algos:
        lines.append(f"| {algo} | {f(result[algo])} | {f(result[algo]['mean_at_k'])} |")
    lines.append("")
    lines.append(f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}); held-out set fixed; "
                 f"wall time {result['config']['wall_seconds']} s.")
    if result.get("token_credit"):
        lines += ["", "| algorithm | mean abs(delta), decisive tokens | template tokens |", "|---|---|---|"]
        for algo, s in result["token_credit"].items():
            dec, tpl = s["mean_abs_delta_decisive"], s["mean_abs_delta_template"]
            lines.append(f"| {algo} | {dec:.4f} ({s['tokens_decisive']} tokens) | "
                         f"{tpl:.4f} ({s['tokens_template']} tokens) |")
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
