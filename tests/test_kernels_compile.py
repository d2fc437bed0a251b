"""The ops under torch.compile: each is a torch.library custom op (schema, fake
implementation, autograd formula), so a compiled loss traces it as one opaque call with
fullgraph=True and a symbolic N, and gets eager's values and gradients."""

import os
import subprocess
import sys

import pytest
import torch

import cepo_kernels as ck
from cepo_kernels import _autograd, backend
from kernel_cases import head_inputs

H, V = 16, 67
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _extras(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) - 4.0, torch.randn(n, generator=g),
            torch.rand(n, generator=g) > 0.2, torch.rand(n, generator=g) + 0.5)


def _ppo(hidden, weight, targets, extras, backend):
    old, adv, mask, weights = extras
    loss, stats = ck.fused_linear_ppo_loss(hidden, weight, targets, old, adv, mask, temperature=0.8,
                                           return_entropy=True, clip_dual=3.0,
                                           token_weights=weights, backend=backend)
    return loss * 1.5, stats.approx_kl + stats.entropy, stats.logprobs


def _logprobs(hidden, weight, targets, extras, backend):
    _, adv, _, _ = extras
    out = ck.fused_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True,
                            backend=backend)
    return (out.logprobs * adv).sum() + 0.1 * out.entropy.sum(), out.logsumexp, out.logprobs


def _distill(hidden, weight, targets, extras, backend):
    _, _, mask, weights = extras
    loss, stats = ck.fused_linear_self_distill_loss(hidden, (hidden * 0.8).detach(), weight,
                                                    targets, mask, divergence="jsd", beta=0.3,
                                                    token_weights=weights, backend=backend)
    return loss, stats.divergence, stats.token_divergence


def _evidence(hidden, weight, targets, extras, backend):
    _, adv, mask, _ = extras
    h = hidden.detach()
    out = ck.contrastive_evidence(h, h * 1.1, h * 0.9, weight.detach(), targets, adv, mask,
                                  lam=0.5, eps_w=0.2, backend=backend)
    return out.token_advantages.sum(), out.delta, out.lp_pos


OPS = {"ppo_loss": _ppo, "logprobs": _logprobs, "self_distill": _distill, "evidence": _evidence}


def _run(fn, n, backend, seed):
    hidden, weight, targets = head_inputs(n, H, V, torch.float32, "cpu", seed=seed, ignore=(1,),
                                          requires_grad=True)
    outs = fn(hidden, weight, targets, _extras(n, seed), backend)
    grads = (torch.autograd.grad(outs[0], [hidden, weight]) if outs[0].requires_grad else ())
    return [o.detach() for o in outs], list(grads)


INTERPRETER = backend.triton_available() and backend.interpreting()


@pytest.mark.parametrize("op,engine", [(op, "torch") for op in OPS] + [
    pytest.param(op, "triton", marks=pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1"))
    for op in ("ppo_loss", "logprobs")])
def test_fullgraph_with_symbolic_rows_matches_eager(op, engine):
    """fullgraph=True (no graph break, so no Python fallback inside the op), dynamic N:
    a new row count reuses the graph; values and gradients equal eager's (both engines:
    the Triton one under the interpreter)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = OPS[op]
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for n, seed in ((37, 0), (53, 1), (1, 2)):
        got, got_grads = _run(compiled, n, engine, seed)
        want, want_grads = _run(fn, n, engine, seed)
        frames.append(counter.frame_count)
        assert len(got_grads) == (0 if op == "evidence" else 2)
        for a, b in zip(got + got_grads, want + want_grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert frames[0] >= 1 and frames[1] == frames[0], frames  # a new N: no recompile


def test_inductor_compiles_a_loss_around_the_op():
    """The default backend (inductor) fuses the user's code around the PPO op."""
    torch._dynamo.reset()
    compiled = torch.compile(_ppo, fullgraph=True)
    got, got_grads = _run(compiled, 29, "torch", 3)
    want, want_grads = _run(_ppo, 29, "torch", 3)
    for a, b in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_targets_are_named_under_compile():
    """The targets' values are checked inside the op, so a compiled call still names them."""
    torch._dynamo.reset()
    compiled = torch.compile(_logprobs, backend="aot_eager", fullgraph=True)
    hidden, weight, targets = head_inputs(9, H, V, torch.float32, "cpu", requires_grad=True)
    with pytest.raises(ValueError, match="'targets' has value 67"):
        compiled(hidden, weight, targets.clone().fill_(V), _extras(9), "torch")


def _samples():
    hidden, weight, targets = head_inputs(13, H, V, torch.float32, "cpu", ignore=(2,),
                                          requires_grad=True)
    old, adv, mask, weights = _extras(13)
    y = torch.where(targets == ck.IGNORE_INDEX, 0, targets)
    lse = torch.logsumexp(hidden.detach() @ weight.detach().T, dim=-1)
    h2, h3 = (hidden.detach() * 1.1), (hidden.detach() * 0.9)
    return {
        "logprobs": (_autograd.LOGPROBS.op, (hidden, weight, targets, 0.7, True, "chunked")),
        "logprobs_backward": (_autograd.LOGPROBS_BACKWARD.op,
                              (hidden.detach(), weight.detach(), y, lse, adv, -adv, None, 1.0,
                               "chunked", True, True)),
        "evidence": (_autograd.EVIDENCE.op, (hidden.detach(), h2, h3, weight.detach(), targets, adv,
                                           mask, 0.5, 0.2, 1.0, "chunked")),
        "ppo_loss": (_autograd.PPO_LOSS.op, (hidden, weight, targets, old, adv, mask, None, weights,
                                           0.2, 0.28, 0.8, None, 0.0, True, 3.0, "chunked", True,
                                           True)),
        "self_distill_loss": (_autograd.SELF_DISTILL_LOSS.op,
                              (hidden, h2, weight, targets, mask, weights, 0.9, None, 0.3, "jsd",
                               "chunked", True, True)),
    }


@pytest.mark.parametrize("name", ["logprobs", "logprobs_backward", "evidence", "ppo_loss",
                                  "self_distill_loss"])
def test_opcheck(name):
    """torch.library.opcheck: the schema says what the op does (no input mutated or
    aliased), the fake implementation gives the real one's shapes and dtypes, and the
    autograd registration is the one autograd uses (eager and AOT, dynamic shapes)."""
    op, args = _samples()[name]
    torch.library.opcheck(op, args)


def test_one_registration_when_the_folder_is_also_imported_as_kernels():
    """From the repository root the kernels folder is also importable as ``kernels`` (the
    name of Hugging Face's kernels package, which transformers probes by importing it).
    That import stays empty, so the custom ops are registered once and keep working after
    the stray module is collected (a second registration used to unregister the first:
    a crash in a later call)."""
    code = (
        "import gc, sys, torch\n"
        "import kernels\n"
        "import cepo_kernels as ck\n"
        "assert kernels.__all__ == [] and not hasattr(kernels, '__version__')\n"
        "try:\n"
        "    import kernels._autograd\n"
        "    raise SystemExit('kernels._autograd imported')\n"
        "except ImportError as e:\n"
        "    assert 'cepo_kernels' in str(e)\n"
        "del sys.modules['kernels'], kernels\n"
        "gc.collect()\n"
        "h = torch.randn(5, 8, requires_grad=True)\n"
        "w = torch.randn(11, 8, requires_grad=True)\n"
        "lp = ck.fused_logprobs(h, w, torch.arange(5)).logprobs\n"
        "lp.sum().backward()\n"
        "assert h.grad is not None and torch.isfinite(h.grad).all()\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
