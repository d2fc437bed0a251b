"""What the model wrote: a sample of rollouts and the evaluation responses, as JSON lines.

Numbers alone hide reward bugs (a verifier that accepts a restated question, a policy
that learned to game it); reading the responses finds them. Every ``samples_every``
steps the trainer appends up to ``samples_per_step`` rollouts of that step to
``samples.jsonl``; every evaluation appends its responses to ``eval_samples.jsonl``.
Each line: step, prompt, response, extracted answer, gold answer, reward, verifier
status, advantage (training rollouts), truncated. Main rank only: rollouts of other ranks
are gathered to it first.
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_FIELD_CHARS = 4000
"""A field longer than this is cut (with a marker): a megabyte response must not bloat the log."""


def _cut(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_FIELD_CHARS:
        return text
    return text[:MAX_FIELD_CHARS] + f"... [{len(text) - MAX_FIELD_CHARS} more characters]"


def sample_record(step: int, *, prompt: str, response: str, extracted: str | None, gold: str,
                  reward: float, status: str, truncated: bool,
                  advantage: float | None = None) -> dict:
    """One samples.jsonl row (long texts cut to MAX_FIELD_CHARS)."""
    row = {"step": step, "prompt": _cut(prompt), "response": _cut(response),
           "extracted": _cut(extracted), "gold": gold, "reward": reward, "status": status,
           "truncated": truncated}
    if advantage is not None:
        row["advantage"] = advantage
    return row


def gather_to_main(rows: list[dict]) -> list[dict]:
    """All ranks' rows on rank 0 (rank order), [] elsewhere; a no-op for one process."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return rows
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    return [r for part in gathered for r in part] if gathered is not None else []


class SampleWriter:
    """Appends rows to a JSONL file and, when given, shows a few as text in TensorBoard
    (``add_text``) or Weights & Biases (a table)."""

    def __init__(self, path: Path, *, enabled: bool, tensorboard=None, wandb_run=None,
                 shown: int = 4):
        self.path = Path(path)
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.wandb_run = wandb_run
        self.shown = shown

    def write(self, step: int, rows: list[dict], tag: str) -> None:
        """Append ``rows``; show the first ``shown`` under ``tag`` in TB / W&B."""
        if not self.enabled or not rows:
            return
        with self.path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        shown = rows[: self.shown]
        if self.tensorboard is not None:
            text = "\n\n".join(
                f"**gold** {r['gold']} | **extracted** {r['extracted']} | **reward** "
                f"{r['reward']} | **status** {r['status']}\n\n```\n{r['response']}\n```"
                for r in shown)
            self.tensorboard.add_text(tag, text, step)
        if self.wandb_run is not None:
            import wandb
            cols = ["prompt", "response", "extracted", "gold", "reward", "status"]
            table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in shown])
            self.wandb_run.log({tag: table}, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows of steps after ``step`` (written after the checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        from cepo.metrics import complete_json_lines

        kept = [line for line, row in complete_json_lines(self.path.read_text())
                if row.get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))
