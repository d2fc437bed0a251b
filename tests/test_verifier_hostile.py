"""Outputs built to be slow cost little: refused by status, short log lines, and a
replaced worker is a fork of a server that already imported math-verify."""

import logging
import os
import sys

import pytest

from cepo.verifier import LOG_CHARS, Verifier, quiet_math_verify_logs, score_one

sys.path.insert(0, os.path.dirname(__file__))

# (response, status) with gold answer 34; statuses written by hand
HOSTILE = [
    ("\\boxed{2^{2^{2^{2^{2^{2}}}}}}", "too_complex"),
    ("\\boxed{9^{9^{9}}}", "too_complex"),
    ("\\boxed{10^{1000000}}", "too_complex"),
    ("\\boxed{9**9**9}", "too_complex"),
    ("\\boxed{(10^{6})!}", "too_complex"),
    ("\\boxed{1000!!!}", "too_complex"),
    ("\\boxed{\\binom{10^{9}}{10^{8}}}", "too_complex"),
    ("\\boxed{(x+y+z)^{50}}", "too_complex"),
    ("\\boxed{e^{e^{e^{e^{10}}}}}", "too_complex"),
    ("\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}", "too_complex"),
    ("\\boxed{" + "+".join(["1"] * 450) + "}", "too_complex"),
    ("\\boxed{" + "9" * 1_000_000 + "}", "too_long"),
    ("\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "too_long"),
    ("blah " * 120_000 + "\\boxed{34}", "too_long"),
    ("blah " * 90_000 + "\\boxed{34}", "ok"),
    ("\\boxed{1}\\boxed{2}" * 20_000, "wrong"),
    ("\\boxed{" * 50_000, "unparseable"),
    ("\\boxed{34}" * 30_000, "ok"),
]


@pytest.fixture(scope="module")
def pool():
    with Verifier(timeout_s=10, num_workers=2) as v:
        yield v


def test_hostile_outputs_get_their_status(pool):
    scores = pool.score([r for r, _ in HOSTILE], ["34"] * len(HOSTILE))
    assert [s.status for s in scores] == [st for _, st in HOSTILE]
    assert all(s.reward == 0.0 for s in scores if s.status != "ok")
    stats = pool.stats()
    assert stats["too_complex"] == 11 and stats["too_long"] == 3


def test_refused_statuses_in_process_match_the_pool():
    for response, status in HOSTILE[:3]:
        assert score_one(response, "34").status == status


def test_math_verify_log_lines_are_cut(caplog):
    quiet_math_verify_logs()
    with caplog.at_level(logging.WARNING, logger="math_verify.parser"):
        logging.getLogger("math_verify.parser").warning("Timeout during parsing: %s", "9" * 10**6)
    (record,) = caplog.records
    assert LOG_CHARS <= len(record.getMessage()) < LOG_CHARS + 100
    assert "more chars" in record.getMessage()


def test_timeout_log_line_is_cut_and_the_replacement_is_a_fork_of_the_server(caplog):
    with Verifier(timeout_s=1.0, num_workers=1, reward_fn="plugins_for_tests:hang") as v:
        assert v._ctx.get_start_method() == "forkserver"
        first = v._workers[0].proc.pid
        with caplog.at_level(logging.WARNING, logger="cepo.verifier"):
            scores = v.score(["hang " + "x" * 10**6, "ok 5"], ["1", "5"])
        assert [s.status for s in scores] == ["timeout", "ok"]
        (record,) = [r for r in caplog.records if "timeout" in r.getMessage()]
        assert len(record.getMessage()) < 2 * LOG_CHARS
        replacement = v._workers[0].proc.pid
        assert replacement != first
        with open(f"/proc/{replacement}/stat") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
        assert parent != os.getpid()  # forked by the forkserver, which preloaded math-verify


def test_forkserver_preloads_what_children_reimport(monkeypatch):
    import types

    from cepo import verifier

    script = types.ModuleType("__main__")
    script.__file__ = "/somewhere/cepo-train"
    script.__spec__ = None
    script.os = os
    script.main = verifier.score_one          # as in "from cepo.verifier import score_one"
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert verifier._main_imports() == ["cepo.verifier", "os"]
    script.__spec__ = types.SimpleNamespace(name="cepo.train")  # python -m cepo.train:
    script.score_one = verifier.score_one  # its imports, never the -m module itself
    script.train_step = types.SimpleNamespace(__module__="cepo.train")
    assert verifier._main_imports() == ["cepo.verifier", "os"]
    script.__spec__ = types.SimpleNamespace(name="pytest.__main__")  # children skip it
    assert verifier._main_imports() == []
