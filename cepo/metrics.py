"""Metrics: metrics.jsonl always, TensorBoard and Weights & Biases when asked, a PNG at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    """Writes one JSON object per step to ``output_dir/metrics.jsonl`` (main rank only).

    On resume from a checkpoint taken after step k, rows of later steps (written after
    that checkpoint) are dropped, so the log never holds the same step twice.
    """

    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool = False,
                 wandb_project: str | None = None, config: dict | None = None,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [line for line, row in complete_json_lines(self.path.read_text())
                    if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("config: 'tensorboard' is true but tensorboard is not installed; "
                                 "pip install 'cepo[tensorboard]'") from e
            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("config: 'wandb_project' is set but wandb is not installed; "
                                 "pip install 'cepo[wandb]'") from e
            self._wandb = wandb.init(project=wandb_project, config=config or {},
                                     dir=str(output_dir), resume="allow")

    @property
    def tensorboard(self):
        """The TensorBoard SummaryWriter, or None."""
        return self._tb

    @property
    def wandb_run(self):
        """The Weights & Biases run, or None."""
        return self._wandb

    def log(self, step: int, values: dict) -> None:
        """Record ``values`` (numbers) for ``step``."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def complete_json_lines(text: str):
    """(line, row) for each complete JSON line; a line cut by a crash (the last one, half
    written when the process was killed) is skipped."""
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            yield line, json.loads(line)
        except json.JSONDecodeError:
            continue


def read_metrics(path: Path) -> list[dict]:
    """All complete rows of a metrics.jsonl file."""
    return [row for _, row in complete_json_lines(Path(path).read_text())]


CURVES = [("reward_mean", "reward"), ("accuracy", "train accuracy"), ("eval_accuracy", "held-out accuracy"),
          ("response_length", "response length"), ("entropy", "entropy"),
          ("delta_abs_correct", "|delta| correct"), ("delta_abs_wrong", "|delta| wrong"),
          ("lambda", "lambda"), ("clip_frac_high", "clip frac high"), ("step_seconds", "seconds/step")]


def plot_training_curves(metrics_path: Path, out_png: Path) -> Path:
    """A grid of the training curves in metrics.jsonl, saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    present = [(k, title) for k, title in CURVES if any(r.get(k) is not None for r in rows)]
    cols = 3
    nrows = max(1, math.ceil(len(present) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, present):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
