"""The contenders of the kernel benchmarks: one function per contender per op.

Each function takes the prepared inputs of one benchmark point (``make_inputs``) and
returns either a zero-argument callable that runs the contender once on them, or an
``NA`` saying why it cannot run here. Every callable of an op returns the same thing,
so outputs can be compared with ours before anything is timed:

- ``logprobs``:  log p(y_t) [N] (forward only, no gradient);
- ``logprobs_grad``: (log p(y_t) [N], d sum(lp) / d hidden, d sum(lp) / d weight):
  forward and backward (the upstream gradient arrives after the forward);
- ``evidence``:  (lp_policy, lp_pos, lp_neg, token_advantages), each [N] (forward only);
- ``ppo_loss_fwd``: (loss,): the PPO loss forward only (under no_grad);
- ``ppo_loss``:  (loss, d loss / d hidden, d loss / d weight): forward and backward;
- ``self_distill``: (loss, d loss / d h_student, d loss / d weight): the self-distillation
  loss (generalised JSD, beta 0.5, teacher stop-gradient), forward and backward.

Peers without a three-context op do the same work as three separate log-prob calls
plus the epilogue in PyTorch (``cepo_kernels._math.evidence_epilogue``); peers without
a PPO loss get their log-probs from their own op and the PPO surrogate in PyTorch, with
autograd through it. The floor is the bare LM-head matrix products (``torch.matmul``)
the op cannot avoid: one for ``logprobs``, three for ``evidence``, and the forward
product plus the two backward products (dh = dz W, dW = dz^T h) for ``ppo_loss``, and
the student's and the teacher's logits plus the two backward products for ``self_distill``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch

import cepo_kernels
from cepo_kernels import _math

OPS = ("logprobs", "logprobs_grad", "evidence", "ppo_loss_fwd", "ppo_loss", "self_distill")
HEAD_PRODUCTS = {"logprobs": 1, "logprobs_grad": 4, "evidence": 3, "ppo_loss_fwd": 1, "ppo_loss": 3,
                 "self_distill": 4}
"""LM-head products each op must do: the log-prob backward recomputes the logits (its
upstream gradient arrives later: 4); the PPO loss knows its gradient in the forward (3);
the self-distillation loss too, but it needs the teacher's logits as well (4)."""
GRAD_OPS = ("logprobs_grad", "ppo_loss", "self_distill")
DISTILL_BETA = 0.5
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
LAM, EPS_W = 0.5, 0.2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Qwen2/2.5 hidden sizes with their 151,936-token vocabulary, and Llama-3 8B.
FULL_HEADS = ((896, 151_936), (1536, 151_936), (2048, 151_936), (3584, 151_936),
              (4096, 151_936), (4096, 128_256))
FULL_N = (1024, 4096, 16_384, 32_768)

COMPILE_BUDGET_S = 60.0
"""On CPU, torch.compile is skipped for the rest of the session once it has spent this long compiling."""

compile_spent_s = 0.0


# --------------------------------------------------------------------------- points

@dataclass(frozen=True)
class Point:
    """One benchmark point: an op at one shape (N response tokens, vocabulary V, hidden H) and dtype."""
    op: str
    N: int
    V: int
    H: int
    dtype: str
    seq_len: int  # tokens per sequence (Liger's GRPO loss takes [B, T, H]; advantages are per sequence)

    @property
    def id(self) -> str:
        return f"{self.op}-N{self.N}-V{self.V}-H{self.H}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def flops(self) -> float:
        """2 N V H per LM-head product the op must do."""
        return 2.0 * self.N * self.V * self.H * HEAD_PRODUCTS[self.op]


def points(size: str, device: str) -> list[Point]:
    """The benchmark matrix: 'tiny' (smoke test), 'small' (the CPU matrix) or 'full' (model heads)."""
    cuda = torch.device(device).type == "cuda"
    if size == "tiny":
        heads, ns = ((64, 4096),), (256, 512)
        dtypes = ("bf16",) if cuda else ("fp32", "bf16")
    elif size == "small":
        # N 4096 is the CPU target point; 1024 shows the trend. (256 was dropped,
        # and self_distill runs at 1024 only, to keep a cold-cache run within 10 minutes
        # on 2 cores.)
        heads, ns = ((256, 32_000),), (1024, 4096)
        dtypes = ("bf16",) if cuda else ("fp32", "bf16")
    elif size == "full":
        heads, ns, dtypes = FULL_HEADS, FULL_N, ("bf16",)
    else:
        raise ValueError(f"unknown benchmark size {size!r} (tiny | small | full)")
    out = []
    for op in OPS:
        for dtype in dtypes:
            for h, v in heads:
                for n in ns:
                    if op == "self_distill" and size == "small" and not cuda and n > 1024:
                        continue  # its naive and Liger peers take 12-14 s a call at N 4096
                    out.append(Point(op, n, v, h, dtype, seq_len=min(n, 1024)))
    return out


# --------------------------------------------------------------------------- inputs

def make_inputs(point: Point, device, seed: int = 0) -> SimpleNamespace:
    """Seeded inputs for one point; the same object is handed to every contender.

    Drawn on the device itself (a 151,936 x 4,096 head would take seconds on the host).
    Logits have a standard deviation of about 2 (weight ~ N(0, 4 / H), hidden ~ N(0, 1));
    responses are ``seq_len``-token sequences with one advantage each. For the PPO loss
    each sequence keeps a random length in [T/2, T] (mask), and the old log-probs are
    the current ones plus N(0, 0.1) noise so that both clip bounds bind on some tokens.
    """
    device = torch.device(device)
    dt = point.torch_dtype
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    n, v, h = point.N, point.V, point.H
    t = point.seq_len
    b = n // t

    def randn(*shape, scale=1.0):
        x = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
        return (x.mul_(scale) if scale != 1.0 else x).to(dt)

    weight = randn(v, h, scale=2.0 / math.sqrt(h))
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    seq_adv = torch.randn(b, generator=g, device=device)
    inp = SimpleNamespace(point=point, device=device, weight=weight, targets=targets, B=b, T=t,
                          seq_advantages=seq_adv, advantages=seq_adv.repeat_interleave(t))
    if point.op == "logprobs":
        inp.hidden = randn(n, h)
    elif point.op == "logprobs_grad":
        inp.hidden = randn(n, h).requires_grad_(True)
        inp.weight = weight.requires_grad_(True)
    elif point.op == "evidence":
        base = torch.randn(n, h, generator=g, device=device)
        inp.h_policy = base.to(dt)
        inp.h_pos = (base + 0.3 * torch.randn(n, h, generator=g, device=device)).to(dt)
        inp.h_neg = base.add_(0.3 * torch.randn(n, h, generator=g, device=device)).to(dt)
        del base
        has_neg = torch.rand(b, generator=g, device=device) < 0.8
        inp.has_negative = has_neg.repeat_interleave(t)
        inp.valid = torch.ones(n, dtype=torch.bool, device=device)
    elif point.op in ("ppo_loss", "ppo_loss_fwd"):
        inp.hidden = randn(n, h).requires_grad_(True)
        inp.weight = weight.requires_grad_(True)
        lengths = torch.randint(t // 2, t + 1, (b,), generator=g, device=device)
        inp.mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).reshape(-1)
        with torch.no_grad():  # current log-probs, row chunk by row chunk (cheaper than ours on CPU)
            rows = chunk_rows(n, v, device)
            lp = torch.cat([_chunk_logprobs(inp.hidden[r0:r0 + rows].detach(), weight.detach(),
                                            targets[r0:r0 + rows]) for r0 in range(0, n, rows)])
        inp.old_logprobs = lp + 0.1 * torch.randn(n, generator=g, device=device)
        del lp
    elif point.op == "self_distill":
        base = torch.randn(n, h, generator=g, device=device)
        inp.hidden = base.to(dt, copy=True).requires_grad_(True)  # the student
        inp.h_teacher = base.add_(0.3 * torch.randn(n, h, generator=g, device=device)).to(dt)
        del base
        inp.weight = weight.requires_grad_(True)
        lengths = torch.randint(t // 2, t + 1, (b,), generator=g, device=device)
        inp.mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).reshape(-1)
        # peers drop rows by label: -100 where the mask is off
        inp.labels = torch.where(inp.mask, targets, torch.full_like(targets, -100))
    else:
        raise ValueError(point.op)
    return inp


@dataclass
class NA:
    """A contender that cannot run here, and why (status 'n/a' or 'skipped')."""
    reason: str
    status: str = "n/a"


def _is_cuda(inp) -> bool:
    return inp.device.type == "cuda"


def ppo_surrogate(lp, old, adv, mask):
    """Token-mean PPO clipped surrogate in PyTorch (for peers without a fused PPO loss)."""
    ratio = torch.exp(lp - old)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1.0 - CLIP_LOW, 1.0 + CLIP_HIGH) * adv)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def _grads(loss, inp):
    dh, dw = torch.autograd.grad(loss, [inp.hidden, inp.weight])
    return loss.detach(), dh, dw


def _lp_grads(lp, inp):
    """(lp, d sum(lp) / d hidden, d sum(lp) / d weight) for the logprobs_grad op."""
    dh, dw = torch.autograd.grad(lp.sum(), [inp.hidden, inp.weight])
    return lp.detach().float(), dh, dw


def _three(lp_fn, inp):
    """Evidence from a single-context log-prob function: three calls plus the epilogue."""
    def run():
        with torch.no_grad():
            lps = [lp_fn(x) for x in (inp.h_policy, inp.h_pos, inp.h_neg)]
            _, token_adv, _ = _math.evidence_epilogue(
                lps[0], lps[1], lps[2], inp.advantages, inp.has_negative, inp.valid,
                lam=LAM, eps_w=EPS_W)
        return lps[0], lps[1], lps[2], token_adv
    return run


# --------------------------------------------------------------------------- ours

def ours_logprobs(inp):
    """cepo_kernels.fused_logprobs (backend auto), forward only."""
    def run():
        with torch.no_grad():
            return cepo_kernels.fused_logprobs(inp.hidden, inp.weight, inp.targets, backend="auto").logprobs
    return run


def ours_evidence(inp):
    """cepo_kernels.contrastive_evidence (backend auto): three contexts and the epilogue."""
    def run():
        out = cepo_kernels.contrastive_evidence(
            inp.h_policy, inp.h_pos, inp.h_neg, inp.weight, inp.targets, inp.advantages,
            inp.has_negative, lam=LAM, eps_w=EPS_W, backend="auto")
        return out.lp_policy, out.lp_pos, out.lp_neg, out.token_advantages
    return run


def ours_ppo_loss(inp):
    """cepo_kernels.fused_linear_ppo_loss (backend auto), then the gradients of the loss."""
    def run():
        loss, _ = cepo_kernels.fused_linear_ppo_loss(
            inp.hidden, inp.weight, inp.targets, inp.old_logprobs, inp.advantages, inp.mask,
            clip_low=CLIP_LOW, clip_high=CLIP_HIGH, backend="auto")
        return _grads(loss, inp)
    return run


def ours_logprobs_grad(inp):
    """cepo_kernels.fused_logprobs (backend auto), forward and backward of sum(lp)."""
    def run():
        lp = cepo_kernels.fused_logprobs(inp.hidden, inp.weight, inp.targets, backend="auto").logprobs
        return _lp_grads(lp, inp)
    return run


def ours_ppo_loss_fwd(inp):
    """cepo_kernels.fused_linear_ppo_loss (backend auto), forward only."""
    def run():
        with torch.no_grad():
            loss, _ = cepo_kernels.fused_linear_ppo_loss(
                inp.hidden, inp.weight, inp.targets, inp.old_logprobs, inp.advantages, inp.mask,
                clip_low=CLIP_LOW, clip_high=CLIP_HIGH, backend="auto")
        return (loss,)
    return run


def ours_self_distill(inp):
    """cepo_kernels.fused_linear_self_distill_loss (backend auto, JSD beta 0.5), then the
    gradients of the loss."""
    def run():
        loss, _ = cepo_kernels.fused_linear_self_distill_loss(
            inp.hidden, inp.h_teacher, inp.weight, inp.targets, inp.mask, divergence="jsd",
            beta=DISTILL_BETA, backend="auto")
        return _grads(loss, inp)
    return run


# --------------------------------------------------------------------------- naive PyTorch

def _naive_lp(hidden, weight, targets):
    """Materialised [N, V] logits, log_softmax, gather: the way it is usually written."""
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def naive_logprobs(inp):
    """Materialised logits, log_softmax, gather."""
    def run():
        with torch.no_grad():
            return _naive_lp(inp.hidden, inp.weight, inp.targets)
    return run


def naive_evidence(inp):
    """Three naive log-prob calls plus the epilogue."""
    return _three(lambda h: _naive_lp(h, inp.weight, inp.targets), inp)


def naive_ppo_loss(inp):
    """Naive log-probs, the PPO surrogate in torch, autograd backward."""
    def run():
        lp = _naive_lp(inp.hidden, inp.weight, inp.targets)
        return _grads(ppo_surrogate(lp, inp.old_logprobs, inp.advantages, inp.mask), inp)
    return run


def naive_logprobs_grad(inp):
    """Naive log-probs, autograd backward of their sum."""
    def run():
        return _lp_grads(_naive_lp(inp.hidden, inp.weight, inp.targets), inp)
    return run


def naive_ppo_loss_fwd(inp):
    """Naive log-probs and the PPO surrogate, forward only."""
    def run():
        with torch.no_grad():
            lp = _naive_lp(inp.hidden, inp.weight, inp.targets)
            return (ppo_surrogate(lp, inp.old_logprobs, inp.advantages, inp.mask),)
    return run


def naive_self_distill(inp):
    """Materialised [N, V] student and teacher logits (float), log_softmax, the generalised
    JSD written out (mixture by logsumexp), token mean over the mask, autograd."""
    def run():
        log_q = torch.log_softmax((inp.hidden @ inp.weight.T).float(), dim=-1)
        with torch.no_grad():
            log_p = torch.log_softmax((inp.h_teacher @ inp.weight.T).float(), dim=-1)
        beta = DISTILL_BETA
        log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
        per_token = (beta * (log_p.exp() * (log_p - log_m)).sum(-1)
                     + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1))
        m = inp.mask.float()
        return _grads((per_token * m).sum() / m.sum().clamp(min=1.0), inp)
    return run


# --------------------------------------------------------------------------- torch.compile of a chunked version

def _chunk_logprobs(hidden, weight, targets):
    """log p(targets) for one row chunk: [rows, V] logits at most."""
    z = (hidden @ weight.T).float()
    lse = torch.logsumexp(z, dim=-1)
    return z.gather(1, targets[:, None]).squeeze(1) - lse


def _chunk_ppo(hidden, weight, targets, old, adv, m, inv_denom):
    """PPO surrogate of one row chunk and its gradients, written out (no autograd):
    d lp / d z = onehot - p, so dz = dlp (onehot - p); dh = dz W, dW = dz^T h."""
    z = (hidden @ weight.T).float()
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(1, targets[:, None]).squeeze(1) - lse
    ratio = torch.exp(lp - old)
    s1 = ratio * adv
    s2 = ratio.clamp(1.0 - CLIP_LOW, 1.0 + CLIP_HIGH) * adv
    loss = (-torch.minimum(s1, s2) * m).sum() * inv_denom
    active = torch.where(adv >= 0, ratio <= 1.0 + CLIP_HIGH, ratio >= 1.0 - CLIP_LOW)
    dlp = torch.where(active, -s1, torch.zeros_like(s1)) * m * inv_denom
    dz = (-dlp[:, None]) * torch.exp(z - lse[:, None])
    dz = dz.scatter_add(1, targets[:, None], dlp[:, None]).to(hidden.dtype)
    return loss, dz @ weight, dz.T @ hidden


_compiled: dict = {}


def _compiled_fn(fn):
    if fn not in _compiled:
        import torch._dynamo
        for name in ("cache_size_limit", "recompile_limit"):  # one graph per (rows, V, H, dtype)
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def chunk_rows(n: int, v: int, device) -> int:
    """Rows per chunk: the largest power of two whose fp32 [rows, V] logits fit in
    32 MiB on CPU (like our chunked engine's 16 MiB tiles) or 1 GiB on CUDA."""
    budget = (1 << 30) if torch.device(device).type == "cuda" else (1 << 25)
    rows = 1 << max(0, int(math.floor(math.log2(max(1, budget // (4 * v))))))
    return max(1, min(n, rows))


def _compile_unavailable(inp):
    if _is_cuda(inp):
        return None
    if compile_spent_s > COMPILE_BUDGET_S:
        return NA(f"skipped on CPU: torch.compile already spent {compile_spent_s:.0f} s compiling "
                  f"in this session (> {COMPILE_BUDGET_S:.0f} s budget)", status="skipped")
    return None


def add_compile_time(seconds: float) -> None:
    """Count seconds of torch.compile compilation against the CPU session budget."""
    global compile_spent_s
    compile_spent_s += max(0.0, seconds)


def _compiled_lp(inp, hidden):
    f = _compiled_fn(_chunk_logprobs)
    n = hidden.shape[0]
    rows = chunk_rows(n, inp.point.V, inp.device)
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, n, rows):
        out[r0:r0 + rows] = f(hidden[r0:r0 + rows], inp.weight, inp.targets[r0:r0 + rows])
    return out


def compile_logprobs(inp):
    """torch.compile of the row-chunked log-prob function, forward only."""
    na = _compile_unavailable(inp)
    if na:
        return na

    def run():
        with torch.no_grad():
            return _compiled_lp(inp, inp.hidden)
    return run


def compile_evidence(inp):
    """Three compiled chunked log-prob calls plus the epilogue."""
    na = _compile_unavailable(inp)
    if na:
        return na
    return _three(lambda h: _compiled_lp(inp, h), inp)


def compile_ppo_loss(inp):
    """torch.compile of the row-chunked PPO loss with its gradients written out."""
    na = _compile_unavailable(inp)
    if na:
        return na
    f = _compiled_fn(_chunk_ppo)
    hidden, weight = inp.hidden.detach(), inp.weight.detach()  # gradients are written out: no autograd graph
    n, v, h = hidden.shape[0], weight.shape[0], weight.shape[1]
    rows = chunk_rows(n, v, inp.device)

    def run():
        with torch.no_grad():
            m = inp.mask.float()
            inv_denom = 1.0 / m.sum().clamp(min=1.0)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            dh = torch.empty_like(hidden)
            dw = torch.zeros(v, h, dtype=torch.float32, device=weight.device)
            for r0 in range(0, n, rows):
                r1 = min(r0 + rows, n)
                l_c, dh_c, dw_c = f(hidden[r0:r1], weight, inp.targets[r0:r1], inp.old_logprobs[r0:r1],
                                    inp.advantages[r0:r1], m[r0:r1], inv_denom)
                loss += l_c
                dh[r0:r1] = dh_c
                dw += dw_c
            return loss, dh, dw.to(weight.dtype)
    return run


def _chunk_lp_grad(hidden, weight, targets):
    """log p of one row chunk and the gradient of their sum, written out:
    dz = onehot - p, dh = dz W, dW = dz^T h."""
    z = (hidden @ weight.T).float()
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(1, targets[:, None]).squeeze(1) - lse
    dz = -torch.exp(z - lse[:, None])
    dz = dz.scatter_add(1, targets[:, None], torch.ones_like(lp)[:, None]).to(hidden.dtype)
    return lp, dz @ weight, dz.T @ hidden


def compile_logprobs_grad(inp):
    """torch.compile of the row-chunked log-probs with the gradient of their sum written
    out per chunk (the upstream gradient is known here: three products, no recompute)."""
    na = _compile_unavailable(inp)
    if na:
        return na
    f = _compiled_fn(_chunk_lp_grad)
    hidden, weight = inp.hidden.detach(), inp.weight.detach()
    n, v, h = hidden.shape[0], weight.shape[0], weight.shape[1]
    rows = chunk_rows(n, v, inp.device)

    def run():
        with torch.no_grad():
            lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
            dh = torch.empty_like(hidden)
            dw = torch.zeros(v, h, dtype=torch.float32, device=weight.device)
            for r0 in range(0, n, rows):
                r1 = min(r0 + rows, n)
                lp[r0:r1], dh[r0:r1], dw_c = f(hidden[r0:r1], weight, inp.targets[r0:r1])
                dw += dw_c
            return lp, dh, dw.to(weight.dtype)
    return run


def compile_ppo_loss_fwd(inp):
    """Compiled chunked log-probs and the PPO surrogate, forward only."""
    na = _compile_unavailable(inp)
    if na:
        return na

    def run():
        with torch.no_grad():
            lp = _compiled_lp(inp, inp.hidden.detach())
            return (ppo_surrogate(lp, inp.old_logprobs, inp.advantages, inp.mask),)
    return run


# --------------------------------------------------------------------------- Liger-Kernel

def _liger_flce(inp):
    """LigerFusedLinearCrossEntropyLoss(reduction='none'): Triton, so CUDA only."""
    if not _is_cuda(inp):
        return NA("n/a (Triton, CUDA only)")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # pragma: no cover - depends on the install
        return NA(f"n/a: liger-kernel not importable ({type(e).__name__}: {e})")
    return LigerFusedLinearCrossEntropyLoss(reduction="none")


def liger_logprobs(inp):
    """Liger fused linear cross entropy (reduction='none'): log-probs = -loss."""
    flce = _liger_flce(inp)
    if isinstance(flce, NA):
        return flce

    def run():
        with torch.no_grad():
            return -flce(inp.weight, inp.hidden, inp.targets)
    return run


def liger_evidence(inp):
    """Three Liger FLCE calls plus the epilogue."""
    flce = _liger_flce(inp)
    if isinstance(flce, NA):
        return flce
    return _three(lambda h: -flce(inp.weight, h, inp.targets), inp)


def liger_flce_ppo_loss(inp):
    """Liger's fused linear cross entropy for the log-probs, the PPO surrogate in torch."""
    flce = _liger_flce(inp)
    if isinstance(flce, NA):
        return flce

    def run():
        lp = -flce(inp.weight, inp.hidden, inp.targets)
        return _grads(ppo_surrogate(lp.float(), inp.old_logprobs, inp.advantages, inp.mask), inp)
    return run


def liger_logprobs_grad(inp):
    """Liger FLCE (reduction='none'), log-probs = -loss, autograd backward of their sum."""
    flce = _liger_flce(inp)
    if isinstance(flce, NA):
        return flce

    def run():
        return _lp_grads(-flce(inp.weight, inp.hidden, inp.targets), inp)
    return run


def liger_flce_ppo_loss_fwd(inp):
    """Liger FLCE log-probs and the PPO surrogate, forward only."""
    flce = _liger_flce(inp)
    if isinstance(flce, NA):
        return flce

    def run():
        with torch.no_grad():
            lp = -flce(inp.weight, inp.hidden, inp.targets)
            return (ppo_surrogate(lp.float(), inp.old_logprobs, inp.advantages, inp.mask),)
    return run


def liger_grpo_ppo_loss_fwd(inp):
    """LigerFusedLinearGRPOLoss under no_grad (its chunked loss still forms gradients in
    its forward: that is how it is built)."""
    run_fb = liger_grpo_ppo_loss(inp)
    if isinstance(run_fb, NA):
        return run_fb
    loss_fn, args = run_fb.loss_fn, run_fb.args

    def run():
        with torch.no_grad():
            return (loss_fn(*args[0], **args[1])[0].detach(),)
    return run


def liger_grpo_ppo_loss(inp):
    """LigerFusedLinearGRPOLoss: chunked PyTorch (per sequence), runs natively on CPU.

    Same semantics as ours here: DAPO token-mean loss, no KL, clip [0.8, 1.28], one
    advantage per sequence. Inputs are reshaped to [B, T, H]; the loss math is
    torch.compile'd on CUDA (``compiled=True``) and eager on CPU (``compiled=False``: it is
    O(N) work next to the head products, and compiling it would eat the CPU run's time budget).
    """
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as e:  # pragma: no cover - depends on the install
        return NA(f"n/a: liger-kernel not importable ({type(e).__name__}: {e})")
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                       epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH,
                                       compiled=_is_cuda(inp))
    b, t, h = inp.B, inp.T, inp.point.H
    targets = inp.targets.view(b, t)
    mask = inp.mask.view(b, t).long()
    old = inp.old_logprobs.view(b, t)

    args = ((inp.hidden.view(b, t, h), inp.weight, targets, mask, inp.seq_advantages),
            dict(old_per_token_logps=old))

    def run():
        loss, _ = loss_fn(*args[0], **args[1])
        return _grads(loss, inp)
    run.loss_fn, run.args = loss_fn, args
    return run


def liger_jsd_self_distill(inp):
    """LigerFusedLinearJSDLoss (chunked PyTorch, runs on CPU): weight_hard_loss=0,
    weight_soft_loss=1, beta 0.5, the student's head also as the teacher's (detached);
    rows dropped by label -100; the same loss as ours (sum over kept tokens / their count)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as e:  # pragma: no cover - depends on the install
        return NA(f"n/a: liger-kernel not importable ({type(e).__name__}: {e})")
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=DISTILL_BETA,
                                      compiled=_is_cuda(inp))
    w_teacher = inp.weight.detach()

    def run():
        loss = loss_fn(inp.hidden, inp.weight, inp.h_teacher, w_teacher, inp.labels)
        return _grads(loss, inp)
    return run


def liger_fljsd_self_distill(inp):
    """LigerFusedLinearJSD (Triton, CUDA only): jsd_beta 0.5, labels -100 where masked;
    normalised by the count of labels that are not -100, as ours."""
    if not _is_cuda(inp):
        return NA("n/a (Triton, CUDA only)")
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as e:  # pragma: no cover - depends on the install
        return NA(f"n/a: liger-kernel not importable ({type(e).__name__}: {e})")
    loss_fn = LigerFusedLinearJSD(jsd_beta=DISTILL_BETA)
    w_teacher = inp.weight.detach()

    def run():
        loss = loss_fn(inp.hidden, inp.weight, inp.h_teacher, w_teacher, inp.labels)
        return _grads(loss, inp)
    return run


# --------------------------------------------------------------------------- Apple Cut Cross-Entropy

def _cce(inp):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:
        return NA(f"n/a: cut-cross-entropy not importable ({type(e).__name__}: {e})")
    impl = "cce" if _is_cuda(inp) else "torch_compile"
    if _is_cuda(inp):
        def lp(hidden):
            return -linear_cross_entropy(hidden, inp.weight, inp.targets, reduction="none", impl=impl)
        return lp
    import torch._dynamo

    def lp(hidden):
        # CPU: CCE's torch_compile implementation would compile one graph per N (minutes
        # of cold C++ compiles per run); dynamic shapes from the first call make it one
        # graph per dtype and direction for every N
        with torch._dynamo.config.patch(assume_static_by_default=False):
            return -linear_cross_entropy(hidden, inp.weight, inp.targets, reduction="none", impl=impl)
    return lp


def cce_logprobs(inp):
    """Cut Cross-Entropy (reduction='none'): log-probs = -loss."""
    lp = _cce(inp)
    if isinstance(lp, NA):
        return lp

    def run():
        with torch.no_grad():
            return lp(inp.hidden)
    return run


def cce_evidence(inp):
    """Three Cut Cross-Entropy calls plus the epilogue."""
    lp = _cce(inp)
    if isinstance(lp, NA):
        return lp
    return _three(lp, inp)


def cce_ppo_loss(inp):
    """Cut Cross-Entropy log-probs, the PPO surrogate in torch, autograd through it."""
    lp = _cce(inp)
    if isinstance(lp, NA):
        return lp

    def run():
        return _grads(ppo_surrogate(lp(inp.hidden).float(), inp.old_logprobs, inp.advantages,
                                    inp.mask), inp)
    return run


def cce_logprobs_grad(inp):
    """Cut Cross-Entropy log-probs, autograd backward of their sum."""
    lp = _cce(inp)
    if isinstance(lp, NA):
        return lp

    def run():
        return _lp_grads(lp(inp.hidden), inp)
    return run


def cce_ppo_loss_fwd(inp):
    """Cut Cross-Entropy log-probs and the PPO surrogate, forward only."""
    lp = _cce(inp)
    if isinstance(lp, NA):
        return lp

    def run():
        with torch.no_grad():
            return (ppo_surrogate(lp(inp.hidden).float(), inp.old_logprobs, inp.advantages,
                                  inp.mask),)
    return run


# --------------------------------------------------------------------------- the floor

def floor_logprobs(inp):
    """The floor of logprobs: one bare LM-head product."""
    def run():
        with torch.no_grad():
            return torch.matmul(inp.hidden, inp.weight.T)
    return run


def floor_evidence(inp):
    """The floor of evidence: three bare LM-head products."""
    def run():
        with torch.no_grad():
            for x in (inp.h_policy, inp.h_pos, inp.h_neg):
                z = torch.matmul(x, inp.weight.T)
                del z
    return run


def floor_ppo_loss(inp):
    """The floor of the loss: the forward product and the two backward products."""
    hidden, weight = inp.hidden.detach(), inp.weight.detach()

    def run():
        with torch.no_grad():
            z = torch.matmul(hidden, weight.T)      # forward logits
            dh = torch.matmul(z, weight)            # dh = dz W   (z stands in for dz)
            dw = torch.matmul(z.T, hidden)          # dW = dz^T h
            return dh, dw
    return run


def floor_logprobs_grad(inp):
    """The floor of the log-prob forward + backward: the forward product, the recompute in
    the backward (its upstream gradient arrives later), and the two gradient products."""
    hidden, weight = inp.hidden.detach(), inp.weight.detach()

    def run():
        with torch.no_grad():
            z = torch.matmul(hidden, weight.T)      # forward
            del z
            z = torch.matmul(hidden, weight.T)      # backward: recompute
            return torch.matmul(z, weight), torch.matmul(z.T, hidden)
    return run


def floor_ppo_loss_fwd(inp):
    """The floor of the loss forward: one bare LM-head product."""
    hidden, weight = inp.hidden.detach(), inp.weight.detach()

    def run():
        with torch.no_grad():
            return torch.matmul(hidden, weight.T)
    return run


def floor_self_distill(inp):
    """The floor of the self-distillation loss: the student's and the teacher's logits and
    the two backward products."""
    hidden, weight, h_teacher = inp.hidden.detach(), inp.weight.detach(), inp.h_teacher

    def run():
        with torch.no_grad():
            z = torch.matmul(hidden, weight.T)      # student logits
            zt = torch.matmul(h_teacher, weight.T)  # teacher logits
            del zt
            return torch.matmul(z, weight), torch.matmul(z.T, hidden)  # dh, dW (z for dz)
    return run


# --------------------------------------------------------------------------- registry

OURS, FLOOR = "ours", "floor"

COMPILES_ON_FIRST_CALL = ("torch.compile", "cce")
"""On CPU these compile on their first call at a shape (CCE's CPU implementation is
torch_compile): their memory is measured on a later call, not during the check."""

CONTENDERS = {
    "logprobs": [(OURS, ours_logprobs), ("naive", naive_logprobs), ("torch.compile", compile_logprobs),
                 ("liger-flce", liger_logprobs), ("cce", cce_logprobs), (FLOOR, floor_logprobs)],
    "logprobs_grad": [(OURS, ours_logprobs_grad), ("naive", naive_logprobs_grad),
                      ("torch.compile", compile_logprobs_grad), ("liger-flce", liger_logprobs_grad),
                      ("cce", cce_logprobs_grad), (FLOOR, floor_logprobs_grad)],
    "ppo_loss_fwd": [(OURS, ours_ppo_loss_fwd), ("naive", naive_ppo_loss_fwd),
                     ("torch.compile", compile_ppo_loss_fwd), ("liger-grpo", liger_grpo_ppo_loss_fwd),
                     ("liger-flce", liger_flce_ppo_loss_fwd), ("cce", cce_ppo_loss_fwd),
                     (FLOOR, floor_ppo_loss_fwd)],
    "evidence": [(OURS, ours_evidence), ("naive", naive_evidence), ("torch.compile", compile_evidence),
                 ("liger-flce", liger_evidence), ("cce", cce_evidence), (FLOOR, floor_evidence)],
    "ppo_loss": [(OURS, ours_ppo_loss), ("naive", naive_ppo_loss), ("torch.compile", compile_ppo_loss),
                 ("liger-grpo", liger_grpo_ppo_loss), ("liger-flce", liger_flce_ppo_loss),
                 ("cce", cce_ppo_loss), (FLOOR, floor_ppo_loss)],
    "self_distill": [(OURS, ours_self_distill), ("naive", naive_self_distill),
                     ("liger-jsd", liger_jsd_self_distill), ("liger-fljsd", liger_fljsd_self_distill),
                     (FLOOR, floor_self_distill)],
}

DESCRIPTIONS = {
    OURS: "cepo_kernels, backend='auto' (Triton on CUDA, chunked PyTorch on CPU)",
    "naive": "PyTorch: materialised [N, V] logits, float, log_softmax, gather (autograd for the loss)",
    "torch.compile": "torch.compile(dynamic=False) of a simple row-chunked PyTorch function "
                     "(loss: gradient written out per chunk)",
    "liger-flce": "Liger-Kernel LigerFusedLinearCrossEntropyLoss(reduction='none'), log-probs = -loss "
                  "(loss: PPO surrogate in torch, autograd through it)",
    "liger-grpo": "Liger-Kernel LigerFusedLinearGRPOLoss(beta=0, use_ref_model=False, loss_type='dapo', "
                  "epsilon 0.2/0.28, compiled=True on CUDA, False on CPU), inputs as [B, T, H]",
    "cce": "Apple Cut Cross-Entropy linear_cross_entropy(reduction='none'), impl 'cce' on CUDA, "
           "'torch_compile' on CPU (loss: PPO surrogate in torch, autograd through it)",
    "liger-jsd": "Liger-Kernel LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1, "
                 "beta=0.5; chunked PyTorch, compiled=True on CUDA, False on CPU), the student's head "
                 "as the teacher's (self_distill)",
    "liger-fljsd": "Liger-Kernel LigerFusedLinearJSD(jsd_beta=0.5) (Triton, CUDA only), the student's "
                   "head as the teacher's (self_distill)",
    FLOOR: "bare LM-head torch.matmul products: x1 (logprobs, ppo_loss_fwd), x3 (evidence), "
           "fwd + 2 bwd (ppo_loss), fwd + recompute + 2 bwd (logprobs_grad), "
           "student and teacher fwd + 2 bwd (self_distill)",
}


def estimated_cpu_bytes(name: str, point: Point) -> int:
    """Rough CPU peak of the contenders that hold [N, V] tensors (0 for the others): on
    CPU a predicted OOM is recorded instead of waking the kernel's OOM killer. On CPU,
    CCE's torch_compile implementation materialises the logits as well."""
    n, v = point.N, point.V
    elt = torch.finfo(point.torch_dtype).bits // 8
    if name == "naive" and point.op == "self_distill":
        return n * v * (2 * elt + 6 * 4)  # both logits, their log_softmax, mixture, products, grads
    if name in ("naive", "cce"):
        per = n * v * (elt + 8)  # logits in the input dtype, float copy, log_softmax
        return per * (2 if point.op in GRAD_OPS else 1)
    if name == FLOOR:
        return n * v * elt
    return 0
