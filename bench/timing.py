"""Timers and peak-memory probes for the kernel benchmarks.

CUDA: ``triton.testing.do_bench`` (median, L2 flushed between runs), with warm-up and
repetition windows sized from a first measured run so that even a 200 ms op is timed
over several runs; peak memory from the caching allocator
(``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` minus the memory
allocated before the call).

CPU: warm-up is the caller's correctness-check run; then ``time.perf_counter`` around
each call, the contenders of a point timed in rounds (one call each per round) so that
the load of a shared machine drifts over all of them alike; the median is reported.
Peak memory is the process's resident-set high-water mark: on Linux, writing "5" to
/proc/self/clear_refs resets VmHWM to the current VmRSS (proc(5), since Linux 4.0), so
peak extra = VmHWM after the call - VmRSS before it, less the file-backed pages (RssFile)
the call paged in (library code run for the first time). Before the call ``malloc_trim(0)``
hands freed heap pages back to the kernel, and glibc's mmap threshold is lowered to
1 MiB for the call, so that RSS follows the live tensors: otherwise blocks glibc keeps
for reuse make the same call read differently from run to run. Where clear_refs does
not work (not Linux, or a kernel that refuses it), a background thread samples the RSS
every millisecond (approximate: it can miss a short spike); the method used is recorded
in the results.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

MIB = 1024.0 * 1024.0


def is_cuda(device) -> bool:
    """True when device is a CUDA device."""
    return torch.device(device).type == "cuda"


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if is_cuda(device) and torch.cuda.is_available():
        torch.cuda.synchronize(torch.device(device))


@dataclass
class Measurement:
    """One contender's timing: median ms, peak extra MiB, the samples and how they were taken."""
    time_ms: float
    peak_extra_mb: float | None
    times_ms: list = field(default_factory=list)
    method: str = ""


# --------------------------------------------------------------------------- CPU memory

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kb(key: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_libc = None


def malloc_trim() -> None:
    """Return freed heap memory to the kernel (glibc only; a no-op elsewhere)."""
    global _libc
    if _libc is False:
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        _libc = False


M_MMAP_THRESHOLD = -3
PROBE_MMAP_THRESHOLD = 1 << 20
"""During a memory probe, allocations above 1 MiB are mmap'd (and unmapped when freed), so
RSS follows the live tensors and the high-water mark is what the code holds, not blocks
glibc kept for reuse (which made the same call read 48 or 63 MiB from run to run)."""
RUN_MMAP_THRESHOLD = 32 << 20
"""At all other times 32 MiB: the ceiling glibc's own dynamic threshold climbs to once
large blocks are freed, i.e. the allocator behaviour a long-running process settles in."""


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc mallopt(M_MMAP_THRESHOLD, nbytes); False where unavailable."""
    global _libc
    if _libc is False:
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        return bool(_libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        _libc = False
        return False


def _rss_bytes() -> int | None:
    """Current resident set size (for the sampling fallback)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # optional
        return psutil.Process().memory_info().rss
    except Exception:
        return None


_cpu_method: str | None = None


def cpu_memory_method() -> str:
    """'clear_refs' (exact high-water mark), 'sampling' (approximate) or 'none'.

    Verified once per process: allocate and touch 64 MiB after a reset and check that
    VmHWM saw it, then free it, reset again and check VmHWM dropped back.
    """
    global _cpu_method
    if _cpu_method is not None:
        return _cpu_method
    set_mmap_threshold(RUN_MMAP_THRESHOLD)
    method = "none"
    if _rss_bytes() is not None:
        method = "sampling"
    if _status_kb("VmHWM") is not None and _reset_hwm():
        gc.collect()
        malloc_trim()
        _reset_hwm()
        before = _status_kb("VmRSS")
        x = torch.ones(16 * 1024 * 1024)  # 64 MiB, touched
        del x
        malloc_trim()
        hwm = _status_kb("VmHWM")
        _reset_hwm()
        after_reset = _status_kb("VmHWM")
        if (before is not None and hwm is not None and after_reset is not None
                and hwm - before >= 48 * 1024 and after_reset < hwm - 32 * 1024):
            method = "clear_refs"
    _cpu_method = method
    return method


def cpu_memory_description() -> str:
    """How CPU peak memory is measured in this process, in words (for the results)."""
    return {
        "clear_refs": "CPU: process VmHWM after writing 5 to /proc/self/clear_refs, minus VmRSS before, "
                      "less the RssFile growth (code paged in); malloc_trim first; glibc mmap threshold "
                      "1 MiB during the probe",
        "sampling": "CPU: RSS sampled every 1 ms during the call, minus RSS before, less the RssFile "
                    "growth (approximate; malloc_trim first; glibc mmap threshold 1 MiB during the probe)",
        "none": "CPU: not measurable on this system",
    }[cpu_memory_method()]


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _rss_bytes() or 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self.peak:
                self.peak = rss
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        rss = _rss_bytes()
        return max(self.peak, rss or 0)


def cpu_call_with_peak(fn, keep_output: bool = False):
    """Run fn() once: (elapsed seconds, peak extra MiB or None, output or None).

    The output is part of the peak (it is allocated during the call); it is returned
    only when asked (the correctness check), after the probe has read the peak. File-backed
    pages the call brought in (RssFile growth: the code of a kernel run for the first
    time, up to tens of MiB on a first compiled call) are not counted: they are not data.
    """
    method = cpu_memory_method()
    set_mmap_threshold(PROBE_MMAP_THRESHOLD)
    malloc_trim()
    sampler = None
    try:
        file_before = _status_kb("RssFile")
        if method == "clear_refs":
            _reset_hwm()
            before = _status_kb("VmRSS") * 1024
        elif method == "sampling":
            before = _rss_bytes()
            sampler = _Sampler()
            sampler.start()
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
        if method == "clear_refs":
            peak = (_status_kb("VmHWM") * 1024 - before) / MIB
        elif method == "sampling":
            peak = (sampler.stop() - before) / MIB
            sampler = None
        else:
            peak = None
        file_after = _status_kb("RssFile")
        if peak is not None and file_before is not None and file_after is not None:
            peak -= max(0, file_after - file_before) / 1024.0  # code paged in, not data
    finally:
        if sampler is not None:
            sampler.stop()
        set_mmap_threshold(RUN_MMAP_THRESHOLD)
    if not keep_output:
        del out
        out = None
    return elapsed, (max(0.0, peak) if peak is not None else None), out


CPU_TIMING = dict(min_rounds=3, max_rounds=7, budget_s=3.0)
"""CPU timing after the warm-up: rounds of one call per contender, at least 3 rounds, more
while 3 s last, at most 7; the median is reported."""
SLOW_ROUND_S = 15.0
"""When one call of every contender together takes longer than this, 2 rounds are enough.
(At 8 s the N 4096 fp32 points of the CPU matrix, 9-11 s a round, got 2 rounds, whose
median is their mean: one noisy call moved ours by 15%.)"""


def cpu_timing_description() -> str:
    """How CPU times are taken, in words (for the results)."""
    t = CPU_TIMING
    return (f"warm-up (the correctness check), then time.perf_counter, the contenders of a point "
            f"in rounds of one call each (>= {t['min_rounds']} rounds, 2 when a round takes > "
            f"{SLOW_ROUND_S:.0f} s; more while {t['budget_s']:.0f} s last, at most {t['max_rounds']}), median")


def time_cpu_round_robin(fns: dict, *, min_rounds: int = 3, max_rounds: int = 7, budget_s: float = 3.0,
                         on_error=None) -> dict:
    """Median wall time of each callable (already warmed up), timed in rounds.

    Each round calls every contender once, in turn, so that a change in the load of a
    shared machine hits all of them alike instead of whichever happened to be running.
    Rounds continue until ``min_rounds`` were made and ``budget_s`` has passed, or
    ``max_rounds`` were made. A contender whose call raises is reported to
    ``on_error(name, exception)`` and dropped. Returns {name: [times in ms]}.
    """
    times = {name: [] for name in fns}
    live = dict(fns)
    start = time.perf_counter()
    rounds = 0
    while live and rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for name, fn in list(live.items()):
            try:
                t0 = time.perf_counter()
                out = fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
                del out
            except Exception as e:  # noqa: BLE001 - reported to the caller
                live.pop(name)
                if on_error is None:
                    raise
                on_error(name, e)
        rounds += 1
    return times


# --------------------------------------------------------------------------- CUDA

def cuda_call_with_peak(fn, device):
    """Run fn() once on CUDA: (elapsed ms, peak extra MiB). The output is dropped."""
    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - before
    del out
    return start.elapsed_time(end), max(0.0, peak / MIB)


def _cuda_event_median(fn, device, reps: int) -> tuple[float, list]:
    """Fallback timer when triton is missing: CUDA events around each call, median."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(torch.device(device))
        times.append(start.elapsed_time(end))
        del out
    return statistics.median(times), times


def measure_cuda(fn, device) -> Measurement:
    """Peak memory from one call, then the median time from triton.testing.do_bench.

    do_bench sizes its loops from a 5-call estimate; its default windows (25 ms warm-up,
    100 ms of repetitions) give a single repetition for ops of 100 ms and more, so the
    windows are widened from the memory run's time: at least ~10 repetitions (capped at
    ~4 s of timing per contender).
    """
    est_ms, peak = cuda_call_with_peak(fn, device)
    est_ms = max(est_ms, 1e-3)
    warmup = int(min(max(25.0, 2 * est_ms), 1000.0))
    rep = int(min(max(100.0, 10 * est_ms), 4000.0))
    try:
        import triton.testing
    except Exception:  # triton missing: plain CUDA events
        median, times = _cuda_event_median(fn, device, max(3, int(rep // est_ms)))
        return Measurement(median, peak, times, "cuda events median (triton missing)")
    median = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    return Measurement(float(median), peak, [], f"triton.testing.do_bench median (warmup {warmup} ms, rep {rep} ms)")


def memory_description(device) -> str:
    """How peak memory is measured on device, in words (for the results)."""
    if is_cuda(device):
        return "CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before"
    return cpu_memory_description()


def available_memory_bytes(device) -> int | None:
    """Free memory the next allocation can use (CUDA: free device memory; CPU: MemAvailable)."""
    if is_cuda(device):
        try:
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def release(device, collect: bool = False) -> None:
    """Hand cached blocks back between contenders; with ``collect``, run the garbage
    collector first (0.3 s once dynamo and inductor are loaded, so only where needed:
    after an error, whose traceback can hold large tensors, and between points)."""
    if collect:
        gc.collect()
    if is_cuda(device) and torch.cuda.is_available():
        torch.cuda.synchronize(torch.device(device))
        torch.cuda.empty_cache()
    else:
        malloc_trim()
