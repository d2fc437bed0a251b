"""Token-credit maps: response tokens coloured by the contrastive evidence delta (and by the
final token weight), as HTML and PNG, plus |delta| on decisive versus template tokens.

Reads the ``evidence_rank*.jsonl`` files a run writes with ``--dump_evidence true``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path


def read_evidence(run_dir: Path) -> list[dict]:
    """All dumped rollouts of a run (every rank), in step order."""
    rows = []
    for path in sorted(Path(run_dir).glob("evidence_rank*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["step"])


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token (special tokens shown by name)."""
    return [tokenizer.decode([i]) for i in ids]


def decisive_mask(texts: list[str]) -> list[bool]:
    """Decisive tokens of a worked arithmetic solution: the characters of each
    intermediate result (after '=' up to the end of the line) and of the boxed answer.
    Everything else (operands, operators, newlines, markup, EOS) is template. Works for
    any tokenisation: the state follows the decoded text so far."""
    out, after_eq, in_box, seen = [], False, False, ""
    for t in texts:
        if in_box and "}" in t:
            in_box = False
            out.append(False)
        else:
            out.append((after_eq or in_box) and any(c.isdigit() or c == "-" for c in t))
        seen += t
        if "\n" in t:
            after_eq = False
        if t.endswith("="):
            after_eq = True
        if seen.endswith("\\boxed{"):
            in_box = True
    return out


def decisive_stats(rows: list[dict], tokenizer) -> dict:
    """Mean |delta| over decisive and over template tokens (and their counts)."""
    sums = {"decisive": [0.0, 0], "template": [0.0, 0]}
    for r in rows:
        for is_dec, d in zip(decisive_mask(token_texts(tokenizer, r["tokens"])), r["delta"]):
            key = "decisive" if is_dec else "template"
            sums[key][0] += abs(d)
            sums[key][1] += 1
    return {f"mean_abs_delta_{k}": (s / n if n else None) for k, (s, n) in sums.items()} | \
        {f"tokens_{k}": n for k, (_, n) in sums.items()}


def _colour(value: float, scale: float) -> str:
    """Red for negative, green for positive, white at zero."""
    x = max(-1.0, min(1.0, value / scale)) if scale else 0.0
    if x >= 0:
        return f"rgb({int(255 * (1 - x))},255,{int(255 * (1 - x))})"
    return f"rgb(255,{int(255 * (1 + x))},{int(255 * (1 + x))})"


def pick_rollouts(rows: list[dict], n_correct: int = 2, n_wrong: int = 2) -> list[dict]:
    """A few correct and wrong rollouts from the earliest dumped step (lambda largest)."""
    first = [r for r in rows if r["step"] == rows[0]["step"]] if rows else []
    good = [r for r in first if r["correct"]][:n_correct]
    bad = [r for r in first if not r["correct"] and r["has_negative"]][:n_wrong]
    return good + bad


def render_html(examples: dict[str, list[dict]], tokenizer, out: Path) -> Path:
    """An HTML page: per algorithm, each rollout's tokens coloured by delta, then by weight."""
    parts = ["<html><head><meta charset='utf-8'><style>body{font-family:monospace}"
             "span{padding:1px;white-space:pre}</style></head><body>",
             "<h2>Token credit: colour = delta (green +, red -), second row = token weight</h2>"]
    for algo, rows in examples.items():
        parts.append(f"<h3>{html.escape(algo)}</h3>")
        scale = max((abs(d) for r in rows for d in r["delta"]), default=1.0) or 1.0
        for r in rows:
            texts = token_texts(tokenizer, r["tokens"])
            head = f"{'correct' if r['correct'] else 'wrong'}, A = {r['advantage']:+.2f}"
            parts.append(f"<p><b>{head}</b><br>")
            for kind, values, sc in (("delta", r["delta"], scale), ("weight", r["weight"], None)):
                for t, v in zip(texts, values):
                    c = _colour(v, sc) if kind == "delta" else _colour(v - 1.0, 0.2)
                    parts.append(f"<span style='background:{c}' title='{kind}={v:.3f}'>"
                                 f"{html.escape(t.replace(chr(10), '⏎'))}</span>")
                parts.append("<br>")
            parts.append("</p>")
    parts.append("</body></html>")
    out.write_text("".join(parts))
    return out


def render_png(examples: dict[str, list[dict]], tokenizer, out: Path) -> Path:
    """The same map as a PNG: one row of coloured token boxes per rollout."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    lines = [(algo, r) for algo, rows in examples.items() for r in rows]
    width = max((len(r["tokens"]) for _, r in lines), default=1)
    fig, ax = plt.subplots(figsize=(max(8, 0.32 * width + 3), 0.55 * len(lines) + 1))
    scale = max((abs(d) for _, r in lines for d in r["delta"]), default=1.0) or 1.0
    norm = TwoSlopeNorm(vmin=-scale, vcenter=0.0, vmax=scale)
    cmap = plt.get_cmap("RdYlGn")
    for y, (algo, r) in enumerate(lines):
        for x, (t, d) in enumerate(zip(token_texts(tokenizer, r["tokens"]), r["delta"])):
            ax.add_patch(plt.Rectangle((x, -y - 0.45), 1, 0.9, color=cmap(norm(d))))
            ax.text(x + 0.5, -y, t.replace("\n", "⏎").replace("\\boxed{", "▢{")[:3], ha="center",
                    va="center", fontsize=7, family="monospace")
        ax.text(-0.5, -y, f"{algo} {'✓' if r['correct'] else '✗'} A={r['advantage']:+.1f}",
                ha="right", va="center", fontsize=8)
    ax.set_xlim(-9, width)
    ax.set_ylim(-len(lines) + 0.4, 0.6)
    ax.axis("off")
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, fraction=0.02, label="delta")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
