"""pytest set-up of the kernel benchmarks: options, the benchmark matrix, and the results
collector that writes JSON, markdown and plots when the session ends.

    pytest bench/                        # kernels: full matrix on CUDA, small on CPU
    pytest bench/ --bench-trainer        # kernels and the trainer benchmarks
    pytest bench/ --bench-size tiny      # smoke test (a few minutes on 2 CPU cores)
    CEPO_BENCH_SIZE=full pytest bench/   # the same through the environment

bench/pytest.ini makes bench/ its own rootdir, so tests/conftest.py (which turns on
Triton's CPU interpreter for the unit tests) is not loaded. Benchmarks never run Triton
under the interpreter: on CPU "ours" is the chunked PyTorch engine and the Triton peers
are recorded n/a, so TRITON_INTERPRET is cleared here if the caller's shell set it.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time

_INTERPRET_CLEARED = os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import contenders, report, timing  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)


def pytest_addoption(parser):
    """--bench-size, --bench-device, --bench-out."""
    group = parser.getgroup("cepo-bench", "cepo kernel benchmarks")
    group.addoption("--bench-size", choices=("tiny", "small", "full"), default=None,
                    help="benchmark matrix (default: $CEPO_BENCH_SIZE, else full on CUDA, small on CPU)")
    group.addoption("--bench-device", default=None,
                    help="device to benchmark on (default: $CEPO_BENCH_DEVICE, else cuda if available, else cpu)")
    group.addoption("--bench-out", default=None,
                    help="output folder (default: bench/results/<device>/)")
    group.addoption("--bench-trainer", action="store_true", default=False,
                    help="also run the trainer benchmarks (bench/test_trainer.py, about 15 "
                         "minutes on 2 CPU cores); naming that file runs them too")


def _device(config) -> str:
    dev = config.getoption("--bench-device") or os.environ.get("CEPO_BENCH_DEVICE")
    if not dev:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--bench-device {dev}: CUDA is not available here")
    return dev


def _size_default(device) -> str:
    return "full" if torch.device(device).type == "cuda" else "small"


def _size(config, device) -> str:
    size = config.getoption("--bench-size") or os.environ.get("CEPO_BENCH_SIZE")
    if not size:
        size = _size_default(device)
    if size not in ("tiny", "small", "full"):
        raise pytest.UsageError(f"bench size must be tiny | small | full, got {size!r}")
    return size


def _device_name(device) -> tuple[str, str]:
    """(human-readable name, folder name)."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        return name, f"cuda-{slug}"
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}", "cpu"


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=20)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def _loadavg() -> list | None:
    """1, 5 and 15 minute load averages (CPU timings on a busy machine are slower and noisier)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "liger-kernel", "cut-cross-entropy", "cepo"):
        try:
            out[pkg] = metadata.version(pkg)
        except Exception:
            out[pkg] = None
    return out


class BenchSession:
    """Collects result rows across tests; writes them at the end of the session."""

    def __init__(self, config):
        self.config = config
        self.device = _device(config)
        self.device_type = torch.device(self.device).type
        self.size = _size(config, self.device)
        self.device_name, folder = _device_name(self.device)
        if self.size != _size_default(self.device):  # a smoke run never overwrites the real results
            folder = f"{folder}-{self.size}"
        self.out_dir = config.getoption("--bench-out") or os.path.join(BENCH_DIR, "results", folder)
        self.load_start = _loadavg()
        self.rows: list[dict] = []
        self.started = time.time()
        self.written: list[str] = []
        self.write_error: str | None = None

    def add(self, rows):
        """Append result rows."""
        self.rows.extend(rows)

    def meta(self) -> dict:
        """Run metadata for the results: device, date, commit, versions, methods, wall time."""
        commit = _git("rev-parse", "HEAD")
        # the results a benchmark run rewrites are not the code it measured
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     ":(exclude)bench/results")
        return {
            "device": self.device_name,
            "device_type": self.device_type,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": commit or "unknown",
            "git_dirty": bool(dirty) if dirty is not None else None,
            "versions": _versions(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_start": self.load_start,
            "load_average_end": _loadavg(),
            "size": self.size,
            "command": "pytest " + " ".join(sys.argv[1:]) if sys.argv else "pytest bench/",
            "timing_method": ("triton.testing.do_bench, median" if self.device_type == "cuda"
                              else timing.cpu_timing_description()),
            "memory_method": timing.memory_description(self.device),
            "triton_interpret_cleared": _INTERPRET_CLEARED,
            "wall_s": time.time() - self.started,
        }


_SESSION_KEY = pytest.StashKey[BenchSession]()


def pytest_configure(config):
    """Create the session's results collector."""
    config.stash[_SESSION_KEY] = BenchSession(config)


TRAINER_FILE = os.path.join(BENCH_DIR, "test_trainer.py")


def _trainer_named(config) -> bool:
    """Whether a command-line argument names bench/test_trainer.py (or a test in it)."""
    for arg in config.args:
        path = os.path.abspath(os.path.join(str(config.invocation_params.dir), arg.split("::")[0]))
        if path == TRAINER_FILE:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    """`pytest bench/` runs the kernel benchmarks; the trainer benchmarks (whole training
    runs) only with --bench-trainer or when test_trainer.py is named."""
    if str(collection_path) != TRAINER_FILE:
        return None
    if config.getoption("--bench-trainer") or _trainer_named(config):
        return None
    return True


def pytest_generate_tests(metafunc):
    """Parametrise tests that take `point` over the benchmark matrix."""
    if "point" in metafunc.fixturenames:
        sess = metafunc.config.stash[_SESSION_KEY]
        pts = contenders.points(sess.size, sess.device)
        metafunc.parametrize("point", pts, ids=[p.id for p in pts])


@pytest.fixture(scope="session")
def bench(request) -> BenchSession:
    """The session's BenchSession (device, size, output folder, collected rows)."""
    return request.config.stash[_SESSION_KEY]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Write JSON, markdown and plots of the rows collected (even after a failure)."""
    sess = session.config.stash.get(_SESSION_KEY, None)
    if sess is None or not sess.rows:
        return
    try:
        sess.written = report.write_all(sess.out_dir, sess.meta(), sess.rows, contenders.DESCRIPTIONS)
    except Exception as e:  # never lose the run to a plotting problem: report it
        sess.write_error = f"{type(e).__name__}: {e}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the per-point summary, the targets and the files written."""
    sess = config.stash.get(_SESSION_KEY, None)
    if sess is None or not sess.rows:
        return
    tr = terminalreporter
    tr.section(f"cepo kernel benchmarks: {sess.device_name} (size {sess.size})")
    for line in report.summary_lines(sess.rows):
        tr.write_line(line)
    tl = report.targets(sess.rows, sess.device_type)
    if tl:
        tr.write_line("targets (reported, not asserted):")
        for line in tl:
            tr.write_line("  " + line.lstrip("- "))
    if sess.write_error:
        tr.write_line(f"could not write the results: {sess.write_error}")
    for path in sess.written:
        tr.write_line(f"wrote {os.path.relpath(path)}")
