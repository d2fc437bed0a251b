"""The built-in task: seeded multi-step integer arithmetic with worked solutions.

A problem is an expression of 2-3 operations over small integers, e.g. ``(7+5)*3-4``.
The solution evaluates it one operation per line (``7+5=12``, ``12*3=36``, ``36-4=32``)
and ends with ``\\boxed{32}``: every intermediate result is a decisive token, which is
what token-level credit (CEPO) should find. Train and test are disjoint by construction:
a problem's split is a hash of its canonical text, whatever the seed.
"""

from __future__ import annotations

import hashlib
import random

OPS = "+-*"
SPLITS = ("train", "test")


def split_of(expr: str) -> str:
    """"test" for ~20% of all problems, "train" for the rest: a pure function of the text."""
    h = int(hashlib.sha256(expr.encode()).hexdigest()[:8], 16)
    return "test" if h % 5 == 0 else "train"


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def random_problem(rng: random.Random) -> tuple[str, list[str], int]:
    """(expression, solution steps, value) with 2 or 3 operations applied left to right.

    The first operation is parenthesised when a later one binds tighter, so the written
    expression always means the left-to-right evaluation shown in the steps.
    """
    n_ops = rng.choice((2, 3))
    value = rng.randint(1, 9)
    expr = str(value)
    steps = []
    prev_op = None
    for _ in range(n_ops):
        op = rng.choice(OPS)
        b = rng.randint(2, 9) if op == "*" else rng.randint(1, 19)
        if op == "*" and prev_op in ("+", "-"):
            expr = f"({expr})"
        new = _apply(value, op, b)
        steps.append(f"{value}{op}{b}={new}")
        expr = f"{expr}{op}{b}"
        value, prev_op = new, op
    return expr, steps, value


def make_example(expr: str, steps: list[str], value: int) -> dict:
    """The dataset row: prompt, answer and the worked solution ending in \\boxed{}."""
    return {"prompt": expr, "answer": str(value), "solution": "\n".join(steps) + f"\n\\boxed{{{value}}}"}


def make_split(split: str, n: int, seed: int) -> list[dict]:
    """n distinct problems of one split (a list of {"prompt", "answer", "solution"}).

    Deterministic for a given (split, n, seed); a smaller n gives a prefix of a larger
    one. Which split a problem belongs to depends on the problem only (``split_of``), so
    train and test never share a problem whatever the seeds.
    """
    if split not in SPLITS:
        raise ValueError(f"make_split: split must be one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"make_split: n must be an int >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"make_split: seed must be an int, got {seed!r}")
    rng = random.Random(f"{seed}-{split}")
    seen, rows = set(), []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 200 * (n + 10):
            raise ValueError(f"make_split: cannot find {n} distinct {split} problems")
        expr, steps, value = random_problem(rng)
        if expr in seen or split_of(expr) != split:
            continue
        seen.add(expr)
        rows.append(make_example(expr, steps, value))
    return rows
