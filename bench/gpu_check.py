"""One-shot GPU check of cepo_kernels: compile, correctness, timing, report (about 8 minutes on one H100 / H200).

    python bench/gpu_check.py --out DIR                 # the whole check on CUDA
    python bench/gpu_check.py --out DIR --dry-run       # the same pipeline on CPU at tiny shapes

Sections (each recorded even when another fails):

1. compile: every Triton kernel at the target shapes (each forward autotune config for
   one and three contexts, the latter also with tensor-descriptor (TMA) loads, the
   row-statistics and dz kernels for bf16 / fp16 tiles, the self-distillation kernels on
   fp32 chunks and on fp16 chunks with offsets):
   registers, spills, shared memory, and whether the PTX holds wgmma (Hopper MMA) and
   cp.async.bulk.tensor (TMA) instructions.
2. correctness on CUDA against the float64 reference at odd sizes (N 333, V 1037, H 96,
   in gradient chunks of 64 rows so dW accumulates across chunks):
   forced split counts 1, 3 and 7, ignored targets, temperature 0.7, entropy, fp32 /
   bf16 / fp16 inputs and gradients, the PPO loss (also with dual clip and token weights),
   the self-distillation loss (JSD, forward and reverse KL, token weights) and the evidence
   epilogue; the 16-bit forward with TMA forced off too (on by default on Hopper), the
   log-prob, PPO and self-distillation gradients with the chunk logits from our GEMM too
   (fp32, and fp16 with tile offsets); the log-prob and PPO ops through torch.compile
   (fullgraph, dynamic shapes); and one head
   with V x H > 2^31 elements (int64 offsets), checked against fp32 row chunks.
3. timing at the target shapes (bf16, N 16k per context, H 2048, V 151,936): ours, the
   bare products, naive, Cut Cross-Entropy and Liger, through the benchmark harness
   (bench/test_kernels.run_point: checked against ours first, then
   triton.testing.do_bench medians and peak memory); then the engine choices only a GPU
   can settle (``VARIANTS``): the three-context forward with its default loads against
   pointer loads (TMA off), and the PPO loss with its gradient chunks' logits from the
   library GEMM against our forward kernel (``triton_ops.LOGITS_GEMM``) and against the
   memory-lean gradient path (``chunked.DW_ACCUMULATION = 'weight'``, 512 MiB chunks),
   and the self-distillation loss with its two chunks from each source, each with its time
   and peak extra memory.
4. sampler: the Hugging Face engine's lean decoding steps (cepo/sampler/lean_decoder.py)
   on this device: their logits against the model's forward at every step (random
   Qwen3-0.6B shape, 2 layers, fp32 and bf16, rows dropped mid-way), then one generate
   call of 16 prompts x 8 samples, 64 new tokens, at the full Qwen3-0.6B shape in bf16,
   timed with and without them (the Hugging Face forward is launch-bound on a GPU).
5. report: gpu_check.json and gpu_check.md in --out.

The dry run executes every section on CPU (compile recorded as skipped, correctness
through the chunked engine, timing at a tiny shape, the sampler with the shipped tiny
model), so the logic is tested without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # `python bench/gpu_check.py` puts bench/ first, not the repo root
    sys.path.insert(0, REPO)

import torch  # noqa: E402

TARGET = dict(N=16_384, H=2048, V=151_936)
ODD = dict(N=333, H=96, V=1037)
TINY = dict(N=64, H=32, V=512)
SECTIONS = ("compile", "correctness", "sampler", "timing")
TIMED_OPS = ("evidence", "ppo_loss", "ppo_loss_fwd", "logprobs", "logprobs_grad", "self_distill")
TOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-2}
# the self-distillation gradient is a difference of two full distributions, each from
# logits rounded to the input dtype (2.6e-2 measured in bf16 at the odd sizes on CPU)
DISTILL_TOL = {"fp32": 1e-5, "bf16": 4e-2, "fp16": 4e-2}


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description="One-shot GPU check of cepo_kernels")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results", "gpu_check"),
                   help="folder for gpu_check.json and gpu_check.md (default: $OUT, else bench/results/gpu_check)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every section on CPU at tiny shapes (no CUDA needed)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--ops", default=",".join(TIMED_OPS), help="ops to time (comma-separated)")
    p.add_argument("--shape", default=None,
                   help="timing shape N,H,V (default: 16384,2048,151936; tiny in a dry run)")
    p.add_argument("--skip", default="",
                   help="contenders left out of the timing (comma-separated, e.g. torch.compile)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="stop starting new timing points after this many seconds in total")
    p.add_argument("--big-head", default="262144,8200",
                   help="V,H of the V x H > 2^31 case (0 to skip)")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = set(args.sections) - set(SECTIONS)
    if bad:
        p.error(f"--sections: unknown {sorted(bad)}; choose from {', '.join(SECTIONS)}")
    args.skip = [c for c in args.skip.split(",") if c]
    args.ops = [o for o in args.ops.split(",") if o]
    bad = set(args.ops) - set(TIMED_OPS)
    if bad:
        p.error(f"--ops: unknown {sorted(bad)}; choose from {', '.join(TIMED_OPS)}")
    if args.shape:
        try:
            n, h, v = (int(x) for x in args.shape.split(","))
        except ValueError:
            p.error(f"--shape must be N,H,V (three integers), got {args.shape!r}")
        args.shape = dict(N=n, H=h, V=v)
    else:
        args.shape = dict(TINY) if args.dry_run else dict(TARGET)
    try:
        v, h = (int(x) for x in args.big_head.split(","))
    except ValueError:
        p.error(f"--big-head must be V,H, got {args.big_head!r}")
    args.big_head = None if v == 0 or h == 0 else (v, h)
    return args


def device_for(args) -> torch.device:
    """cuda (the check) or cpu (a dry run); a real run without CUDA is an error."""
    if args.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available; use --dry-run to exercise the logic on CPU")
    return torch.device("cuda")


# --------------------------------------------------------------------------- 1. compile

def _kernel_facts(compiled) -> dict:
    """Registers, spills, shared memory, wgmma / TMA presence of a CompiledKernel."""
    try:
        compiled._init_handles()
    except Exception:
        pass
    ptx = (getattr(compiled, "asm", {}) or {}).get("ptx", "") or ""
    md = getattr(compiled, "metadata", None)
    shared = getattr(md, "shared", None) if md is not None else None
    return dict(registers=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None),
                shared_bytes=shared, wgmma="wgmma" in ptx, tma="cp.async.bulk.tensor" in ptx,
                ptx_lines=ptx.count("\n"))


FORWARD_VARIANTS = ((1, False, False, None), (3, True, False, None), (3, True, True, None),
                    (1, False, False, "fp32"), (1, False, False, "fp16"))
"""(contexts, CEPO epilogue, TMA loads, STORE_Z chunk: None, fp32, or fp16 with tile
offsets) of the forward kernel compiled in section 1."""

OFFSET_BLOCK = 128
"""Columns per offset of the fp16 chunk on CUDA (the smallest CUDA BLOCK_V)."""


def forward_warmup_args(hid, w, y, vec, i32, i8, n, v, h, descs, z, k, epi, tma, off=None):
    """The positional arguments and the variant's constexprs of ``stacked_fwd_kernel``
    for a compile-only warmup (dummy buffers; tests bind them to the kernel's signature).
    z: the STORE_Z chunk or None; off: its offsets (an fp16 chunk) or None."""
    args = (hid, h * n, h, w, h, *descs, y, vec, i32, vec, vec, vec, vec, i8, vec, vec, i8,
            vec if z is None else z, 0 if z is None else v,
            vec if off is None else off, 0 if off is None else off.shape[1],
            n, v, h, 1.0, 0.5, 0.2, 4, 1024)
    meta = dict(K=k, WITH_ENTROPY=False, EPILOGUE=epi, DIRECT=not epi, UPCAST=False,
                USE_TMA=tma, STORE_Z=z is not None, Z_OFFSET=off is not None,
                OFF_BLOCK=OFFSET_BLOCK if off is not None else 1)
    return args, meta


def compile_section(device, shape) -> list[dict]:
    """Compile each kernel variant at the target shapes (no launch) and record its facts."""
    if device.type != "cuda":
        return [dict(kernel="all", status="skipped", note="no CUDA (dry run): nothing compiled")]
    from cepo_kernels import triton_kernels as tk
    from cepo_kernels import triton_ops
    n, h, v = shape["N"], shape["H"], shape["V"]
    rows = []
    bf16 = dict(dtype=torch.bfloat16, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    hid = torch.empty(3, 16, h, **bf16)
    w = torch.empty(16, h, **bf16)
    y = torch.zeros(16, dtype=torch.int64, device=device)
    vec = torch.empty(16, **f32)
    i32 = torch.zeros(16, dtype=torch.int32, device=device)
    i8 = torch.zeros(16, dtype=torch.int8, device=device)
    chunks = {None: (None, None), "fp32": (torch.empty(16, v, **f32), None),
              "fp16": (torch.empty(16, v, dtype=torch.float16, device=device),
                       torch.empty(16, -(-v // OFFSET_BLOCK), **f32))}
    for k, epi, tma, store_z in FORWARD_VARIANTS:
        for bm, bv, bd, warps, stages in triton_ops.CUDA_CONFIGS:
            name = (f"stacked_fwd K={k}{' +epilogue' if epi else ''}{' TMA' if tma else ''}"
                    f"{f' STORE_Z {store_z}' if store_z else ''} BLOCK {bm}x{bv}x{bd} w{warps} s{stages}")
            try:
                descs = (triton_ops._descriptors(hid[:k].reshape(-1, h), w,
                                                 dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd))
                         if tma else (None, None))
                z, off = chunks[store_z]
                args, meta = forward_warmup_args(hid, w, y, vec, i32, i8, n, v, h, descs, z, k,
                                                 epi, tma, off=off)
                c = tk.stacked_fwd_kernel.warmup(
                    *args, grid=(1,), **meta, BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, GROUP_M=8,
                    num_warps=warps, num_stages=stages)
                rows.append(dict(kernel=name, status="ok", **_kernel_facts(c)))
            except Exception as e:  # noqa: BLE001 - recorded
                rows.append(dict(kernel=name, status="error", note=f"{type(e).__name__}: {str(e)[:300]}"))
    z = torch.empty(16, v, **f32)
    cfg = triton_ops.ROW_BLOCK
    try:
        c = tk.row_stats_kernel.warmup(z, v, y, vec, vec, vec, 4096, v, 1.0, grid=(1,),
                                       WITH_ENTROPY=True, **cfg)
        rows.append(dict(kernel="row_stats (entropy)", status="ok", **_kernel_facts(c)))
    except Exception as e:  # noqa: BLE001
        rows.append(dict(kernel="row_stats", status="error", note=f"{type(e).__name__}: {str(e)[:300]}"))
    for dt in (torch.bfloat16, torch.float16):
        dz = torch.empty(16, v, dtype=dt, device=device)
        try:
            c = tk.dz_kernel.warmup(z, v, dz, v, y, vec, vec, vec, vec, vec, 4096, v, 1.0, grid=(1,),
                                    HAS_C=False, HAS_SCALE=dt == torch.float16, **cfg)
            rows.append(dict(kernel=f"dz ({dt})", status="ok", **_kernel_facts(c)))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(kernel=f"dz ({dt})", status="error", note=f"{type(e).__name__}: {str(e)[:300]}"))
    z16, off = chunks["fp16"]
    try:  # the fp16 chunk with tile offsets, dz in place as bf16
        c = tk.dz_kernel.warmup(z16, v, z16.view(torch.bfloat16), v, y, vec, vec, vec, vec, vec,
                                4096, v, 1.0, grid=(1,), HAS_C=False, HAS_SCALE=False, **cfg,
                                off_ptr=off, stride_off=off.shape[1], HAS_OFFSET=True,
                                OFF_BLOCK=OFFSET_BLOCK)
        rows.append(dict(kernel="dz (fp16 chunk + offsets -> bf16)", status="ok", **_kernel_facts(c)))
    except Exception as e:  # noqa: BLE001
        rows.append(dict(kernel="dz (fp16 chunk + offsets)", status="error",
                         note=f"{type(e).__name__}: {str(e)[:300]}"))
    rows.extend(_distill_compiles(tk, z, chunks["fp16"], vec, v, cfg))
    return rows


def distill_warmups(tk, z, fp16_chunk, vec, v) -> list[tuple]:
    """(name, kernel, positional args, constexprs) of the self-distillation kernels to
    compile (the JSD, whose tiles do the most work): on fp32 chunks with bf16 dz, and on
    fp16 chunks with offsets, dz in place (tests bind them to the kernels' signatures)."""
    z16, off = fp16_chunk
    dz = torch.empty(z.shape, dtype=torch.bfloat16, device=z.device)
    consts = (4096, v, 1.0, 0.5, math.log(0.5), math.log(0.5))
    out = []
    for label, zs, dz_out, offsets in (
            ("fp32 chunks", z, dz, {}),
            ("fp16 chunks + offsets", z16, z16.view(torch.bfloat16),
             dict(off_s_ptr=off, stride_off_s=off.shape[1], off_t_ptr=off,
                  stride_off_t=off.shape[1], HAS_OFFSET=True, OFF_BLOCK=OFFSET_BLOCK))):
        out.append((f"distill_row (JSD, {label})", tk.distill_row_kernel,
                    (zs, v, zs, v, vec, vec, vec, vec, *consts), dict(KIND=2, **offsets)))
        out.append((f"distill_dz (JSD, {label})", tk.distill_dz_kernel,
                    (zs, v, zs, v, dz_out, v, vec, vec, vec, vec, vec, *consts),
                    dict(KIND=2, **offsets)))
    return out


def _distill_compiles(tk, z, fp16_chunk, vec, v, cfg) -> list[dict]:
    rows = []
    for name, kernel, args, meta in distill_warmups(tk, z, fp16_chunk, vec, v):
        try:
            c = kernel.warmup(*args, grid=(1,), **meta, **cfg)
            rows.append(dict(kernel=name, status="ok", **_kernel_facts(c)))
        except Exception as e:  # noqa: BLE001 - recorded
            rows.append(dict(kernel=name, status="error", note=f"{type(e).__name__}: {str(e)[:300]}"))
    return rows


# --------------------------------------------------------------------------- 2. correctness

def _rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(n, h, v, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 2).to(dtype).to(device).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype).to(device).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::11] = -100
    old = torch.randn(n, generator=g) * 0.3 - 4.0
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) > 0.2
    return hidden, weight, targets.to(device), old.to(device), adv.to(device), mask.to(device)


def correctness_cases(dry_run: bool) -> list[dict]:
    """The cases of section 2: (op, dtype, forced splits) at the odd sizes."""
    dtypes = ("fp32", "bf16") if dry_run else ("fp32", "bf16", "fp16")
    cases = []
    for dt in dtypes:
        for splits in (1, 3, 7):
            cases.append(dict(op="logprobs", dtype=dt, splits=splits))
        cases.append(dict(op="evidence", dtype=dt, splits=3))
        cases.append(dict(op="ppo_loss", dtype=dt, splits=None))
        cases.append(dict(op="ppo_loss_dual_weighted", dtype=dt, splits=None))
        for divergence in ("jsd", "forward_kl", "reverse_kl"):
            cases.append(dict(op="self_distill", dtype=dt, splits=None, divergence=divergence))
        if dt != "fp32":  # Hopper's default is TMA for 16-bit tiles: the pointer loads too
            cases.append(dict(op="logprobs", dtype=dt, splits=3, tma=False))
            cases.append(dict(op="evidence", dtype=dt, splits=3, tma=False))
        # the gradient chunks' logits from our forward kernel (STORE_Z) instead of the
        # library: fp32, and for 16-bit heads fp16 with tile offsets
        for source in ("triton", "triton-fp16") if dt != "fp32" else ("triton",):
            cases.append(dict(op="logprobs", dtype=dt, splits=None, logits_gemm=source))
            cases.append(dict(op="ppo_loss", dtype=dt, splits=None, logits_gemm=source))
            cases.append(dict(op="self_distill", dtype=dt, splits=None, divergence="jsd",
                              logits_gemm=source))
    # through torch.compile (fullgraph, dynamic N): the custom ops' fake implementations
    # and autograd formulas on this device
    for op in ("logprobs", "ppo_loss"):
        cases.append(dict(op=op, dtype="bf16", splits=None, compiled=True))
    return cases


def _maybe_compiled(fn, case):
    """fn, or fn through torch.compile (aot_eager: no codegen to wait for) for a case
    with ``compiled``."""
    if not case.get("compiled"):
        return fn
    return torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)


def _one_case(case, device, backend, shape):
    import cepo_kernels as ck
    from cepo_kernels import reference, triton_ops
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[case["dtype"]]
    n, h, v = shape["N"], shape["H"], shape["V"]
    hidden, weight, targets, old, adv, mask = _inputs(n, h, v, dtype, device, seed=n + v)
    triton_ops.FORCE_NUM_SPLITS = case["splits"]
    triton_ops.FORCE_TMA = case.get("tma")
    saved_gemm = triton_ops.LOGITS_GEMM
    triton_ops.LOGITS_GEMM = case.get("logits_gemm", saved_gemm)
    saved_chunk = triton_ops.GPU_CHUNK_BYTES
    triton_ops.GPU_CHUNK_BYTES = 6 * v * 64  # chunks of 64 rows: dW accumulates over 6 chunks
    try:
        errs = {}
        if case["op"] == "logprobs":
            out = _maybe_compiled(ck.fused_logprobs, case)(hidden, weight, targets, temperature=0.7,
                                                           return_entropy=True, backend=backend)
            ref = reference.fused_logprobs(hidden, weight, targets, temperature=0.7,
                                           return_entropy=True)
            for name, a, b in zip(("logprobs", "logsumexp", "entropy"), out, ref):
                errs[name] = _rel(a, b)
            wts = torch.linspace(0.5, 1.5, n, device=device)

            def f(o):
                return (wts * o.logprobs).sum() + 0.3 * (wts * o.entropy).sum()
            got = torch.autograd.grad(f(out), [hidden, weight])
            want = torch.autograd.grad(f(ref), [hidden, weight])
        elif case["op"] == "evidence":
            g = torch.Generator().manual_seed(1)
            h_pos = (hidden.detach().float().cpu() + 0.4 * torch.randn(n, h, generator=g)).to(dtype).to(device)
            h_neg = (hidden.detach().float().cpu() + 0.4 * torch.randn(n, h, generator=g)).to(dtype).to(device)
            out = ck.contrastive_evidence(hidden.detach(), h_pos, h_neg, weight.detach(), targets, adv,
                                          mask, lam=0.4, eps_w=0.2, temperature=0.7, backend=backend)
            ref = reference.contrastive_evidence(hidden.detach(), h_pos, h_neg, weight.detach(), targets,
                                                 adv, mask, lam=0.4, eps_w=0.2, temperature=0.7)
            for name in ("lp_policy", "lp_pos", "lp_neg", "delta", "token_advantages"):
                errs[name] = _rel(getattr(out, name), getattr(ref, name))
            got = want = ()
        elif case["op"] == "self_distill":
            g = torch.Generator().manual_seed(2)
            h_teacher = (hidden.detach().float().cpu() + 0.4 * torch.randn(n, h, generator=g)).to(dtype).to(device)
            wts = torch.rand(n, generator=g).to(device) + 0.5
            kw = dict(divergence=case["divergence"], beta=0.3, temperature=0.7, token_weights=wts)
            loss, _ = ck.fused_linear_self_distill_loss(hidden, h_teacher, weight, targets, mask,
                                                        backend=backend, **kw)
            ref_loss, _ = reference.fused_linear_self_distill_loss(hidden, h_teacher, weight, targets,
                                                                   mask, **kw)
            errs["loss"] = _rel(loss, ref_loss)
            got = torch.autograd.grad(loss, [hidden, weight])
            want = torch.autograd.grad(ref_loss, [hidden, weight])
        else:
            kw = dict(temperature=0.7, return_entropy=True)
            if case["op"] == "ppo_loss_dual_weighted":  # dual clip and sequence-mean style weights
                kw.update(clip_dual=3.0, token_weights=torch.linspace(0.2, 2.0, n, device=device))
            loss, _ = _maybe_compiled(ck.fused_linear_ppo_loss, case)(
                hidden, weight, targets, old, adv, mask, backend=backend, **kw)
            ref_loss, _ = reference.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, **kw)
            errs["loss"] = _rel(loss, ref_loss)
            got = torch.autograd.grad(loss, [hidden, weight])
            want = torch.autograd.grad(ref_loss, [hidden, weight])
        for name, a, b in zip(("d_hidden", "d_weight"), got, want):
            if a.dtype != dtype:
                errs[name + "_dtype"] = float("inf")
            errs[name] = _rel(a.float(), b)
    finally:
        triton_ops.FORCE_NUM_SPLITS = None
        triton_ops.FORCE_TMA = None
        triton_ops.LOGITS_GEMM = saved_gemm
        triton_ops.GPU_CHUNK_BYTES = saved_chunk
    tol = (DISTILL_TOL if case["op"] == "self_distill" else TOL)[case["dtype"]]
    worst = max(errs.values())
    label = backend
    if backend == "triton" and case.get("tma") is False:
        label = "triton, TMA off"
    if backend == "triton" and "logits_gemm" in case:
        label = f"triton, chunk logits: {case['logits_gemm']}"
    if case.get("compiled"):
        label = f"{backend}, torch.compile"
    return dict(case, backend=label, errors=errs, worst=worst, tol=tol,
                status="ok" if worst <= tol else "FAIL")


def _big_head_case(device, backend, big_head) -> dict:
    """V x H > 2^31 elements: log-probs of a few rows against fp32 row chunks."""
    import cepo_kernels as ck
    v, h = big_head
    n = 8
    try:
        g = torch.Generator(device=device).manual_seed(0)
        weight = (torch.randn(v, h, generator=g, device=device, dtype=torch.bfloat16) * (h ** -0.5))
        hidden = torch.randn(n, h, generator=g, device=device, dtype=torch.bfloat16)
        targets = torch.randint(0, v, (n,), generator=g, device=device)
        targets[0] = v - 1  # the last row of the head: beyond 2^31 elements in
        out = ck.fused_logprobs(hidden, weight, targets, backend=backend)
        z = hidden.float() @ weight.float().T
        ref = torch.log_softmax(z, -1).gather(1, targets[:, None])[:, 0]
        err = _rel(out.logprobs, ref)
        return dict(op="logprobs V x H > 2^31", dtype="bf16", splits=None, backend=backend,
                    elements=v * h, errors={"logprobs": err}, worst=err, tol=2e-2,
                    status="ok" if err <= 2e-2 else "FAIL")
    except Exception as e:  # noqa: BLE001 - recorded
        return dict(op="logprobs V x H > 2^31", status="error", note=f"{type(e).__name__}: {str(e)[:300]}")


def correctness_section(device, dry_run, big_head) -> list[dict]:
    """Section 2: every case on every engine that runs on device."""
    from cepo_kernels import backend as kb
    backends = ["torch"]
    if device.type == "cuda" or (kb.triton_available() and kb.interpreting()):
        backends.append("triton")
    shape = dict(ODD) if not dry_run else dict(N=37, H=16, V=101)
    rows = []
    for be in backends:
        for case in correctness_cases(dry_run):
            if be == "torch" and (case["splits"] not in (None, 1) or "tma" in case
                                  or "logits_gemm" in case):
                continue  # split counts, tile loads and the logits GEMM are Triton notions
            try:
                rows.append(_one_case(case, device, be, shape))
            except Exception as e:  # noqa: BLE001 - recorded
                rows.append(dict(case, backend=be, status="error",
                                 note=f"{type(e).__name__}: {str(e)[:300]}",
                                 traceback=traceback.format_exc(limit=4)))
    if big_head and not dry_run:
        rows.append(_big_head_case(device, "triton", big_head))
    return rows


# --------------------------------------------------------------------------- 3. timing

def timing_section(device, shape, ops, budget_s, skip=()) -> list[dict]:
    """Section 3: every contender of each op at the shape (but those in skip), through
    the benchmark harness."""
    from bench import contenders as C
    from bench.test_kernels import run_point
    dtype = "bf16" if device.type == "cuda" else "fp32"
    rows, started = [], time.perf_counter()
    saved = dict(C.CONTENDERS)
    try:
        for op in ops:
            C.CONTENDERS[op] = [(n, f) for n, f in saved[op] if n not in skip]
        rows = _time_ops(device, shape, ops, budget_s, dtype, started, C, run_point)
    finally:
        C.CONTENDERS.update(saved)
    for op in VARIANTS:
        if op not in ops:
            continue
        if time.perf_counter() - started > budget_s + VARIANT_SECONDS:
            rows.append(dict(op=op, contender="ours, engine variants", status="skipped",
                             note=f"time budget of {budget_s:.0f} s spent"))
            continue
        rows.extend(variant_timing(device, shape, op))
    return rows


VARIANT_SECONDS = 65.0
"""About what the engine variants take at the target shape (three ops, nine settings in all,
a compile, a peak-memory call and a quarter-second do_bench per setting): the timing
budget covers them, so they still run when the contenders used the whole budget, but not
beyond it."""


VARIANTS = {  # op -> (label, ((module in cepo_kernels, setting, value), ...)); the first is the default
    "evidence": (("ours, default loads", (("triton_ops", "FORCE_TMA", None),)),
                 ("ours, pointer loads (TMA off)", (("triton_ops", "FORCE_TMA", False),))),
    "ppo_loss": (("ours, chunk logits: library GEMM", (("triton_ops", "LOGITS_GEMM", "library"),)),
                 ("ours, chunk logits: our GEMM (STORE_Z)", (("triton_ops", "LOGITS_GEMM", "triton"),)),
                 ("ours, chunk logits: our GEMM, fp16 + tile offsets",
                  (("triton_ops", "LOGITS_GEMM", "triton-fp16"),)),
                 ("ours, lean memory: bf16 dW, 512 MiB chunks",
                  (("chunked", "DW_ACCUMULATION", "weight"), ("triton_ops", "GPU_CHUNK_BYTES", 512 << 20)))),
    "self_distill": (("ours, chunk logits: library GEMM", (("triton_ops", "LOGITS_GEMM", "library"),)),
                     ("ours, chunk logits: our GEMM (STORE_Z)", (("triton_ops", "LOGITS_GEMM", "triton"),)),
                     ("ours, chunk logits: our GEMM, fp16 + tile offsets",
                      (("triton_ops", "LOGITS_GEMM", "triton-fp16"),))),
}
"""Engine choices that only a GPU can settle, timed against each other at the timing shape
(bf16), with their peak extra memory: the forward's tile loads, where the gradient chunks'
logits come from (the PPO loss's and the self-distillation loss's), and the memory-lean
gradient path (dW accumulated in the bf16 gradient, a quarter of the chunk budget: no
1.24 GB fp32 accumulator at V 151,936, H 2048) that the issue's 2%-of-naive memory target
needs."""


@contextlib.contextmanager
def engine_settings(settings):
    """Set each (module, name, value) of cepo_kernels for the duration; restore after."""
    import importlib
    saved = []
    try:
        for module, name, value in settings:
            mod = importlib.import_module(f"cepo_kernels.{module}")
            if not hasattr(mod, name):
                raise AttributeError(f"cepo_kernels.{module} has no setting {name}")
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def variant_timing(device, shape, op) -> list[dict]:
    """``op`` (evidence | ppo_loss | self_distill, bf16) under each of its VARIANTS: time and
    peak extra memory; every row after the first notes its time ratio to the first."""
    if device.type != "cuda":
        return [dict(op=op, contender="ours, engine variants", status="skipped",
                     note="no CUDA (dry run)")]
    import triton.testing
    from bench import contenders as C
    from bench.timing import cuda_call_with_peak
    pt = C.Point(op, shape["N"], shape["V"], shape["H"], "bf16", seq_len=min(shape["N"], 1024))
    run = getattr(C, f"ours_{op}")(C.make_inputs(pt, str(device)))
    rows = []
    for label, settings in VARIANTS[op]:
        try:
            with engine_settings(settings):
                run()  # compile and autotune this variant outside the timing
                _, peak_mb = cuda_call_with_peak(run, device)
                ms = triton.testing.do_bench(run, warmup=25, rep=250)
                row = dict(op=op, contender=label, time_ms=ms, peak_extra_mb=peak_mb, status="ok")
                if any(name == "FORCE_TMA" for _, name, _ in settings):
                    row["note"] = f"TMA used: {_tma_used(device, shape)}"
            if rows and rows[0].get("time_ms"):
                row["note"] = (row.get("note", "") + f"; {ms / rows[0]['time_ms']:.3f}x "
                               "the first").lstrip("; ")
            rows.append(row)
        except Exception as e:  # noqa: BLE001 - recorded
            rows.append(dict(op=op, contender=label, status="error",
                             note=f"{type(e).__name__}: {str(e)[:300]}"))
    return rows


def _tma_used(device, shape) -> bool:
    """Whether the forward takes TMA loads for bf16 rows of the timing shape's H, under
    the settings in force (``variant_timing`` sets them)."""
    from cepo_kernels import triton_ops
    probe = torch.empty(16, shape["H"], dtype=torch.bfloat16, device=device)
    return triton_ops.use_tma(device, probe, probe)


def _time_ops(device, shape, ops, budget_s, dtype, started, C, run_point) -> list[dict]:
    rows = []
    for op in ops:
        if time.perf_counter() - started > budget_s:
            rows.append(dict(op=op, contender="all", status="skipped",
                             note=f"time budget of {budget_s:.0f} s spent"))
            continue
        pt = C.Point(op, shape["N"], shape["V"], shape["H"], dtype, seq_len=min(shape["N"], 1024))
        try:
            rows.extend(run_point(pt, str(device)))
        except Exception as e:  # noqa: BLE001 - recorded
            rows.append(dict(op=op, contender="all", status="error", note=f"{type(e).__name__}: {str(e)[:300]}"))
    return rows


# --------------------------------------------------------------------------- 4. sampler

def sampler_section(device, dry_run: bool) -> list[dict]:
    """Lean decoding steps on ``device``: the worst relative logit error against the
    model's forward (fp32, bf16), then one timed generate call with and without them."""
    import tempfile
    from pathlib import Path

    from bench import trainer

    rows = []
    small = dict(trainer.QWEN3_0_6B, num_hidden_layers=2, vocab_size=4096)
    for dtype, tol in ((torch.float32, TOL["fp32"]), (torch.bfloat16, 3e-2)):
        name = str(dtype).removeprefix("torch.")
        try:
            model = trainer.random_model(small, dtype).to(device).eval()
            ref, lean = trainer.lean_and_model_logits(model, batch=6, width=9, steps=8,
                                                      drop_at={4: [0, 2, 5]})
            worst = max(_rel(b.double(), a.double()) for a, b in zip(ref, lean))
            rows.append(dict(check="lean logits vs model forward", dtype=name, worst=worst,
                             tol=tol, status="ok" if worst <= tol else "FAIL"))
        except Exception as e:  # recorded, the other checks still run
            rows.append(dict(check="lean logits vs model forward", dtype=name, status="error",
                             note=f"{type(e).__name__}: {e}"[:300]))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if dry_run:
                path, dtype, prompts, n, new_tokens = trainer.TINY_ASSET, torch.float32, 4, 4, 16
            else:
                dtype, prompts, n, new_tokens = torch.bfloat16, 16, 8, 64
                path = trainer.random_model_dir(Path(tmp) / "m", trainer.QWEN3_0_6B, dtype)
            result = trainer.sampler_decode(path, device=device.type, dtype=dtype,
                                            prompts=prompts, n=n, max_new_tokens=new_tokens,
                                            rounds=1 if dry_run else 3)
        for r in result["rows"]:
            rows.append(dict(check=f"generate {prompts} x {n}, {new_tokens} tokens: "
                                   f"{r['decoder']}", dtype=str(dtype).removeprefix("torch."),
                             seconds=r["median_s"], tokens_per_s=r["tokens_per_s"],
                             speedup=result["speedup"] if r["decoder"] == "lean" else 1.0,
                             same_tokens=result["same_tokens"], status="ok"))
    except Exception as e:
        rows.append(dict(check="generate with and without lean steps", status="error",
                         note=f"{type(e).__name__}: {e}"[:300]))
    return rows


# --------------------------------------------------------------------------- 5. report

def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        return f"{x:.3g}"
    return str(x)


def markdown(report: dict) -> str:
    """The report as markdown tables (one per section)."""
    m = report["meta"]
    lines = [f"# cepo_kernels GPU check: {m['device']}", "",
             f"- date: {m['date']}; command: `{m['command']}`; dry run: {_fmt(m['dry_run'])}",
             f"- torch {m['versions'].get('torch')}, triton {m['versions'].get('triton')}, "
             f"liger-kernel {m['versions'].get('liger-kernel')}, cut-cross-entropy "
             f"{m['versions'].get('cut-cross-entropy')}",
             f"- timing shape: N={m['shape']['N']} H={m['shape']['H']} V={m['shape']['V']}; "
             f"wall time {m.get('wall_s', 0):.0f} s", ""]
    comp = report.get("compile")
    if comp is not None:
        lines += ["## Compile", "", "| kernel | status | registers | spills | shared bytes | wgmma | TMA | note |",
                  "|---|---|---:|---:|---:|---|---|---|"]
        for r in comp:
            lines.append("| " + " | ".join([r["kernel"], r["status"], _fmt(r.get("registers")),
                                            _fmt(r.get("spills")), _fmt(r.get("shared_bytes")),
                                            _fmt(r.get("wgmma")), _fmt(r.get("tma")),
                                            (r.get("note") or "").replace("|", "/")]) + " |")
        lines.append("")
    corr = report.get("correctness")
    if corr is not None:
        lines += ["## Correctness (relative error against float64)", "",
                  "| op | dtype | splits | backend | worst rel err | tol | status | errors |",
                  "|---|---|---:|---|---:|---:|---|---|"]
        for r in corr:
            errs = ", ".join(f"{k} {_fmt(v)}" for k, v in (r.get("errors") or {}).items())
            lines.append("| " + " | ".join([r.get("op", "-"), r.get("dtype", "-"), _fmt(r.get("splits")),
                                            r.get("backend", "-"), _fmt(r.get("worst")), _fmt(r.get("tol")),
                                            r["status"], (errs or r.get("note") or "").replace("|", "/")]) + " |")
        lines.append("")
    samp = report.get("sampler")
    if samp is not None:
        lines += ["## Sampler: lean decoding steps", "",
                  "| check | dtype | worst rel err | tol | seconds | tokens/s | speed-up | "
                  "same tokens | status |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
        for r in samp:
            status = r["status"] if not r.get("note") else f"{r['status']}: {r['note']}"
            lines.append("| " + " | ".join([r["check"], r.get("dtype", "-"), _fmt(r.get("worst")),
                                            _fmt(r.get("tol")), _fmt(r.get("seconds")),
                                            _fmt(r.get("tokens_per_s")), _fmt(r.get("speedup")),
                                            _fmt(r.get("same_tokens")),
                                            status.replace("|", "/")]) + " |")
        lines.append("")
    tim = report.get("timing")
    if tim is not None:
        lines += ["## Timing", "", "| op | contender | time ms | x floor | TFLOP/s | peak extra MB | status |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for r in tim:
            status = r.get("status", "-")
            if r.get("note"):
                status = f"{status}: {r['note']}"
            lines.append("| " + " | ".join([r.get("op", "-"), r.get("contender", "-"), _fmt(r.get("time_ms")),
                                            _fmt(r.get("x_floor")), _fmt(r.get("tflops")),
                                            _fmt(r.get("peak_extra_mb")), status.replace("|", "/")]) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, report: dict) -> list[str]:
    """gpu_check.json and gpu_check.md in out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "gpu_check.json"), os.path.join(out_dir, "gpu_check.md")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(paths[1], "w") as f:
        f.write(markdown(report))
    return paths


def _versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "liger-kernel", "cut-cross-entropy"):
        try:
            out[pkg] = metadata.version(pkg)
        except Exception:
            out[pkg] = None
    return out


def main(argv=None) -> int:
    """Run the sections asked for and write the report; exit status 1 if a check failed."""
    args = parse_args(argv)
    device = device_for(args)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    report = {"meta": dict(device=name, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           command="python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                           dry_run=args.dry_run, shape=args.shape, versions=_versions())}
    if "compile" in args.sections:
        report["compile"] = compile_section(device, args.shape)
        write_report(args.out, report)  # partial results survive a later crash or timeout
    if "correctness" in args.sections:
        report["correctness"] = correctness_section(device, args.dry_run, args.big_head)
        write_report(args.out, report)
    if "sampler" in args.sections:
        report["sampler"] = sampler_section(device, args.dry_run)
        write_report(args.out, report)
    if "timing" in args.sections:
        report["timing"] = timing_section(device, args.shape, args.ops, args.budget_s, args.skip)
    report["meta"]["wall_s"] = time.perf_counter() - started
    paths = write_report(args.out, report)
    print(markdown(report))
    print("wrote " + ", ".join(paths))
    failed = [r for sec in ("compile", "correctness", "sampler") for r in report.get(sec) or []
              if r.get("status") in ("FAIL", "error")]
    failed += [r for r in report.get("timing") or [] if r.get("status") in ("mismatch", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
