"""bench/gpu_check.py without a GPU: argument parsing, report writing, and a dry run of
every section on CPU at tiny shapes."""

import importlib.util
import json
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "bench", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_args_defaults_and_errors(gpu_check, tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path)])
    assert args.sections == ["compile", "correctness", "sampler", "timing"]
    assert args.shape == dict(N=16_384, H=2048, V=151_936) and not args.dry_run
    assert args.big_head[0] * args.big_head[1] > 2 ** 31
    args = gpu_check.parse_args(["--dry-run", "--sections", "correctness", "--ops", "ppo_loss",
                                 "--shape", "8,4,16", "--big-head", "0,0"])
    assert args.sections == ["correctness"] and args.ops == ["ppo_loss"]
    assert args.shape == dict(N=8, H=4, V=16) and args.big_head is None
    assert gpu_check.parse_args(["--dry-run"]).shape == gpu_check.TINY
    for bad in (["--sections", "compile,bogus"], ["--ops", "nope"], ["--shape", "1,2"],
                ["--big-head", "x"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_real_run_needs_cuda(gpu_check):
    with pytest.raises(SystemExit, match="--dry-run"):
        gpu_check.device_for(gpu_check.parse_args([]))


def test_report_writing(gpu_check, tmp_path):
    report = {
        "meta": dict(device="X", date="d", command="c", dry_run=False, shape=dict(N=1, H=2, V=3),
                     versions={}, wall_s=1.0),
        "compile": [dict(kernel="k", status="ok", registers=128, spills=0, shared_bytes=98304,
                         wgmma=True, tma=False)],
        "correctness": [dict(op="logprobs", dtype="bf16", splits=3, backend="triton",
                             errors={"logprobs": 1e-3}, worst=1e-3, tol=2e-2, status="ok")],
        "sampler": [dict(check="lean logits vs model forward", dtype="bfloat16", worst=0.01,
                         tol=0.03, status="ok"),
                    dict(check="generate 16 x 8, 64 tokens: lean", dtype="bfloat16",
                         seconds=0.5, tokens_per_s=8000.0, speedup=3.2, same_tokens=True,
                         status="ok")],
        "timing": [dict(op="ppo_loss", contender="ours", time_ms=12.5, x_floor=1.1, tflops=700.0,
                        peak_extra_mb=300.0, status="ok"),
                   dict(op="ppo_loss", contender="cce", status="n/a", note="n/a | reason")],
    }
    paths = gpu_check.write_report(str(tmp_path), report)
    assert [os.path.basename(p) for p in paths] == ["gpu_check.json", "gpu_check.md"]
    assert json.load(open(paths[0]))["compile"][0]["registers"] == 128
    md = open(paths[1]).read()
    assert "| k | ok | 128 | 0 | 98304 | yes | no |" in md
    assert "| logprobs | bf16 | 3 | triton | 0.001 | 0.02 | ok |" in md
    assert "| ppo_loss | ours | 12.5 | 1.1 | 700 | 300 | ok |" in md
    assert "n/a: n/a / reason" in md  # a '|' in a note cannot break the table
    assert "| lean logits vs model forward | bfloat16 | 0.01 | 0.03 | - | - | - | - | ok |" in md
    assert ("| generate 16 x 8, 64 tokens: lean | bfloat16 | - | - | 0.5 | 8e+03 | 3.2 | yes "
            "| ok |") in md


def test_dry_run_end_to_end(gpu_check, tmp_path):
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--ops", "ppo_loss,evidence",
                         "--shape", "64,16,256", "--skip", "torch.compile,cce"])  # no cold compiles
    report = json.load(open(tmp_path / "gpu_check.json"))
    assert rc == 0, open(tmp_path / "gpu_check.md").read()
    assert report["meta"]["dry_run"] and report["compile"][0]["status"] == "skipped"
    corr = report["correctness"]
    assert corr and all(r["status"] == "ok" for r in corr)
    assert {r["op"] for r in corr} == {"logprobs", "evidence", "ppo_loss", "ppo_loss_dual_weighted",
                                       "self_distill"}
    assert {r["divergence"] for r in corr if r["op"] == "self_distill"} == {
        "jsd", "forward_kl", "reverse_kl"}
    assert {(r["op"], r["backend"]) for r in corr if r.get("compiled")} >= {
        ("logprobs", "torch, torch.compile"), ("ppo_loss", "torch, torch.compile")}
    if any(r["backend"] == "triton" for r in corr):  # the interpreter: the variants too
        assert {(r["op"], r["dtype"]) for r in corr if r["backend"] == "triton, TMA off"} == {
            ("logprobs", "bf16"), ("evidence", "bf16")}
        assert {(r["op"], r["dtype"]) for r in corr
                if r["backend"] == "triton, chunk logits: triton"} == {
            ("logprobs", "bf16"), ("logprobs", "fp32"), ("ppo_loss", "bf16"), ("ppo_loss", "fp32"),
            ("self_distill", "bf16"), ("self_distill", "fp32")}
        assert {(r["op"], r["dtype"]) for r in corr
                if r["backend"] == "triton, chunk logits: triton-fp16"} == {
            ("logprobs", "bf16"), ("ppo_loss", "bf16"), ("self_distill", "bf16")}
    sampler = report["sampler"]
    assert [r["status"] for r in sampler] == ["ok"] * 4, sampler
    assert sampler[0]["worst"] <= 1e-5 and sampler[2]["same_tokens"] and sampler[2]["seconds"] > 0
    timed = {(r["op"], r["contender"]): r for r in report["timing"]}
    assert timed[("ppo_loss", "ours")]["status"] == "ok" and timed[("ppo_loss", "ours")]["time_ms"] > 0
    assert timed[("evidence", "floor")]["status"] == "ok"
    assert ("ppo_loss", "torch.compile") not in timed
    assert timed[("evidence", "ours, engine variants")]["status"] == "skipped"
    assert timed[("ppo_loss", "ours, engine variants")]["status"] == "skipped"
    assert "## Timing" in open(tmp_path / "gpu_check.md").read()


def test_forward_warmup_args_bind_to_the_kernel(gpu_check):
    """Section 1 compiles the forward with hand-built arguments (no GPU here to try them):
    they must bind to the kernel's signature, every variant, each buffer in its place."""
    import inspect
    from cepo_kernels import triton_kernels as tk
    sig = inspect.signature(getattr(tk.stacked_fwd_kernel, "fn", tk.stacked_fwd_kernel))
    blocks = dict(BLOCK_M=128, BLOCK_V=128, BLOCK_D=64, GROUP_M=8)
    hid, w, y = torch.empty(3, 16, 32), torch.empty(16, 32), torch.zeros(16, dtype=torch.int64)
    vec = torch.empty(16)
    i32, i8 = torch.zeros(16, dtype=torch.int32), torch.zeros(16, dtype=torch.int8)
    chunks = {None: (None, None), "fp32": (torch.empty(16, 512), None),
              "fp16": (torch.empty(16, 512, dtype=torch.float16), torch.empty(16, 4))}
    from cepo_kernels import triton_ops
    assert gpu_check.OFFSET_BLOCK == min(c[1] for c in triton_ops.CUDA_CONFIGS)
    assert {v[3] for v in gpu_check.FORWARD_VARIANTS} == set(chunks)
    for k, epi, tma, store_z in gpu_check.FORWARD_VARIANTS:
        descs = ("h_desc", "w_desc") if tma else (None, None)
        z, off = chunks[store_z]
        args, meta = gpu_check.forward_warmup_args(hid, w, y, vec, i32, i8, 16384, 512, 32, descs,
                                                   z, k, epi, tma, off=off)
        bound = sig.bind(*args, **meta, **blocks).arguments  # TypeError if the count is off
        assert bound["y_ptr"] is y and bound["ticket_ptr"] is i32 and bound["clipped_ptr"] is i8
        assert bound["h_desc"] == descs[0] and bound["N"] == 16384 and bound["V"] == 512
        assert bound["vocab_per_split"] == 1024 and bound["STORE_Z"] == (z is not None)
        assert (bound["z_ptr"] is z) == (z is not None)
        assert bound["Z_OFFSET"] == (off is not None) and (bound["off_ptr"] is off) == (off is not None)
        if off is not None:
            assert bound["stride_off"] == 4 and bound["OFF_BLOCK"] == gpu_check.OFFSET_BLOCK


def test_distill_warmup_args_bind_to_the_kernels(gpu_check):
    """Section 1's self-distillation compiles: arguments bind to each kernel's signature,
    the fp16 chunks with their offsets and dz in their own bytes."""
    import inspect
    from cepo_kernels import triton_kernels as tk
    z, vec = torch.empty(16, 512), torch.empty(16)
    z16, off = torch.empty(16, 512, dtype=torch.float16), torch.empty(16, 4)
    warmups = gpu_check.distill_warmups(tk, z, (z16, off), vec, 512)
    assert len(warmups) == 4
    for name, kernel, args, meta in warmups:
        sig = inspect.signature(getattr(kernel, "fn", kernel))
        bound = sig.bind(*args, **meta, BLOCK_R=4, BLOCK_V=1024).arguments
        assert bound["KIND"] == 2 and bound["V"] == 512 and bound["R"] == 4096
        fp16 = "fp16" in name
        assert (bound["zs_ptr"] is z16) == fp16 and bound.get("HAS_OFFSET", False) == fp16
        if fp16:
            assert bound["off_s_ptr"] is off and bound["stride_off_s"] == 4
            assert bound["OFF_BLOCK"] == gpu_check.OFFSET_BLOCK
        if "dz" in name:
            assert bound["dz_ptr"].dtype == torch.bfloat16
            assert (bound["dz_ptr"].data_ptr() == z16.data_ptr()) == fp16


@pytest.mark.parametrize("op", ["evidence", "ppo_loss", "self_distill"])
def test_engine_variants_apply_restore_and_agree(gpu_check, op):
    """Every VARIANTS setting names a real engine setting, is restored afterwards, and the
    op under it gives the default's result (on CPU: the chunked engine, and the Triton
    engine under the interpreter where it is on)."""
    import cepo_kernels as ck
    from bench import contenders as C
    from cepo_kernels import backend as kb
    variants = gpu_check.VARIANTS[op]
    assert len(variants) >= 2
    inp = C.make_inputs(C.Point(op, 37, 101, 16, "bf16", seq_len=37), "cpu")
    engines = ["torch"] + (["triton"] if kb.triton_available() and kb.interpreting() else [])
    for engine in engines:
        def run():
            if op == "evidence":
                out = ck.contrastive_evidence(inp.h_policy, inp.h_pos, inp.h_neg, inp.weight,
                                              inp.targets, inp.advantages, inp.has_negative,
                                              lam=0.5, eps_w=0.2, backend=engine)
                return [out.lp_policy, out.lp_pos, out.lp_neg, out.token_advantages]
            if op == "self_distill":
                loss, _ = ck.fused_linear_self_distill_loss(inp.hidden, inp.h_teacher, inp.weight,
                                                            inp.targets, inp.mask, backend=engine)
            else:
                loss, _ = ck.fused_linear_ppo_loss(inp.hidden, inp.weight, inp.targets,
                                                   inp.old_logprobs, inp.advantages, inp.mask,
                                                   backend=engine)
            return [loss, *torch.autograd.grad(loss, (inp.hidden, inp.weight))]

        outs = []
        for label, settings in variants:
            before = _settings_now(settings)
            with gpu_check.engine_settings(settings):
                assert _settings_now(settings) == [v for _, _, v in settings], label
                outs.append(run())
            assert _settings_now(settings) == before, label
        assert len(outs[0]) == (4 if op == "evidence" else 3)
        for out, (label, _) in zip(outs[1:], variants[1:]):
            for a, b in zip(out, outs[0]):
                torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3,
                                           msg=f"{engine}: {label}")
    with pytest.raises(AttributeError, match="no setting"):
        with gpu_check.engine_settings((("chunked", "NO_SUCH_SETTING", 1),)):
            pass


def _settings_now(settings):
    import importlib
    return [getattr(importlib.import_module(f"cepo_kernels.{m}"), n) for m, n, _ in settings]
