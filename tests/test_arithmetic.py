"""The built-in arithmetic task."""

import re

import pytest

from cepo.answers import extract_boxed
from cepo.arithmetic import SHIPPED_MODEL_TRAIN, SPLITS, make_split, split_of


def test_deterministic_and_distinct():
    a = make_split("train", 300, seed=3)
    assert a == make_split("train", 300, seed=3)
    assert a != make_split("train", 300, seed=4)
    assert len({r["prompt"] for r in a}) == 300
    assert make_split("train", 100, seed=3) == a[:100]  # a smaller n is a prefix
    assert make_split("test", 50, seed=3) == make_split("test", 50, seed=3)
    assert make_split("dev", 50, seed=3) == make_split("dev", 50, seed=3)


def test_splits_are_disjoint_whatever_the_seed():
    sets = {split: {r["prompt"] for s in range(3) for r in make_split(split, n, seed=s)}
            for split, n in (("train", 2000), ("dev", 500), ("test", 500))}
    assert not sets["train"] & sets["dev"] and not sets["train"] & sets["test"]
    assert not sets["dev"] & sets["test"]
    for split, prompts in sets.items():
        assert {split_of(p) for p in prompts} == {split}
    long = {split: {r["prompt"] for r in make_split(split, 200, seed=1, n_ops=6)} for split in SPLITS}
    assert not long["train"] & long["dev"] and not long["train"] & long["test"]
    assert not long["dev"] & long["test"]


def test_split_fractions():
    """dev ~20% of problems (as the old held-out split), test ~16%, train the rest."""
    import random

    from cepo.arithmetic import random_problem
    rng = random.Random(7)
    drawn = [split_of(random_problem(rng, 3)[0]) for _ in range(4000)]
    assert 0.17 < drawn.count("dev") / 4000 < 0.23
    assert 0.13 < drawn.count("test") / 4000 < 0.19


def test_dev_is_the_old_test_split_and_seed0_train_is_unchanged():
    """Pinned problems, generated before the dev/test separation: the old "test" split is
    now "dev" (the embedded default's held-out set is unchanged), and the shipped model's
    training set (and so the default run's, seed 0) is still train."""
    assert [r["prompt"] for r in make_split("dev", 3, seed=0)] == OLD_TEST_SEED0
    assert [r["prompt"] for r in make_split("train", 3, seed=0)] == OLD_TRAIN_SEED0
    n, seed = SHIPPED_MODEL_TRAIN
    shipped = make_split("train", n, seed)
    # sha256 of the prompts joined by newlines, computed with the code before the separation
    assert _digest(make_split("dev", 200, seed=0)) == "b3538546c1c4f765"  # the default's eval set
    assert _digest(shipped) == "9cfd4cb529e35f1f"
    assert len(shipped) == n and shipped[:3] == make_split("train", 3, seed)
    test = {r["prompt"] for r in make_split("test", 1000, seed=0)}
    assert not test & {r["prompt"] for r in shipped}  # the shipped model never saw a test problem


def test_test_split_keeps_the_mix_of_problem_lengths():
    """Test problems are drawn with their operation count first: about half have 2
    operations, as in dev, although the shipped model trained on half the 2-operation ones."""
    for split in ("dev", "test"):
        rows = make_split(split, 400, seed=0)
        two = sum(r["solution"].count("=") == 2 for r in rows) / len(rows)
        assert 0.42 < two < 0.56, (split, two)


def _digest(rows):
    import hashlib
    return hashlib.sha256("\n".join(r["prompt"] for r in rows).encode()).hexdigest()[:16]


OLD_TEST_SEED0 = ['3+12+18', '3-7+4', '3*6-13+6']  # make_split("test", 3, 0) before
OLD_TRAIN_SEED0 = ['(6-17)*8', '9+14+16+15', '4+6+10']  # make_split("train", 3, 0) before


@pytest.mark.parametrize("n_ops", [1, 4, 6, 12])
def test_longer_problems_are_correct(n_ops):
    rows = make_split("test", 60, seed=2, n_ops=n_ops)
    assert len({r["prompt"] for r in rows}) == 60
    for row in rows:
        _check_solution(row, n_ops)
    assert make_split("test", 60, seed=2, n_ops=n_ops) == rows  # deterministic
    assert make_split("test", 20, seed=2, n_ops=n_ops) == rows[:20]


def _check_solution(row, n_ops=None):
    lines = row["solution"].split("\n")
    value = None
    for step in lines[:-1]:
        m = re.fullmatch(r"(-?\d+)([+\-*])(\d+)=(-?\d+)", step)
        assert m, step
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert c == eval(f"{a}{op}{b}")
        assert value is None or a == value  # each step starts from the previous result
        value = c
    assert eval(row["prompt"]) == value == int(row["answer"])
    assert extract_boxed(row["solution"]) == row["answer"]
    assert len(lines) - 1 == n_ops if n_ops else len(lines) >= 3  # >= 2 intermediate results
    assert set(row) == {"prompt", "answer", "solution"}
    assert "\n" not in row["prompt"]  # the hint separator "\n\n" stays unambiguous


def test_solutions_are_correct():
    for row in (make_split("train", 500, seed=0) + make_split("dev", 200, seed=0)
                + make_split("test", 200, seed=0)):
        _check_solution(row)


@pytest.mark.parametrize("args, name", [(("val", 3, 0), "split"), (("train", -1, 0), "n"),
                                        (("train", 2.5, 0), "n"), (("train", True, 0), "n"),
                                        (("train", 3, "0"), "seed"), (("train", 3, 1.5), "seed"),
                                        (("test", 3, 0, 0), "n_ops"), (("test", 3, 0, 13), "n_ops"),
                                        (("dev", 3, 0, 2.0), "n_ops")])
def test_bad_arguments(args, name):
    with pytest.raises(ValueError, match=f"{name} must"):
        make_split(*args)


def test_trainer_options_choose_split_and_length():
    """--eval_split picks the built-in held-out split (dev by default: the embedded default
    is unchanged); --arith_ops sets the operations of train and held-out problems."""
    from cepo.build import load_datasets
    from cepo.config import parse_config

    train, evals = load_datasets(parse_config(["--num_train", "30", "--num_eval", "20"]))
    assert [e.prompt for e in evals] == [r["prompt"] for r in make_split("dev", 20, seed=0)]
    assert [e.prompt for e in train] == [r["prompt"] for r in make_split("train", 30, seed=0)]
    cfg = parse_config(["--num_train", "30", "--num_eval", "20", "--eval_split", "test",
                        "--arith_ops", "5", "--seed", "3"])
    train, evals = load_datasets(cfg)
    assert [e.prompt for e in evals] == [r["prompt"] for r in make_split("test", 20, 0, n_ops=5)]
    assert [e.answer for e in train] == [r["answer"] for r in make_split("train", 30, 3, n_ops=5)]
    for bad in (["--arith_ops", "0"], ["--arith_ops", "13"]):
        with pytest.raises(ValueError, match="'arith_ops' must be between 1 and 12"):
            parse_config(bad)
    with pytest.raises(SystemExit):
        parse_config(["--eval_split", "val"])
