"""Trainer benchmarks (``pytest bench/test_trainer.py``; a plain ``pytest bench/`` runs
the kernels only): step-time split per algorithm and the update micro-batch memory of the
fused head versus naive logits. Writes trainer.json, trainer.md and trainer_memory.png next
to the kernel results; never asserts on timing."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench import trainer

_RESULTS: dict = {}


def _write(bench) -> None:
    """Write trainer.json, trainer.md and the memory plot: the sections this session
    measured, each stamped with its own date, commit and command, and the sections of the
    previous trainer.json it did not re-measure (a run of one test, e.g. ``-k sampler``,
    keeps the other tests' figures, with their own stamps)."""
    os.makedirs(bench.out_dir, exist_ok=True)
    meta = {k: v for k, v in bench.meta().items() if k not in ("timing_method",)}
    path = os.path.join(bench.out_dir, "trainer.json")
    sections = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {}
        stamp = _stamp(previous.get("meta") or {})
        sections = {k: {"measured": stamp, **v} for k, v in previous.items()
                    if k != "meta" and isinstance(v, dict)}
    for key, section in _RESULTS.items():
        section.setdefault("measured", _stamp(meta))
        sections[key] = section
    with open(path, "w") as f:
        json.dump({"meta": meta, **sections}, f, indent=2)
    with open(os.path.join(bench.out_dir, "trainer.md"), "w") as f:
        f.write(markdown(meta, sections))
    if "update_memory" in sections:
        plot(os.path.join(bench.out_dir, "trainer_memory.png"), sections["update_memory"])


def _stamp(meta: dict) -> dict:
    """When, at which commit and by which command a section was measured."""
    keys = ("date", "git_commit", "git_dirty", "command", "load_average_start")
    return {k: meta.get(k) for k in keys}


def _measured(section: dict) -> str:
    m = section.get("measured") or {}
    return (f"Measured {m.get('date')}, commit {str(m.get('git_commit'))[:10]}"
            f"{' (uncommitted changes)' if m.get('git_dirty') else ''}, `{m.get('command')}`.")


def markdown(meta: dict, sections: dict) -> str:
    lines = [f"# Trainer benchmarks: {meta['device']}", "",
             f"Last written {meta['date']} at commit {meta['git_commit'][:10]}; each section "
             "says when it was measured.", ""]
    split = sections.get("step_time_split")
    if split:
        lines += [f"## Step time split ({split['model']})", "", _measured(split), "",
                  "| algo | generate s | score s | teacher s | update s | sync s | step s | "
                  "median s | vs GRPO | generate share | tokens/s | peak GB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        grpo = next((r["step_s"] for r in split["rows"] if r["algo"] == "grpo"), None)
        for r in split["rows"]:
            rel = f"{r['step_s'] / grpo:.2f}x" if grpo else "n/a"
            lines.append(f"| {r['algo']} | " + " | ".join(
                f"{r[p + '_s']:.3f}" for p in trainer.PHASES) +
                f" | {r['step_s']:.3f} | {r['step_median_s']:.3f} | {rel} | "
                f"{r['generate_share']:.0%} | {r['tokens_per_s']:.0f} | "
                f"{r['peak_memory_gb']:.2f} |")
        first = next((r for r in split["rows"] if r["algo"] == "cepo"), split["rows"][0])
        lines += ["", f"Mean over steps {first['first_step_timed']}-"
                  f"{first['first_step_timed'] + first['steps_timed'] - 1} of each run (lambda "
                  f"{first['lambda_first']:.2f} -> {first['lambda_last']:.2f} for RLSD / CEPO: "
                  "the teacher phase runs while lambda > 0), no evaluation; trainer options: "
                  f"`{' '.join(split['extra']) or '(the embedded default)'}`.", ""]
    whole = sections.get("whole_run")
    if whole:
        lines += [f"## Whole run ({whole['model']})", "", _measured(whole), "",
                  "| algo | steps | steps with lambda > 0 | generate s | score s | teacher s | "
                  "update s | sync s | steps total s | runs (min-max) s | vs GRPO | "
                  "teacher share | generate share |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        grpo = next((r["total_step_s"] for r in whole["rows"] if r["algo"] == "grpo"), None)
        for r in whole["rows"]:
            rel = f"{r['total_step_s'] / grpo:.2f}x" if grpo else "n/a"
            lines.append(f"| {r['algo']} | {r['steps_timed']} | {r['teacher_steps']} | "
                         + " | ".join(f"{r[f'total_{p}_s']:.1f}" for p in trainer.PHASES) +
                f" | {r['total_step_s']:.1f} | {min(r['run_totals_s']):.1f}-"
                f"{max(r['run_totals_s']):.1f} | {rel} | "
                f"{r['total_teacher_s'] / r['total_step_s']:.1%} | "
                f"{r['total_generate_s'] / r['total_step_s']:.0%} |")
        lines += ["", f"Every step of a whole run, summed, the mean of {whole.get('rounds', 1)} "
                  "runs per algorithm taken round-robin (what a run pays; the "
                  "reference's GRPO 5h58 / CEPO 6h34 are whole-run figures too); evaluation "
                  "excluded. The teacher phase runs only while lambda > 0 (the first t_warm "
                  "steps); \"vs GRPO\" also carries the runs' different response lengths, "
                  "\"teacher share\" is the teacher phase alone.", ""]
    shared = sections.get("shared_context")
    if shared:
        lines += [f"## Shared-context packing vs plain packing ({shared['model']})", "",
                  _measured(shared), "",
                  "| pass | groups x G | context tokens | response tokens (mean) | plain tokens | "
                  "shared tokens | plain s | shared s | speed-up | plain peak MiB | "
                  "shared peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        mib = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
        for r in shared["rows"]:
            lines.append(f"| {'update (fwd + bwd)' if r['grad'] else 'teacher (no grad)'} | "
                         f"{r['groups']} x {r['group_size']} | {r['context_len']} | "
                         f"{r['response_len']} | {r['plain_tokens']} | {r['shared_tokens']} | "
                         f"{r['plain_s']:.3f} | {r['shared_s']:.3f} | {r['speedup']:.2f}x | "
                         f"{mib(r.get('plain_peak_mib'))} | {mib(r.get('shared_peak_mib'))} |")
        lines += ["", "One packed pass over a step's groups, each group's G rollouts under one "
                  "context (the teacher's hinted prompt, or the policy's prompt in the update): "
                  "every (context, response) sequence packed whole, against each context run "
                  "once with its responses after it (cepo.shared_context; same hidden states, "
                  "tests/test_shared_context.py). Median of round-robin timings; peak: the extra "
                  "memory of one pass (activations, and gradients for the update).", ""]
    decode = sections.get("sampler_decode")
    if decode:
        lines += ["## Sampler: lean decoding steps vs the model's forward", "",
                  _measured(decode), "",
                  "| model | prompts x samples | max new tokens | decoder | median s | min s | "
                  "tokens | tokens/s | speed-up | same tokens |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for case in decode["cases"]:
            for r in case["rows"]:
                lines.append(f"| {case['model']} | {case['prompts']} x {case['n']} | "
                             f"{case['max_new_tokens']} | {r['decoder']} | {r['median_s']:.3f} | "
                             f"{r['min_s']:.3f} | {r['tokens']} | {r['tokens_per_s']:.0f} | "
                             + (f"{case['speedup']:.2f}x | {case['same_tokens']} |"
                                if r["decoder"] == "lean" else "1.00x | |"))
        lines += ["", "One `HFEngine.generate` call (one batch, T = 1, fixed seeds), the "
                  "decoding steps through `cepo.sampler.lean_decoder` against the model's own "
                  "forward at every step (`--lean_decode false`); the prompt's forward is the "
                  "model's in both. Median over calls alternated between the two engines, "
                  "after one warm-up call each.", ""]
    mem = sections.get("update_memory")
    if mem:
        lines += [f"## Update micro-batch: fused head vs naive logits ({mem['model']})", "",
                  _measured(mem), "",
                  "| tokens | fused peak MiB | naive peak MiB | naive / fused | fused s | naive s |",
                  "|---|---|---|---|---|---|"]
        by = {(r["head"], r["budget"]): r for r in mem["rows"]}
        for b in sorted({r["budget"] for r in mem["rows"]}):
            f_, n_ = by.get(("fused", b), {}), by.get(("naive", b), {})
            cell = lambda r, k: (f"{r[k]:.1f}" if r.get("status") == "ok" and r.get(k) is not None  # noqa: E731
                                 else r.get("status", "-"))
            ratio = (f"{n_['peak_mib'] / f_['peak_mib']:.2f}" if f_.get("status") == n_.get("status")
                     == "ok" and f_.get("peak_mib") else "n/a")
            lines.append(f"| {b} | {cell(f_, 'peak_mib')} | {cell(n_, 'peak_mib')} | {ratio} | "
                         f"{cell(f_, 'seconds')} | {cell(n_, 'seconds')} |")
        for head, r in mem.get("largest", {}).items():
            lines.append("")
            lines.append(f"Largest micro-batch that fits, {head} head: {r['largest_ok']} tokens"
                         + (" (search capped)" if r["capped"] else f" (OOM at {r['first_oom']})"))
        if mem.get("mib_per_1k_tokens"):
            lines += ["", "Peak extra memory per 1k tokens (slope between the two largest "
                      "budgets): " + ", ".join(f"{h} {v:.1f} MiB" for h, v in
                                               mem["mib_per_1k_tokens"].items())]
        lines.append("")
    return "\n".join(lines)


def plot(path: str, mem: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in mem["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for head in ("fused", "naive"):
        pts = sorted((r["budget"], r["peak_mib"]) for r in rows if r["head"] == head)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{head} head")
    ax.set_xlabel("tokens in the update micro-batch")
    ax.set_ylabel("peak extra memory (MiB)")
    ax.set_title(f"update micro-batch memory ({mem['model']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def test_trainer_step_time_split(bench, tmp_path):
    """GRPO vs RLSD vs CEPO vs OPSD vs SDPO on the same config: seconds per phase of a step."""
    cuda = torch.device(bench.device).type == "cuda"
    steps, warmup = {"tiny": (3, 1), "small": (12, 4), "full": (20, 5)}[bench.size]
    if cuda:
        model = trainer.random_model_dir(tmp_path / "model", trainer.QWEN3_0_6B, torch.bfloat16)
        name = "random Qwen3-0.6B shape, bf16, HF generate, hashed reward"
        extra = ["--reward_fn", "bench_rewards:hashed_reward", "--engine", "hf",
                 "--max_new_tokens", "256", "--token_budget", "16384"]
    else:
        model, name, extra = None, "the embedded default: shipped tiny model, built-in task", []
    rows = [trainer.step_time_split(algo, model, tmp_path / algo, device=bench.device,
                                    steps=steps, warmup=warmup, extra=extra)
            for algo in ("grpo", "rlsd", "cepo", "opsd", "sdpo")]
    _RESULTS["step_time_split"] = {"model": name, "extra": extra, "rows": rows}
    _write(bench)
    for r in rows:
        assert r["steps_timed"] >= 1 and r["step_s"] > 0


def test_trainer_whole_run(bench, tmp_path):
    """GRPO vs RLSD vs CEPO over one whole run each (every step timed): what the teacher
    phase costs a run, not only the steps where it runs."""
    if bench.size == "tiny" or torch.device(bench.device).type == "cuda":
        pytest.skip("whole runs: the CPU embedded default at size small / full only")
    algos = ("grpo", "rlsd", "cepo")
    rounds = {"small": 2, "full": 3}[bench.size]
    runs: dict[str, list[dict]] = {a: [] for a in algos}
    for k in range(rounds):  # round-robin, the order rotated: a slow spell of a shared
        for algo in algos[k % len(algos):] + algos[:k % len(algos)]:  # machine hits all
            runs[algo].append(trainer.step_time_split(
                algo, None, tmp_path / f"{algo}-{k}", device=bench.device, steps=None,
                warmup=0, extra=[]))
    rows = [trainer.mean_of_runs(runs[a]) for a in algos]
    _RESULTS["whole_run"] = {"model": "the embedded default: shipped tiny model, built-in "
                                      "task, its own step count", "rows": rows,
                             "rounds": rounds}
    _write(bench)
    for r in rows:
        assert r["steps_timed"] >= 1 and r["total_step_s"] > 0


def test_trainer_shared_context_pass(bench):
    """A packed pass over a step's groups with each group's context run once (shared-context
    packing) against every (context, response) sequence packed whole: the embedded
    default's shape (16-token contexts), a long prompt and an image-sized one."""
    cuda = torch.device(bench.device).type == "cuda"
    shape = trainer.QWEN3_0_6B if cuda else trainer.CPU_MEMORY_MODEL
    dtype = torch.bfloat16 if cuda else torch.float32
    policy = trainer.FusedHeadPolicy(trainer.random_model(shape, dtype).to(bench.device))
    cases = {"tiny": [(16, 24)], "small": [(16, 24), (256, 64), (1024, 128)],
             "full": [(16, 24), (256, 256), (1024, 512)]}[bench.size]
    groups, group_size = (4, 8) if not cuda else (16, 8)
    rows = [trainer.shared_context_pass(policy, groups=groups, group_size=group_size,
                                        context_len=c, response_len=r, grad=grad)
            for c, r in cases for grad in (False, True)]
    _RESULTS["shared_context"] = {
        "model": f"random Qwen3, H {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
                 f"{str(dtype).removeprefix('torch.')}", "rows": rows}
    _write(bench)
    for r in rows:
        assert r["shared_tokens"] < r["plain_tokens"] and r["plain_s"] > 0 and r["shared_s"] > 0


def test_trainer_sampler_decode(bench, tmp_path):
    """The Hugging Face engine's decoding steps through the lean decoder against the
    model's own forward: the embedded default's tiny model and step shape (16 x 8 rows, 64
    new tokens), and a real model's shape (random weights: SmolLM2-135M's on CPU,
    Qwen3-0.6B's in bf16 on CUDA)."""
    cuda = torch.device(bench.device).type == "cuda"
    rounds = {"tiny": 1, "small": 5, "full": 7}[bench.size]
    cases = [("shipped tiny model (fp32)", trainer.TINY_ASSET, torch.float32, 16, 8, 64)]
    if cuda:
        cases.append(("random Qwen3-0.6B shape (bf16)", trainer.random_model_dir(
            tmp_path / "m", trainer.QWEN3_0_6B, torch.bfloat16), torch.bfloat16, 16, 8, 128))
    elif bench.size != "tiny":
        cases.append(("random SmolLM2-135M shape, as Qwen3 (fp32)", trainer.random_model_dir(
            tmp_path / "m", trainer.SMOLLM2_135M, torch.float32), torch.float32, 8, 4, 32))
    results = []
    for name, path, dtype, prompts, n, new_tokens in cases:
        result = trainer.sampler_decode(path, device=bench.device, dtype=dtype,
                                        prompts=prompts, n=n, max_new_tokens=new_tokens,
                                        rounds=rounds)
        results.append({"model": name, **result})
    _RESULTS["sampler_decode"] = {"cases": results}
    _write(bench)
    for r in results:
        assert r["rows"][0]["tokens"] > 0 and all(x["median_s"] > 0 for x in r["rows"])


def test_trainer_update_memory(bench):
    """Peak extra memory of one update micro-batch, fused head vs naive logits; on CUDA
    also the largest micro-batch each head can run."""
    cuda = torch.device(bench.device).type == "cuda"
    shape = trainer.QWEN3_0_6B if cuda else trainer.CPU_MEMORY_MODEL
    dtype = torch.bfloat16 if cuda else torch.float32
    policy = trainer.FusedHeadPolicy(trainer.random_model(shape, dtype).to(bench.device))
    budgets = {"tiny": [512, 1024], "small": [1024, 2048, 4096],
               "full": [4096, 8192, 16384]}[bench.size]
    rows = [trainer.peak_update_memory(policy, b, head, bench.device)
            for b in budgets for head in ("fused", "naive")]
    result = {"model": f"random Qwen3, H {shape['hidden_size']}, {shape['num_hidden_layers']} "
                       f"layers, V {shape['vocab_size']}, {str(dtype).removeprefix('torch.')}",
              "rows": rows, "largest": {}, "mib_per_1k_tokens": {}}
    for head in ("fused", "naive"):
        ok = sorted((r["budget"], r["peak_mib"]) for r in rows
                    if r["head"] == head and r["status"] == "ok" and r["peak_mib"] is not None)
        if len(ok) >= 2:
            (b0, m0), (b1, m1) = ok[-2], ok[-1]
            result["mib_per_1k_tokens"][head] = (m1 - m0) / (b1 - b0) * 1024
    if cuda and bench.size == "full":
        for head in ("fused", "naive"):
            found = trainer.largest_budget(policy, head, bench.device)
            result["largest"][head] = {k: v for k, v in found.items() if k != "trials"}
            result["rows"] += found["trials"]
    _RESULTS["update_memory"] = result
    _write(bench)
    assert any(r["status"] == "ok" for r in rows)
