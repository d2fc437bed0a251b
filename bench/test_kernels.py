"""Kernel benchmarks: every contender of an op on the same inputs, side by side.

One test per (op, shape, dtype). Each contender is first run once and its output
compared with ours (log-probs / loss and gradients within a loose tolerance): a
benchmark never times a wrong answer. That run is also the warm-up. Then it is timed
and its peak memory measured. A contender that runs out of memory is recorded OOM, one
that cannot run here n/a (or skipped, with the reason); neither fails the test. The
test fails only for a contender whose answer disagrees with ours or that raised an
unexpected error. Timing never fails a run.
"""

from __future__ import annotations

import statistics
import time
import traceback

import torch

from bench import contenders as C
from bench import timing

ALLOWED = ("ok", "oom", "n/a", "skipped")

# Loose tolerances: they separate a right answer computed in another order or precision
# from a wrong one (a bug is off by O(1)). bf16 peers round the [N, V] logits to bf16
# (|z| ~ 10: ~0.03 each); their gradients differ from ours (fp32 logits) by a relative
# 0.035 at V = 32k already, and Liger accumulates dW in bf16: hence 0.1 for bf16.
TOL = {
    "fp32": dict(atol=2e-3, rtol=1e-4, loss_atol=1e-4, loss_rtol=1e-3, grad=2e-3),
    "bf16": dict(atol=0.1, rtol=0.02, loss_atol=1e-2, loss_rtol=2e-2, grad=0.1),
    "fp16": dict(atol=0.05, rtol=0.01, loss_atol=5e-3, loss_rtol=1e-2, grad=0.05),
}

OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", MemoryError),
                    getattr(torch.cuda, "OutOfMemoryError", MemoryError), MemoryError})
OOM_TEXT = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, OOM_ERRORS):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e).lower() for s in OOM_TEXT)


def _as_ref(out):
    """A contender's outputs as a tuple of detached tensors (kept in their own dtype: on
    CUDA the reference dW of a 151,936 x 4,096 head would take 2.5 GB more in fp32)."""
    if isinstance(out, torch.Tensor):
        out = (out,)
    return tuple(t.detach() for t in out)


def _diff(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float):
    """(max |a - b|, all within atol + rtol |b|, all finite, ||a - b||, ||b||), computed in
    fp32 slices of 2^24 elements so that checking a big gradient needs little memory."""
    a, b = a.reshape(-1), b.reshape(-1)
    max_d, within, finite, num, den = 0.0, True, True, 0.0, 0.0
    step = 1 << 24
    for i in range(0, a.numel(), step):
        x, y = a[i:i + step].float(), b[i:i + step].float()
        finite &= bool(torch.isfinite(x).all())
        d = (x - y).abs()
        max_d = max(max_d, float(d.max()))
        within &= bool((d <= atol + rtol * y.abs()).all())
        num += float(d.double().square().sum())
        den += float(y.double().square().sum())
    return max_d, within, finite, num ** 0.5, den ** 0.5


def _grad_error(pairs) -> tuple[bool, float]:
    """(all finite, max relative error ||a - b|| / ||b||) over (got, reference) gradient
    pairs; the error is NaN once a gradient is not finite."""
    finite, err = True, 0.0
    for a, b in pairs:
        _, _, fin, num, den = _diff(a, b, 0.0, 0.0)
        finite &= fin
        err = max(err, num / max(den, 1e-30)) if fin else float("nan")
    return finite, err


def compare(op: str, dtype: str, ref, out):
    """(ok, max_diff, grad_rel_err): out against the reference outputs ref."""
    tol = TOL[dtype]
    got = _as_ref(out)
    if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref)):
        return False, float("nan"), None
    if op == "ppo_loss_fwd":
        d, ok, finite, _, _ = _diff(got[0], ref[0], tol["loss_atol"], tol["loss_rtol"])
        return ok and finite, d, None
    if op == "logprobs_grad":
        (lp, dh, dw), (lp_ref, dh_ref, dw_ref) = got, ref
        diff, ok, finite, _, _ = _diff(lp, lp_ref, tol["atol"], tol["rtol"])
        fin, grad_err = _grad_error(((dh, dh_ref), (dw, dw_ref)))
        return ok and finite and fin and grad_err <= tol["grad"], diff, grad_err
    if op in ("logprobs", "evidence"):
        diff, ok = 0.0, True
        for a, b in zip(got, ref):
            d, within, finite, _, _ = _diff(a, b, tol["atol"], tol["rtol"])
            diff = max(diff, d)
            ok &= within and finite
        return ok, diff, None
    (loss, dh, dw), (loss_ref, dh_ref, dw_ref) = got, ref
    diff, ok, finite, _, _ = _diff(loss, loss_ref, tol["loss_atol"], tol["loss_rtol"])
    fin, grad_err = _grad_error(((dh, dh_ref), (dw, dw_ref)))
    return ok and finite and fin and grad_err <= tol["grad"], diff, grad_err


def _row(point: C.Point, name: str) -> dict:
    return dict(op=point.op, contender=name, shape=f"N={point.N} V={point.V} H={point.H}",
                N=point.N, V=point.V, H=point.H, dtype=point.dtype, time_ms=None, tflops=None,
                x_floor=None, peak_extra_mb=None, status="error", note="", max_diff=None,
                grad_rel_err=None, checked_against=None, speedup_vs_best_peer=None, best_peer=None,
                first_call_ms=None, times_ms=[], timing=None)


def run_point(point: C.Point, device) -> list[dict]:
    """All contenders of point.op on one set of inputs: a list of result rows.

    Per contender: the check call (warm-up too), then on CUDA memory and do_bench; on CPU
    the memory probe (during the check call, or in a call of its own for contenders that
    compile on their first call), then all contenders are timed together in rounds.
    """
    cuda = timing.is_cuda(device)
    timing.release(device, collect=True)
    started = time.perf_counter()
    inp = C.make_inputs(point, device)
    rows, live, est_s, first_s = [], {}, {}, {}
    ref, ref_name = None, None
    for name, factory in C.CONTENDERS[point.op]:
        row = _row(point, name)
        rows.append(row)
        if not cuda:  # a CPU allocation past the machine's memory meets the OOM killer, not an exception
            need, avail = C.estimated_cpu_bytes(name, point), timing.available_memory_bytes(device)
            if need and avail and need > 0.8 * avail:
                row.update(status="oom", note=f"predicted: needs ~{need / 2**30:.1f} GiB, "
                                              f"{avail / 2**30:.1f} GiB available (not run)")
                continue
        fn = out = None
        try:
            fn = factory(inp)
            if isinstance(fn, C.NA):
                row.update(status=fn.status, note=fn.reason)
                continue
            probe_now = not cuda and name not in C.COMPILES_ON_FIRST_CALL
            if probe_now:
                elapsed, peak, out = timing.cpu_call_with_peak(fn, keep_output=True)
                row["peak_extra_mb"] = peak
            else:
                t0 = time.perf_counter()
                out = fn()
                timing.synchronize(device)
                elapsed = time.perf_counter() - t0
            first_s[name] = elapsed
            row["first_call_ms"] = elapsed * 1e3
            if name != C.FLOOR:
                if ref is None:
                    ref, ref_name = _as_ref(out), name
                    if name != C.OURS:
                        row["note"] = "reference for the checks (ours did not run)"
                else:
                    ok, diff, grad_err = compare(point.op, point.dtype, ref, out)
                    row.update(max_diff=diff, grad_rel_err=grad_err, checked_against=ref_name)
                    if not ok:
                        row.update(status="mismatch",
                                   note=f"output differs from {ref_name}: max diff {diff:.3g}"
                                        + (f", grad rel err {grad_err:.3g}" if grad_err is not None else ""))
                        continue
            out = None
            if cuda:
                m = timing.measure_cuda(fn, device)
                row.update(status="ok", time_ms=m.time_ms, peak_extra_mb=m.peak_extra_mb,
                           times_ms=m.times_ms, timing=m.method)
            else:
                if not probe_now:  # compiled on the check call: measure memory on a warm call
                    elapsed, peak, _ = timing.cpu_call_with_peak(fn)
                    row["peak_extra_mb"] = peak
                est_s[name] = elapsed
                live[name] = fn
                row.update(status="timing")
        except Exception as e:  # noqa: BLE001 - every failure is recorded, then judged
            _record_failure(row, e)
            out = fn = None
            timing.release(device, collect=True)
        finally:
            out = fn = None
            timing.release(device)
    if live:
        by = {r["contender"]: r for r in rows}
        options = dict(timing.CPU_TIMING)
        if sum(est_s.values()) > timing.SLOW_ROUND_S:
            options["min_rounds"] = 2
        times = timing.time_cpu_round_robin(live, on_error=lambda name, e: _record_failure(by[name], e),
                                            **options)
        for name, ts in times.items():
            row = by[name]
            if row["status"] != "timing" or not ts:
                continue
            row.update(status="ok", time_ms=statistics.median(ts), times_ms=ts,
                       timing=f"perf_counter, median of {len(ts)} rounds")
            if name == "torch.compile":  # the check call compiled: its excess is compile time
                C.add_compile_time(first_s[name] - row["time_ms"] / 1e3)
    del inp, live
    timing.release(device, collect=True)
    _derive(point, rows)
    for r in rows:
        r["point_wall_s"] = time.perf_counter() - started
    return rows


def _record_failure(row: dict, e: BaseException) -> None:
    if _is_oom(e):
        row.update(status="oom", note=type(e).__name__, time_ms=None)
    else:
        row.update(status="error", note=f"{type(e).__name__}: {str(e)[:300]}", time_ms=None,
                   traceback=traceback.format_exc(limit=6))


def _derive(point: C.Point, rows: list[dict]) -> None:
    """TFLOP/s, multiple of the floor and ours' speed-up over the best peer."""
    by = {r["contender"]: r for r in rows}
    floor = by.get(C.FLOOR)
    floor_ms = floor["time_ms"] if floor and floor["status"] == "ok" else None
    for r in rows:
        if r["status"] != "ok" or not r["time_ms"]:
            continue
        r["tflops"] = point.flops / (r["time_ms"] * 1e-3) / 1e12
        if floor_ms:
            r["x_floor"] = r["time_ms"] / floor_ms
    ours = by.get(C.OURS)
    peers = [r for r in rows if r["contender"] not in (C.OURS, C.FLOOR) and r["status"] == "ok"]
    if ours and ours["status"] == "ok" and peers:
        best = min(peers, key=lambda r: r["time_ms"])
        ours["speedup_vs_best_peer"] = best["time_ms"] / ours["time_ms"]
        ours["best_peer"] = best["contender"]


def test_kernels(point, bench):
    """Run every contender of one point; fail only on a mismatch or an unexpected error."""
    rows = run_point(point, bench.device)
    bench.add(rows)
    bad = [r for r in rows if r["status"] not in ALLOWED]
    details = "\n".join(f"{r['contender']}: {r['status']}: {r['note']}\n{r.get('traceback', '')}" for r in bad)
    assert not bad, f"{point.id}: contenders neither matched ours nor were OOM / n/a:\n{details}"
