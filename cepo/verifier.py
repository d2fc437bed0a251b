"""Rewards: math-verify (or a user plug-in) in worker processes with a hard per-item timeout.

Parsing can hang on hostile input and a plug-in can crash or loop; neither may stall a
training step. Each worker is a process fed one item at a time over a pipe; an item that
has not answered within ``timeout_s`` scores 0 ("timeout") and its worker is killed and
replaced; a worker that raises scores 0 ("error"); one that dies is replaced ("error").
Workers are started once ("spawn": safe beside torch's threads) and reused.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import wait

STATUSES = ("ok", "wrong", "unparseable", "timeout", "error")


@dataclass
class Score:
    """reward: the scalar reward; correct: the answer was verified; status: one of STATUSES."""

    reward: float
    correct: bool
    status: str


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


def score_one(response: str, answer: str, *, format_reward: float = 0.0, reward_fn=None) -> Score:
    """Score one response in this process (the workers call this).

    math-verify: the prediction is the last \\boxed{} content if there is one, else
    whatever math-verify extracts from the whole response; the gold answer is parsed as
    LaTeX math; ``verify(gold, pred)`` (gold first: it is not symmetric). The format term
    is added when the response has a complete \\boxed{}. A plug-in's value is the reward;
    it counts as correct when >= 1.
    """
    from cepo.answers import extract_boxed

    boxed = extract_boxed(response)
    bonus = format_reward if boxed is not None else 0.0
    if reward_fn is not None:
        value = float(reward_fn(response, answer))
        return Score(value, value >= 1.0, "ok" if value >= 1.0 else "wrong")
    from math_verify import parse, verify

    pred = parse("\\boxed{" + boxed + "}") if boxed is not None else parse(response)
    if not pred:
        return Score(bonus, False, "unparseable")
    gold = parse("$" + str(answer) + "$") or parse("\\boxed{" + str(answer) + "}")
    correct = bool(gold) and verify(gold, pred)
    return Score(1.0 + bonus if correct else bonus, correct, "ok" if correct else "wrong")


def _worker(conn, reward_fn_spec, format_reward):
    fn = load_reward_fn(reward_fn_spec) if reward_fn_spec else None
    import math_verify  # noqa: F401  (imports take seconds: done before saying ready)
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
            s = score_one(response, answer, format_reward=format_reward, reward_fn=fn)
            conn.send((s.reward, s.correct, s.status))
        except BaseException as e:  # math-verify's TimeoutException is a BaseException
            conn.send((0.0, False, f"error:{type(e).__name__}"))


class _Worker:
    def __init__(self, ctx, reward_fn, format_reward):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, reward_fn, format_reward), daemon=True)
        self.proc.start()
        child.close()
        self.job: int | None = None
        self.deadline = 0.0

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the worker has imported everything: start-up never eats into an
        item's timeout."""
        if not self.conn.poll(timeout) or self.conn.recv() != "ready":
            raise RuntimeError("verifier worker failed to start")

    def kill(self):
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class Verifier:
    """Scores responses against gold answers; see the module docstring."""

    def __init__(self, timeout_s: float = 5.0, num_workers: int = 2, format_reward: float = 0.0,
                 reward_fn: str | None = None):
        if timeout_s <= 0:
            raise ValueError(f"verifier timeout must be > 0, got {timeout_s}")
        if reward_fn:
            load_reward_fn(reward_fn)  # fail early, in the caller, with a clear message
        self.timeout_s = timeout_s
        self.format_reward = format_reward
        self.reward_fn = reward_fn
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(self._ctx, reward_fn, format_reward)
                         for _ in range(max(1, num_workers))]
        for w in self._workers:  # started in parallel, awaited together
            w.wait_ready()
        self._counts: Counter = Counter()

    def _spawn(self) -> _Worker:
        worker = _Worker(self._ctx, self.reward_fn, self.format_reward)
        worker.wait_ready()
        return worker

    def score(self, responses: list[str], answers: list[str]) -> list[Score]:
        """One Score per (response, answer); never blocks longer than about timeout_s per
        item beyond the work itself."""
        if len(responses) != len(answers):
            raise ValueError(f"score: {len(responses)} responses but {len(answers)} answers")
        results: list[Score | None] = [None] * len(responses)
        pending = list(range(len(responses)))[::-1]
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
                        reward, correct, status = w.conn.recv()
                    except (EOFError, OSError):  # the worker died (crash, os._exit)
                        results[w.job] = Score(0.0, False, "error")
                        w.kill()
                        self._workers[k] = self._spawn()
                        continue
                    if status.startswith("error"):
                        reward, correct, status = 0.0, False, "error"
                    results[w.job] = Score(reward, correct, status)
                    w.job = None
                elif time.monotonic() >= w.deadline:
                    results[w.job] = Score(0.0, False, "timeout")
                    w.kill()
                    self._workers[k] = self._spawn()
        self._counts.update(s.status for s in results)
        return results

    def stats(self) -> dict[str, int]:
        """Cumulative counts per status since construction."""
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
