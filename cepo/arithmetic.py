"""The built-in task: seeded multi-step integer arithmetic with worked solutions.

A problem is an expression of 2-3 operations over small integers, e.g. ``(7+5)*3-4``
(``n_ops`` asks for longer ones: the second setting, where the decisive results are a
smaller share of a longer response). The solution evaluates it one operation per line
(``7+5=12``, ``12*3=36``, ``36-4=32``) and ends with ``\\boxed{32}``: every intermediate
result is a decisive token, which is what token-level credit (CEPO) should find.

Three splits, disjoint by construction whatever the seed: a problem's split is a
function of its canonical text (``split_of``).

- ``dev`` (~20% of problems): for choosing settings (sweeps, the embedded default). It is
  exactly the set that was called ``test`` before the dev/test separation, so results
  measured on the old "test" split (the embedded default's held-out set, results/ up to
  the statistical comparison, the tiny model's README figures) are dev figures.
- ``test`` (~16%): for the reported comparison only; no setting was chosen on it. It is
  carved out of what used to be train, less the problems the shipped tiny model was
  trained on (``SHIPPED_MODEL_TRAIN``), so that model never saw a test problem.
- ``train`` (the rest). ``make_split("train", n, 0)`` for n <= 20000 is unchanged by the
  carve-out (those problems are exactly the ones kept in train), so the embedded default
  run (seed 0) trains on the same problems as before; other seeds lose the ~20% of their
  old train problems that are now test and draw replacements.
"""

from __future__ import annotations

import functools
import hashlib
import random

OPS = "+-*"
SPLITS = ("train", "dev", "test")
SHIPPED_MODEL_TRAIN = (20000, 0)
"""(n, seed) of the train split that scripts/build_tiny_model.py trained the shipped model
on (its defaults): those problems stay in train."""
MAX_OPS = 12


def _hash(expr: str) -> tuple[int, int]:
    digest = hashlib.sha256(expr.encode()).hexdigest()
    return int(digest[:8], 16), int(digest[8:16], 16)


@functools.cache
def _shipped_model_train() -> frozenset[str]:
    """The prompts of the shipped model's supervised training set, replayed with the
    two-way split it was drawn from (held out: the first hash digit mod 5 == 0)."""
    n, seed = SHIPPED_MODEL_TRAIN
    rng, seen = random.Random(f"{seed}-train"), set()
    while len(seen) < n:
        expr = random_problem(rng)[0]
        if _hash(expr)[0] % 5 != 0:
            seen.add(expr)
    return frozenset(seen)


def split_of(expr: str) -> str:
    """"dev", "test" or "train" for a problem's text: a pure function of the text.

    dev: first hash digit mod 5 == 0 (the old "test" split, unchanged); test: otherwise
    second hash digit mod 5 == 0, unless the shipped model trained on it; else train."""
    first, second = _hash(expr)
    if first % 5 == 0:
        return "dev"
    if second % 5 == 0 and expr not in _shipped_model_train():
        return "test"
    return "train"


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _check_n_ops(n_ops, who: str) -> None:
    if n_ops is not None and (isinstance(n_ops, bool) or not isinstance(n_ops, int)
                              or not 1 <= n_ops <= MAX_OPS):
        raise ValueError(f"{who}: n_ops must be None (2 or 3) or an int in [1, {MAX_OPS}], "
                         f"got {n_ops!r}")


def random_problem(rng: random.Random, n_ops: int | None = None) -> tuple[str, list[str], int]:
    """(expression, solution steps, value) with ``n_ops`` operations (None: 2 or 3, drawn)
    applied left to right.

    The first operation is parenthesised when a later one binds tighter, so the written
    expression always means the left-to-right evaluation shown in the steps.
    """
    _check_n_ops(n_ops, "random_problem")
    if n_ops is None:
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


def _draw_test(rng: random.Random, n_ops: int | None) -> tuple[str, list[str], int]:
    """A test problem, its operation count drawn first and then kept while the problem is
    redrawn until it is a test problem. The shipped model trained on about half of all
    train-side 2-operation problems (they are few: ~19k in all), so plain rejection would
    make test ~25% 2-operation against ~45% in dev and train; drawing the count first keeps
    the mix of the other splits."""
    _check_n_ops(n_ops, "make_split")
    ops = rng.choice((2, 3)) if n_ops is None else n_ops
    for _ in range(100_000):
        problem = random_problem(rng, ops)
        if split_of(problem[0]) == "test":
            return problem
    raise ValueError(f"make_split: no test problem with {ops} operations found")


def make_example(expr: str, steps: list[str], value: int) -> dict:
    """The dataset row: prompt, answer and the worked solution ending in \\boxed{}."""
    return {"prompt": expr, "answer": str(value), "solution": "\n".join(steps) + f"\n\\boxed{{{value}}}"}


def make_split(split: str, n: int, seed: int, n_ops: int | None = None) -> list[dict]:
    """n distinct problems of one split (a list of {"prompt", "answer", "solution"}), with
    ``n_ops`` operations each (None: 2 or 3, the task the tiny model was trained on).

    Deterministic for a given (split, n, seed, n_ops); a smaller n gives a prefix of a
    larger one. Which split a problem belongs to depends on the problem only
    (``split_of``), so train, dev and test never share a problem whatever the seeds.
    """
    if split not in SPLITS:
        raise ValueError(f"make_split: split must be one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"make_split: n must be an int >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"make_split: seed must be an int, got {seed!r}")
    _check_n_ops(n_ops, "make_split")
    # the rng stream of the 2-3 operation task is keyed as before the dev/test separation
    # ("test" then named what is now dev), so its problems are drawn in the same order
    stream = "test" if split == "dev" else "heldout-test" if split == "test" else split
    rng = random.Random(f"{seed}-{stream}" if n_ops is None else f"{seed}-{stream}-ops{n_ops}")
    seen, rows = set(), []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 200 * (n + 10):
            raise ValueError(f"make_split: cannot find {n} distinct {split} problems")
        if split == "test":
            expr, steps, value = _draw_test(rng, n_ops)
        else:
            expr, steps, value = random_problem(rng, n_ops)
        if expr in seen or split_of(expr) != split:
            continue
        seen.add(expr)
        rows.append(make_example(expr, steps, value))
    return rows
