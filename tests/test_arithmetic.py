"""The built-in arithmetic task."""

import re

import pytest

from cepo.answers import extract_boxed
from cepo.arithmetic import make_split, split_of


def test_deterministic_and_distinct():
    a = make_split("train", 300, seed=3)
    assert a == make_split("train", 300, seed=3)
    assert a != make_split("train", 300, seed=4)
    assert len({r["prompt"] for r in a}) == 300
    assert make_split("train", 100, seed=3) == a[:100]  # a smaller n is a prefix
    assert make_split("test", 50, seed=3) == make_split("test", 50, seed=3)


def test_splits_are_disjoint_whatever_the_seed():
    train = {r["prompt"] for s in range(3) for r in make_split("train", 2000, seed=s)}
    test = {r["prompt"] for s in range(3) for r in make_split("test", 500, seed=s)}
    assert not train & test
    assert all(split_of(p) == "train" for p in train) and all(split_of(p) == "test" for p in test)


def test_solutions_are_correct():
    for row in make_split("train", 500, seed=0) + make_split("test", 200, seed=0):
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
        assert len(lines) >= 3  # at least two intermediate results
        assert set(row) == {"prompt", "answer", "solution"}
        assert "\n" not in row["prompt"]  # the hint separator "\n\n" stays unambiguous


@pytest.mark.parametrize("args, name", [(("val", 3, 0), "split"), (("train", -1, 0), "n"),
                                        (("train", 2.5, 0), "n"), (("train", True, 0), "n"),
                                        (("train", 3, "0"), "seed"), (("train", 3, 1.5), "seed")])
def test_bad_arguments(args, name):
    with pytest.raises(ValueError, match=f"{name} must"):
        make_split(*args)
