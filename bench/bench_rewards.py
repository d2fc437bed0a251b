"""Rewards for benchmarks, and the hostile-output benchmark of the verifier.

``hashed_reward``: a reward for timing runs with random-weight models: deterministic,
graded, so groups have non-zero advantages and every phase of a step does its work (not
a real verifier).

``HOSTILE``: 20 model outputs built to be slow (power towers, huge factorials and
exponents, megabyte responses, thousands of nested braces, long runs of boxed answers,
expansions). Run as a script, this times scoring that batch with the real verifier
(goal: at most 3 s wall with 2 workers on 2 cores), optionally interleaved with another
commit's verifier for a before/after figure:

    OMP_NUM_THREADS=1 python bench/bench_rewards.py --repeats 3
    OMP_NUM_THREADS=1 python bench/bench_rewards.py --repeats 2 --compare 4db0821
"""

from __future__ import annotations

import argparse
import zlib


def hashed_reward(response: str, answer: str) -> float:
    """A value in {0, 0.25, ..., 1} from a hash of the response text."""
    return (zlib.crc32(response.encode()) % 5) / 4


def _box(s: str) -> str:
    return "Let me compute carefully.\nSo the answer is \\boxed{" + s + "}."


HOSTILE: list[tuple[str, str]] = [  # (what it is, response); the gold answer is 34
    ("power tower 2^2^2^2^2^2", _box("2^{2^{2^{2^{2^{2}}}}}")),
    ("9^9^9", _box("9^{9^{9}}")),
    ("10^10^10", _box("10^{10^{10}}")),
    ("huge exponent 10^1000000", _box("10^{1000000}")),
    ("python power 9**9**9", _box("9**9**9")),
    ("huge factorial (10^6)!", _box("(10^{6})!")),
    ("factorial 100000!", _box("100000!")),
    ("iterated factorial 1000!!!", _box("1000!!!")),
    ("huge binomial", _box("\\binom{10^{9}}{10^{8}}")),
    ("tiny power 2^-10^10", _box("2^{-10^{10}}")),
    ("symbolic expansion (x+y+z)^50", _box("(x+y+z)^{50}")),
    ("product of 10 sums", _box("(a+b)(c+d)(e+f)(g+h)(i+j)(k+l)(m+n)(o+p)(q+r)(s+t)")),
    ("exp tower e^e^e^e^10", _box("e^{e^{e^{e^{10}}}}")),
    ("450 KB response, boxed at the end", "blah " * 90_000 + _box("34")),
    ("a megabyte of digits in the box", _box("9" * 1_000_000)),
    ("5000 nested braces", _box("{" * 5000 + "1" + "}" * 5000)),
    ("400 nested parentheses", _box("(" * 400 + "1" + ")" * 400)),
    ("40,000 boxed answers", "\\boxed{1}\\boxed{2}" * 20_000),
    ("50,000 unclosed boxes", "\\boxed{" * 50_000),
    ("long sum in the box", _box("+".join(["1"] * 450))),
]


def _load_verifier(commit: str | None):
    """The verifier module of the working tree, or of ``commit`` (loaded from git into a
    temporary importable module, so its workers can import it by name)."""
    if commit is None:
        import cepo.verifier as module
        return module
    import importlib
    import os
    import subprocess
    import sys
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "show", f"{commit}:cepo/verifier.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    folder = tempfile.mkdtemp(prefix="old_verifier_")
    name = f"verifier_{commit[:12]}"
    with open(os.path.join(folder, name + ".py"), "w") as f:
        f.write(source)
    sys.path.insert(0, folder)
    os.environ["PYTHONPATH"] = folder + os.pathsep + os.environ.get("PYTHONPATH", "")
    return importlib.import_module(name)


def main() -> None:
    import collections
    import logging
    import time

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0, help="per-item timeout_s")
    parser.add_argument("--compare", default=None, help="a commit whose verifier is timed too, "
                        "interleaved (A, B, A, B)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    responses = [r for _, r in HOSTILE]
    answers = ["34"] * len(responses)
    contenders = {"this tree": _load_verifier(None)}
    if args.compare:
        contenders[args.compare] = _load_verifier(args.compare)
    verifiers = {}
    for name, module in contenders.items():
        t0 = time.perf_counter()
        verifiers[name] = module.Verifier(timeout_s=args.timeout, num_workers=args.workers)
        print(f"[{name}] {args.workers} workers started in {time.perf_counter() - t0:.2f} s")
    try:
        for rep in range(args.repeats):
            for name, v in verifiers.items():
                t0 = time.perf_counter()
                scores = v.score(responses, answers)
                wall = time.perf_counter() - t0
                counts = collections.Counter(s.status for s in scores)
                print(f"repeat {rep} [{name}] {len(responses)} hostile outputs scored in "
                      f"{wall:.2f} s wall; statuses {dict(sorted(counts.items()))}", flush=True)
                if rep == 0:
                    for (what, _), s in zip(HOSTILE, scores):
                        print(f"    {what:36s} {s.status}")
    finally:
        for v in verifiers.values():
            v.close()


if __name__ == "__main__":
    main()
