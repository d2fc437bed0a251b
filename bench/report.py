"""Writers for the benchmark results: JSON, markdown table, one PNG per op, summary lines,
and the check of the issue's targets (reported, never asserted)."""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict

OPS_TITLE = {
    "logprobs": "fused_logprobs (forward)",
    "logprobs_grad": "fused_logprobs (forward + backward)",
    "evidence": "contrastive_evidence (three contexts, forward)",
    "ppo_loss_fwd": "fused_linear_ppo_loss (forward)",
    "ppo_loss": "fused_linear_ppo_loss (forward + backward)",
    "self_distill": "fused_linear_self_distill_loss (JSD beta 0.5, forward + backward)",
}
ALL_OPS = tuple(OPS_TITLE)
PEER_EXCLUDE = ("ours", "floor")


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 1e-3:
            return f"{x:.{digits}g}"
        return f"{x:.1e}"
    return str(x)


def point_key(row):
    """(op, dtype, H, V, N): the point a result row belongs to."""
    return (row["op"], row["dtype"], row["H"], row["V"], row["N"])


def group_points(rows):
    """OrderedDict point key -> {contender: row}, in the order the rows came in."""
    out = OrderedDict()
    for r in rows:
        out.setdefault(point_key(r), OrderedDict())[r["contender"]] = r
    return out


def best_peer(by_name):
    """The fastest peer row that ran ok (not ours, not the floor), or None."""
    peers = [r for name, r in by_name.items() if name not in PEER_EXCLUDE and r["status"] == "ok"]
    return min(peers, key=lambda r: r["time_ms"]) if peers else None


def _status_cell(r):
    if r["status"] == "ok":
        return "ok"
    note = r.get("note") or ""
    if r["status"] == "n/a":
        return note if note.startswith("n/a") else f"n/a: {note}"
    return f"{r['status']}: {note}" if note else r["status"]


# --------------------------------------------------------------------------- targets

def targets(rows, device_type: str) -> list[str]:
    """The issue's targets, evaluated on these rows: one line per (target, point)."""
    lines = []
    points = group_points(rows)
    if device_type == "cuda":
        for key, by in points.items():
            op, dtype, h, v, n = key
            ours = by.get("ours")
            if not ours or ours["status"] != "ok":
                continue
            shape = f"{op} N={n} V={v} H={h} {dtype}"
            if op == "evidence":
                xf = ours.get("x_floor")
                if xf is not None:
                    lines.append(f"- three-context forward within 1.12x of its three bare products, {shape}: "
                                 f"{xf:.2f}x -> {'MET' if xf <= 1.12 else 'NOT MET'}")
                sp = ours.get("speedup_vs_best_peer")
                if sp is not None:
                    lines.append(f"- three-context forward >= 1.5x faster than the best peer "
                                 f"({ours.get('best_peer')}), {shape}: {sp:.2f}x -> "
                                 f"{'MET' if sp >= 1.5 else 'NOT MET'}")
            if op == "ppo_loss" and ours.get("x_floor") is not None:
                xf = ours["x_floor"]
                lines.append(f"- PPO loss fwd+bwd within 1.15x of its three products, {shape}: "
                             f"{xf:.2f}x -> {'MET' if xf <= 1.15 else 'NOT MET'}")
            if op == "ppo_loss":
                for peer in ("cce", "liger-grpo", "liger-flce"):
                    r = by.get(peer)
                    if r and r["status"] == "ok":
                        ratio = r["time_ms"] / ours["time_ms"]
                        lines.append(f"- fused PPO loss fwd+bwd faster than {peer}, {shape}: ours "
                                     f"{ours['time_ms']:.2f} ms vs {r['time_ms']:.2f} ms ({ratio:.2f}x) -> "
                                     f"{'MET' if ratio > 1 else 'NOT MET'}")
            naive = by.get("naive")
            if naive and naive["status"] == "ok" and naive.get("peak_extra_mb") and ours.get("peak_extra_mb") is not None:
                pct = 100.0 * ours["peak_extra_mb"] / naive["peak_extra_mb"]
                lines.append(f"- extra memory <= 2% of the naive path, {shape}: {ours['peak_extra_mb']:.1f} MB vs "
                             f"{naive['peak_extra_mb']:.0f} MB ({pct:.2f}%) -> {'MET' if pct <= 2 else 'NOT MET'}")
            elif naive and naive["status"] == "oom":
                lines.append(f"- extra memory <= 2% of the naive path, {shape}: naive ran out of memory, "
                             f"ours {ours['peak_extra_mb']:.1f} MB -> MET (naive OOM)")
    else:
        for key, by in points.items():
            op, dtype, h, v, n = key
            if not (v == 32_000 and n == 4096):
                continue
            ours, naive = by.get("ours"), by.get("naive")
            if not (ours and naive and ours["status"] == "ok" and naive["status"] == "ok"):
                continue
            shape = f"{op} N={n} V={v} H={h} {dtype}"
            if naive.get("peak_extra_mb") and ours.get("peak_extra_mb") is not None:
                pct = 100.0 * ours["peak_extra_mb"] / naive["peak_extra_mb"]
                lines.append(f"- chunked peak memory <= 10% of naive, {shape}: {ours['peak_extra_mb']:.0f} MB vs "
                             f"{naive['peak_extra_mb']:.0f} MB ({pct:.1f}%) -> {'MET' if pct <= 10 else 'NOT MET'}")
            ratio = naive["time_ms"] / ours["time_ms"]
            lines.append(f"- chunked no slower than naive, {shape}: {ours['time_ms']:.0f} ms vs "
                         f"{naive['time_ms']:.0f} ms (naive/ours {ratio:.2f}x) -> "
                         f"{'MET' if ratio >= 1 else 'NOT MET'}")
            peer = best_peer({k: r for k, r in by.items() if k != "naive"})
            if op in ("logprobs_grad", "ppo_loss") and peer:
                sp = peer["time_ms"] / ours["time_ms"]
                lines.append(f"- no slower than the best peer ({peer['contender']}), {shape}: "
                             f"{ours['time_ms']:.0f} ms vs {peer['time_ms']:.0f} ms ({sp:.2f}x) -> "
                             f"{'MET' if sp >= 1 else 'NOT MET'}")
            xf = ours.get("x_floor")
            if op in ("logprobs_grad", "ppo_loss") and xf is not None:
                limit = 1.1 if dtype == "fp32" else 1.3
                what = "three products" if op == "ppo_loss" else "four products (fwd, recompute, dh, dW)"
                lines.append(f"- within {limit}x of its {what}, {shape}: {xf:.2f}x -> "
                             f"{'MET' if xf <= limit else 'NOT MET'}")
    return lines


# --------------------------------------------------------------------------- markdown

def summary_table(rows) -> list[str]:
    """Markdown table: one line per point (ours, the best peer, memory against naive)."""
    out = ["| op | N | V | H | dtype | ours ms | ours x floor | best peer | peer ms | speed-up | "
           "ours MB | naive MB | ours/naive mem |",
           "|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for key, by in group_points(rows).items():
        op, dtype, h, v, n = key
        ours, naive = by.get("ours"), by.get("naive")
        peer = best_peer(by)
        o_ok = ours is not None and ours["status"] == "ok"
        mem_pct = None
        if o_ok and naive and naive["status"] == "ok" and naive.get("peak_extra_mb"):
            if ours.get("peak_extra_mb") is not None:
                mem_pct = f"{100.0 * ours['peak_extra_mb'] / naive['peak_extra_mb']:.1f}%"
        naive_mem = (_fmt(naive.get("peak_extra_mb")) if naive and naive["status"] == "ok"
                     else (naive["status"] if naive else "-"))
        out.append("| " + " | ".join([
            op, str(n), str(v), str(h), dtype,
            _fmt(ours["time_ms"]) if o_ok else (ours["status"] if ours else "-"),
            _fmt(ours.get("x_floor")) if o_ok else "-",
            peer["contender"] if peer else "-",
            _fmt(peer["time_ms"]) if peer else "-",
            (f"{ours['speedup_vs_best_peer']:.2f}x" if o_ok and ours.get("speedup_vs_best_peer") else "-"),
            _fmt(ours.get("peak_extra_mb")) if o_ok else "-",
            naive_mem,
            mem_pct or "-",
        ]) + " |")
    return out


def full_table(rows, op) -> list[str]:
    """Markdown table of every contender of one op at every point."""
    out = ["| N | V | H | dtype | contender | time ms | TFLOP/s | x floor | peak extra MB | max diff | "
           "speed-up vs best peer | status |",
           "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["op"] != op:
            continue
        diff = r.get("max_diff")
        if r.get("grad_rel_err") is not None:
            diff = f"{_fmt(diff)} (grad {_fmt(r['grad_rel_err'])})"
        else:
            diff = _fmt(diff)
        out.append("| " + " | ".join([
            str(r["N"]), str(r["V"]), str(r["H"]), r["dtype"], r["contender"],
            _fmt(r.get("time_ms")), _fmt(r.get("tflops")), _fmt(r.get("x_floor")),
            _fmt(r.get("peak_extra_mb")), diff,
            f"{r['speedup_vs_best_peer']:.2f}x" if r.get("speedup_vs_best_peer") else "-",
            _status_cell(r).replace("|", "/"),
        ]) + " |")
    return out


def markdown(meta, rows, descriptions) -> str:
    """The whole results.md: header, contenders, summary, targets and one table per op."""
    lines = [f"# Kernel benchmarks: {meta['device']}", "",
             f"- date: {meta['date']}",
             f"- command: `{meta['command']}` (size `{meta['size']}`)",
             f"- git commit: {meta['git_commit']}{' (dirty tree)' if meta.get('git_dirty') else ''}",
             f"- torch {meta['versions'].get('torch')}, triton {meta['versions'].get('triton')}, "
             f"liger-kernel {meta['versions'].get('liger-kernel')}, "
             f"cut-cross-entropy {meta['versions'].get('cut-cross-entropy')}",
             f"- threads: {meta.get('threads')}; timing: {meta['timing_method']}",
             f"- load average (1, 5, 15 min) at start {meta.get('load_average_start')}, at end "
             f"{meta.get('load_average_end')}: on a machine busy with other work, CPU times are slower "
             f"and noisier",
             f"- memory: {meta['memory_method']}",
             f"- wall time of the session: {meta.get('wall_s', 0):.0f} s", "",
             "Contenders:", ""]
    lines += [f"- `{k}`: {v}" for k, v in descriptions.items()]
    lines += ["", "Columns: time = median; TFLOP/s counts 2·N·V·H per LM-head product the op must do "
              "(1 logprobs and ppo_loss_fwd, 4 logprobs_grad, 3 evidence, 3 ppo_loss, 4 self_distill); x floor = time / the bare matmul products' time; "
              "peak extra = peak memory during one call minus the memory held before it (inputs "
              "excluded, outputs and gradients included); max diff = largest |difference| from ours "
              "(loss: |Δloss|, grad = relative Frobenius error of dh and dW); speed-up = best peer's "
              "time / ours.", "", "## Summary", ""]
    lines += summary_table(rows)
    tl = targets(rows, meta["device_type"])
    lines += ["", "## Targets (reported, not asserted)", ""]
    lines += tl or ["- no row of this run is a target point"]
    for op in ALL_OPS:
        if any(r["op"] == op for r in rows):
            lines += ["", f"## {OPS_TITLE[op]}", ""] + full_table(rows, op)
    return "\n".join(lines) + "\n"


def summary_lines(rows) -> list[str]:
    """One line per point for the terminal summary."""
    out = []
    for key, by in group_points(rows).items():
        op, dtype, h, v, n = key
        ours, naive = by.get("ours"), by.get("naive")
        peer = best_peer(by)
        s = f"{op:9s} N={n:<6d} V={v:<6d} H={h:<5d} {dtype}: "
        if ours and ours["status"] == "ok":
            s += f"ours {ours['time_ms']:.1f} ms"
            if ours.get("x_floor"):
                s += f" ({ours['x_floor']:.2f}x floor)"
            if peer:
                s += (f", best peer {peer['contender']} {peer['time_ms']:.1f} ms "
                      f"(speed-up of ours {peer['time_ms'] / ours['time_ms']:.2f}x)")
            if naive and naive["status"] == "ok" and naive.get("peak_extra_mb") and ours.get("peak_extra_mb") is not None:
                s += (f"; mem ours {ours['peak_extra_mb']:.0f} MB vs naive {naive['peak_extra_mb']:.0f} MB "
                      f"({100 * ours['peak_extra_mb'] / naive['peak_extra_mb']:.1f}%)")
            elif naive:
                s += f"; naive {naive['status']}"
        else:
            s += f"ours {ours['status'] if ours else 'missing'}"
        bad = [f"{name}={r['status']}" for name, r in by.items()
               if r["status"] not in ("ok", "oom", "n/a", "skipped")]
        if bad:
            s += "  [" + ", ".join(bad) + "]"
        out.append(s)
    return out


# --------------------------------------------------------------------------- plots

def plot(out_dir, rows) -> list[str]:
    """One PNG per op: time and peak extra memory against N, one line per contender,
    one row of panels per (dtype, H, V)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception as e:
        raise RuntimeError(f"matplotlib not importable, no plots written ({type(e).__name__}: {e})") from e
    written = []
    for op in ALL_OPS:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        heads = list(OrderedDict.fromkeys((r["dtype"], r["H"], r["V"]) for r in op_rows))
        ns = sorted({r["N"] for r in op_rows})
        names = list(OrderedDict.fromkeys(r["contender"] for r in op_rows))
        fig, axes = plt.subplots(len(heads), 2, figsize=(11, 3.6 * len(heads)), squeeze=False)
        for i, (dtype, h, v) in enumerate(heads):
            for name in names:
                pts = sorted((r["N"], r["time_ms"], r.get("peak_extra_mb")) for r in op_rows
                             if r["contender"] == name and (r["dtype"], r["H"], r["V"]) == (dtype, h, v)
                             and r["status"] == "ok" and r.get("time_ms"))
                if not pts:
                    continue
                style = dict(marker="o", linewidth=2.5 if name == "ours" else 1.3,
                             linestyle="--" if name == "floor" else "-")
                axes[i][0].plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
                mem = [(p[0], p[2]) for p in pts if p[2] is not None and p[2] > 0]
                if mem:
                    axes[i][1].plot([p[0] for p in mem], [p[1] for p in mem], label=name, **style)
            for j, ylabel in enumerate(("time (ms, median)", "peak extra memory (MiB)")):
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                ax.set_xticks(ns)
                ax.set_xticklabels([f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in ns])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.set_yscale("log")
                ax.set_xlabel("N (response tokens)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{op}: V={v} H={h} {dtype}", fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=8)
        fig.suptitle(OPS_TITLE[op])
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(out_dir, meta, rows, descriptions) -> list[str]:
    """Write results.json, results.md and the PNGs into out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump({**meta, "contenders": descriptions, "rows": rows}, f, indent=1, default=str)
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path, "w") as f:
        f.write(markdown(meta, rows, descriptions))
    return [json_path, md_path] + plot(out_dir, rows)
