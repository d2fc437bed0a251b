"""The figures of a shipped tiny model's card (cepo/assets/*/README.md): how well it solves
held-out problems, how often its samples mix right and wrong answers (RL's signal), and how
it uses a correct or a wrong answer as a hint (CEPO's two teachers)."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch

Answers = Callable[..., list[list[str | None]]]
"""``answers(hints, samples=1, temperature=0.0, batch_size=...)``: per row, the boxed answers of
``samples`` responses to the row's prompt with ``hints[i]`` appended as the trainer's teacher
does (None: no hint); greedy when temperature is 0."""


def card_figures(rows: Sequence[dict], answers: Answers, seed: int, *,
                 sample_batch_size: int = 64) -> dict:
    """Every figure the card reports, on ``rows`` (dicts with "answer").

    The wrong hint is what the trainer uses: a wrong answer the model itself sampled for the
    problem (its most frequent one), or answer + 7 where all 8 samples were right.
    """
    n = len(rows)
    none = [None] * n
    greedy = answers(none)
    torch.manual_seed(seed)
    sampled = answers(none, samples=8, temperature=1.0, batch_size=sample_batch_size)
    correct = [sum(a == r["answer"] for a in s) for s, r in zip(sampled, rows)]
    hinted = answers([r["answer"] for r in rows])
    wrong = []
    for s, r in zip(sampled, rows):
        bad = Counter(a for a in s if a is not None and a != r["answer"])
        wrong.append(bad.most_common(1)[0][0] if bad else str(int(r["answer"]) + 7))
    wrong_out = answers(wrong)
    return {
        "test_problems": n,
        "greedy_accuracy": sum(a[0] == r["answer"] for a, r in zip(greedy, rows)) / n,
        "greedy_boxed_rate": sum(a[0] is not None for a in greedy) / n,
        "sample_accuracy_T1": sum(correct) / (8 * n),
        "pass_at_8_T1": sum(c > 0 for c in correct) / n,
        "mixed_groups_of_8_T1": sum(0 < c < 8 for c in correct) / n,
        "accuracy_with_correct_hint": sum(a[0] == r["answer"] for a, r in zip(hinted, rows)) / n,
        "accuracy_with_wrong_hint": sum(a[0] == r["answer"] for a, r in zip(wrong_out, rows)) / n,
        "wrong_hint_copy_rate": sum(a[0] == w for a, w in zip(wrong_out, wrong)) / n,
    }
