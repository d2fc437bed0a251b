"""Rewards: math-verify (or a user plug-in) in worker processes with a hard per-item timeout.

What is scored. The final answer is extracted from the response first
(``cepo.answers.extract_answer``, strict by default: the last complete ``\\boxed{}``); a
response without one is "unparseable" and scores 0, so restating the question earns
nothing. Only the extracted answer is parsed (math-verify's LaTeX parser) and compared
with the gold answer (``verify(gold, pred)``, gold first). An answer that offers several
candidates ("34 or 29", ``\\{29, 34\\}``, ``\\pm 3``) never matches a single gold value.

Hostile outputs. Before anything is parsed, cheap structural limits refuse what would be
slow (``cepo.answers.answer_limits``): a response over MAX_RESPONSE_CHARS is refused in
the calling process without being sent anywhere ("too_long"); an extracted answer that is
too long ("too_long"), nested too deep, or holds a power tower, a huge exponent,
factorial or number ("too_complex") scores 0 in microseconds. Log lines from math-verify
about a bad input are cut to LOG_CHARS characters.

Processes. Each worker is a process fed one item at a time over a pipe; an item that has
not answered within ``timeout_s`` scores 0 ("timeout") and its worker is killed and
replaced; a worker that raises scores 0 ("error"); one that dies is replaced ("error").
Workers are forked from a forkserver that has imported math-verify once (a clean,
single-threaded process: safe beside torch's threads), so a replacement is ready in
milliseconds instead of paying the import again.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import sys
import time
import types
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import wait

from cepo.answers import (ANSWER_EXTRACTION_MODES, MAX_ANSWER_CHARS, MAX_RESPONSE_CHARS,
                          answer_limits, extract_answer, extract_boxed, has_disjunction)

STATUSES = ("ok", "wrong", "unparseable", "too_long", "too_complex", "timeout", "error")
"""ok: verified correct. wrong: parsed, not equal to the gold answer. unparseable: no
answer could be extracted or parsed. too_long / too_complex: refused by the structural
limits before parsing. timeout: the item ran past timeout_s (its worker was replaced).
error: the scorer raised or its worker died."""

LOG_CHARS = 300
"""Log lines about a bad output are cut to this many characters."""

_log = logging.getLogger(__name__)
_MATH_VERIFY_LOGGERS = ("math_verify", "math_verify.parser", "math_verify.grader",
                        "math_verify.utils", "latex2sympy2_extended.math_normalization")


def shorten(text: str, limit: int = LOG_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text) - limit} more chars]"


class _ShortenRecords(logging.Filter):
    """Rewrites a log record's message to at most LOG_CHARS characters (math-verify logs
    the whole input it failed on, which can be megabytes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose args do not format: keep it as is
            return True
        if len(message) > LOG_CHARS:
            record.msg, record.args = shorten(message), ()
        return True


def quiet_math_verify_logs() -> None:
    """Cut math-verify's log lines to LOG_CHARS characters (idempotent)."""
    for name in _MATH_VERIFY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ShortenRecords) for f in logger.filters):
            logger.addFilter(_ShortenRecords())


@dataclass
class Score:
    """reward: the scalar reward; correct: the answer was verified; status: one of
    STATUSES; extracted: the final answer as extracted from the response (None when
    there was none), cut to MAX_ANSWER_CHARS characters. Use it as the wrong-answer hint
    only when status is "ok" or "wrong" (a refused answer is junk by construction)."""

    reward: float
    correct: bool
    status: str
    extracted: str | None = None


def load_reward_fn(spec: str):
    """Import a user reward function given as ``"package.module:function"``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward_fn must look like 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward_fn: cannot import {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward_fn: {spec!r} is not callable")
    return fn


def _check_mode(mode: str) -> None:
    if mode not in ANSWER_EXTRACTION_MODES:
        raise ValueError(f"answer_extraction must be one of {ANSWER_EXTRACTION_MODES}, "
                         f"got {mode!r}")


def _clip(answer: str | None) -> str | None:
    if answer is None or len(answer) <= MAX_ANSWER_CHARS:
        return answer
    return answer[:MAX_ANSWER_CHARS] + "..."


_GOLD_CACHE: dict[str, list] = {}


def _parse_gold(answer: str) -> list:
    """math-verify's parse of a gold answer (as LaTeX math, else as a boxed answer);
    cached: a group's responses share one gold answer."""
    if answer not in _GOLD_CACHE:
        from math_verify import parse

        if len(_GOLD_CACHE) > 4096:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[answer] = parse("$" + answer + "$") or parse("\\boxed{" + answer + "}")
    return _GOLD_CACHE[answer]


def _several(x) -> bool:
    """True for a parsed value that holds several candidates: a set of more than one
    element, an interval or union, a tuple or matrix, a logical and/or."""
    from sympy import And, FiniteSet, MatrixBase, Or, Set, Tuple

    if isinstance(x, FiniteSet):
        return len(x) > 1
    return isinstance(x, (Set, MatrixBase, Or, And)) or (isinstance(x, Tuple) and len(x) > 1)


def _hedged(gold: list, gold_text: str, pred: list, answer: str) -> bool:
    """The prediction offers several candidates while the gold answer is one value."""
    if has_disjunction(gold_text) or (gold and _several(gold[0])):
        return False  # a set, interval, tuple or "a or b" gold: math-verify decides
    return has_disjunction(answer) or bool(pred and _several(pred[0]))


def score_one(response: str, answer: str, *, format_reward: float = 0.0, reward_fn=None,
              answer_extraction: str = "boxed") -> Score:
    """Score one response in this process (the workers call this).

    A plug-in (``reward_fn(response, answer) -> float``) sees the raw response; its value
    is the reward, correct when >= 1. Otherwise: the final answer is extracted per
    ``answer_extraction`` (see cepo.answers.extract_answer); none: "unparseable", 0. It
    is vetted by answer_limits ("too_long" / "too_complex", 0), parsed as
    ``\\boxed{answer}`` and compared with the gold answer (parsed as LaTeX math) by
    math-verify's ``verify(gold, pred)``; a hedged answer (several candidates against one
    gold value) is "wrong". In math_verify mode the whole text is vetted and parsed, as
    math-verify does (gameable: documented in extract_answer). The format term is added
    when the response has a complete, non-empty \\boxed{} and was not refused.
    """
    _check_mode(answer_extraction)
    answer = str(answer)
    if reward_fn is not None:
        value = float(reward_fn(response, answer))
        extracted = None
        if len(response) <= MAX_RESPONSE_CHARS and answer_extraction != "math_verify":
            extracted = _clip(extract_answer(response, answer_extraction))
        return Score(value, value >= 1.0, "ok" if value >= 1.0 else "wrong", extracted)
    if len(response) > MAX_RESPONSE_CHARS:
        return Score(0.0, False, "too_long", None)
    quiet_math_verify_logs()
    from math_verify import parse, verify

    boxed = extract_boxed(response)
    bonus = format_reward if boxed is not None and boxed.strip() else 0.0
    if answer_extraction == "math_verify":
        refused = answer_limits(response, whole_text=True)
        if refused is not None:
            return Score(0.0, False, refused[0], None)
        pred = parse(response)
        extracted = None
        if pred:
            extracted = _clip(pred[-1] if isinstance(pred[-1], str) else str(pred[0]))
    else:
        extracted = boxed if answer_extraction == "boxed" else extract_answer(response, answer_extraction)
        if extracted is None or not extracted.strip():
            return Score(bonus, False, "unparseable", None)
        refused = answer_limits(extracted)
        if refused is not None:
            return Score(0.0, False, refused[0], _clip(extracted))
        pred = parse("\\boxed{" + extracted + "}")
        extracted = _clip(extracted)
    if not pred:
        return Score(bonus, False, "unparseable", extracted)
    gold = _parse_gold(answer)
    correct = bool(gold) and verify(gold, pred)
    if correct and _hedged(gold, answer, pred, extracted or ""):
        correct = False
    return Score(1.0 + bonus if correct else bonus, correct, "ok" if correct else "wrong",
                 extracted)


def _worker(conn, reward_fn_spec, format_reward, answer_extraction):
    fn = load_reward_fn(reward_fn_spec) if reward_fn_spec else None
    import math_verify  # noqa: F401  (preloaded by the forkserver; else imported here)
    quiet_math_verify_logs()
    conn.send("ready")
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        response, answer = item
        try:
            s = score_one(response, answer, format_reward=format_reward, reward_fn=fn,
                          answer_extraction=answer_extraction)
            conn.send((s.reward, s.correct, s.status, s.extracted))
        except BaseException as e:  # math-verify's TimeoutException is a BaseException
            conn.send((0.0, False, f"error:{type(e).__name__}: {shorten(e, 200)}", None))


def _main_imports() -> list[str]:
    """The modules a child of multiprocessing will import when it re-runs the parent's
    main module: the modules the main module's namespace came from (``python -m
    cepo.train`` gives torch, cepo.build, ...; ``from cepo.train import main`` in a
    script gives cepo.train), never the ``-m`` module itself (runpy would warn that it is
    already in sys.modules before it runs). Empty when children skip the main module
    (``-c``, interactive, a package __main__)."""
    main = sys.modules.get("__main__")
    if main is None:
        return []
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None and (name == "__main__" or name.endswith(".__main__")):
        return []
    if name is None and getattr(main, "__file__", None) is None:
        return []
    names = set()
    for value in list(vars(main).values()):
        module = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if isinstance(module, str):
            names.add(module)
    return sorted(names - {"__main__", "builtins", name})


def _context():
    """A forkserver context whose server has imported math-verify (each worker, and each
    replacement of a killed one, is a fork of it); spawn where forkserver is missing.

    A child of multiprocessing re-runs the parent's main module (``python -m cepo.train``
    re-imports cepo.train, hence torch: seconds per replaced worker). The server
    preloads what that costs (``_main_imports``), so a child finds its imports done. The
    preload list is read when the server starts (the first Verifier of the process)."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(["math_verify", "sympy", "cepo.answers", "cepo.verifier",
                                *_main_imports()])
    return ctx


class _Worker:
    def __init__(self, ctx, reward_fn, format_reward, answer_extraction):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, daemon=True,
                                args=(child, reward_fn, format_reward, answer_extraction))
        self.proc.start()
        child.close()
        self.job: int | None = None
        self.deadline = 0.0

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the worker has imported everything: start-up never eats into an
        item's timeout."""
        try:
            ready = self.conn.poll(timeout) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            raise RuntimeError(
                "verifier worker failed to start (see its traceback above). Workers re-run "
                "the main module: a script that creates a Verifier must do so under "
                "`if __name__ == '__main__':`")

    def kill(self):
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class Verifier:
    """Scores responses against gold answers; see the module docstring.

    timeout_s: the most one item may take (then "timeout", 0); num_workers: worker
    processes; format_reward: added when the response has a complete \\boxed{};
    reward_fn: "module:function" plug-in replacing math-verify; answer_extraction: one of
    cepo.answers.ANSWER_EXTRACTION_MODES ("boxed" default, strict).
    """

    def __init__(self, timeout_s: float = 5.0, num_workers: int = 2, format_reward: float = 0.0,
                 reward_fn: str | None = None, answer_extraction: str = "boxed"):
        if timeout_s <= 0:
            raise ValueError(f"verifier timeout must be > 0, got {timeout_s}")
        _check_mode(answer_extraction)
        if reward_fn:
            load_reward_fn(reward_fn)  # fail early, in the caller, with a clear message
        self.timeout_s = timeout_s
        self.format_reward = format_reward
        self.reward_fn = reward_fn
        self.answer_extraction = answer_extraction
        self._ctx = _context()
        self._workers = [self._start() for _ in range(max(1, num_workers))]
        for w in self._workers:  # started in parallel, awaited together
            w.wait_ready()
        self._counts: Counter = Counter()

    def _start(self) -> _Worker:
        return _Worker(self._ctx, self.reward_fn, self.format_reward, self.answer_extraction)

    def _spawn(self) -> _Worker:
        worker = self._start()
        worker.wait_ready()
        return worker

    def _fallback_extracted(self, response: str) -> str | None:
        """The answer of an item whose worker timed out or died, extracted here (cheap,
        linear) so that the caller can still tell it apart from the gold answer."""
        if self.answer_extraction == "math_verify" or len(response) > MAX_RESPONSE_CHARS:
            return None
        return _clip(extract_answer(response, self.answer_extraction))

    def score(self, responses: list[str], answers: list[str]) -> list[Score]:
        """One Score per (response, answer); never blocks longer than about timeout_s per
        item beyond the work itself."""
        if len(responses) != len(answers):
            raise ValueError(f"score: {len(responses)} responses but {len(answers)} answers")
        results: list[Score | None] = [None] * len(responses)
        pending = []
        for job in reversed(range(len(responses))):
            if self.reward_fn is None and len(responses[job]) > MAX_RESPONSE_CHARS:
                results[job] = Score(0.0, False, "too_long", None)  # never sent anywhere
            else:
                pending.append(job)
        while pending or any(w.job is not None for w in self._workers):
            for k, w in enumerate(self._workers):
                if w.job is None and pending:
                    job = pending.pop()
                    try:
                        w.conn.send((responses[job], answers[job]))
                    except (BrokenPipeError, OSError):
                        w.kill()
                        w = self._workers[k] = self._spawn()
                        w.conn.send((responses[job], answers[job]))
                    w.job, w.deadline = job, time.monotonic() + self.timeout_s
            busy = [w for w in self._workers if w.job is not None]
            now = time.monotonic()
            ready = wait([w.conn for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - now))
            for k, w in enumerate(self._workers):
                if w.job is None:
                    continue
                if w.conn in ready:
                    try:
                        reward, correct, status, extracted = w.conn.recv()
                    except (EOFError, OSError):  # the worker died (crash, os._exit)
                        _log.warning("verifier worker died scoring %r", shorten(responses[w.job]))
                        results[w.job] = Score(0.0, False, "error",
                                               self._fallback_extracted(responses[w.job]))
                        w.kill()
                        self._workers[k] = self._spawn()
                        continue
                    if status.startswith("error"):
                        _log.warning("verifier %s scoring %r", shorten(status),
                                     shorten(responses[w.job]))
                        reward, correct, status = 0.0, False, "error"
                    results[w.job] = Score(reward, correct, status, extracted)
                    w.job = None
                elif time.monotonic() >= w.deadline:
                    _log.warning("verifier timeout (%.1f s) scoring %r", self.timeout_s,
                                 shorten(responses[w.job]))
                    results[w.job] = Score(0.0, False, "timeout",
                                           self._fallback_extracted(responses[w.job]))
                    w.kill()
                    self._workers[k] = self._spawn()
        self._counts.update(s.status for s in results)
        return results

    def stats(self) -> dict[str, int]:
        """Cumulative counts per status (every name in STATUSES) since construction."""
        return {s: self._counts.get(s, 0) for s in STATUSES}

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.proc.kill()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
