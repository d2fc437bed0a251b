"""Trainer benchmarks: the step-time split of GRPO / RLSD / CEPO, and how many tokens an
update micro-batch can hold with the fused head versus a naive-logits head.

Shapes: on CUDA a randomly initialised Qwen3-0.6B-shaped model (bf16; the tiny char
tokenizer, whose decoder skips ids it does not know, and a hashed reward so that groups
have non-zero advantages); on CPU the embedded default itself for the step split (the
README's command with --algo, no evaluation), and a small random Qwen3 (H 256, 4 layers,
V 32,000, fp32) for memory.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import timing
from cepo.policy import FusedHeadPolicy  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parent.parent
TINY_ASSET = REPO / "cepo" / "assets" / "tiny-arith"
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  vocab_size=151_936, tie_word_embeddings=True)
CPU_MEMORY_MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        vocab_size=32_000, tie_word_embeddings=True)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    vocab_size=49_152, tie_word_embeddings=True)
PHASES = ("generate", "score", "teacher", "update", "sync")


def random_model(shape: dict, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised Qwen3ForCausalLM of the given shape (sdpa attention)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(max_position_embeddings=1 << 17, **shape)
    config._attn_implementation = "sdpa"
    return transformers.Qwen3ForCausalLM(config).to(dtype)


def random_model_dir(path: Path, shape: dict, dtype: torch.dtype) -> Path:
    """Save ``random_model(shape)`` with the tiny model's tokenizer (safetensors)."""
    import shutil

    path.mkdir(parents=True, exist_ok=True)
    model = random_model(shape, dtype)
    model.generation_config.eos_token_id = model.config.eos_token_id = 1
    model.save_pretrained(path, safe_serialization=True)
    for f in TINY_ASSET.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, path / f.name)
    return path


def step_time_split(algo: str, model: Path | None, out: Path, *, device: str,
                    steps: int | None, warmup: int, extra: list[str]) -> dict:
    """Run ``torchrun --nproc_per_node 1 -m cepo.train --algo ALGO`` for ``steps`` steps
    with no held-out evaluation (timed apart from steps, if at all) and otherwise as the
    real command runs (its checkpoints every 10 steps, its sample dumps); mean and median
    seconds per phase over the steps after the first ``warmup`` ones, plus tokens/s and
    peak memory; also each phase's total over the timed steps (``total_<phase>_s``,
    ``total_step_s``), which over a whole run is what the run pays. ``model`` None runs
    the embedded default (the shipped tiny model with its own settings, exactly what the
    README's command runs); ``steps`` None keeps the run's own step count."""
    from cepo.distributed import free_port

    env = dict(os.environ, PYTHONPATH=str(REPO / "bench") + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--master_port", str(free_port()), "-m", "cepo.train", "--algo", algo,
           "--output_dir", str(out), *([] if steps is None else ["--steps", str(steps)]),
           "--device", device,
           "--eval_every", "0", "--num_eval", "0", "--export", "false", "--progress", "false",
           *extra]  # checkpoints and sample dumps as the real command writes them
    if model is not None:
        cmd[cmd.index("--algo"):cmd.index("--algo")] = ["--model", str(model)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{algo}: training failed\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    rows = [r for r in rows if "step_seconds" in r][warmup:]
    mean = lambda key: statistics.fmean(r.get(key) or 0.0 for r in rows)  # noqa: E731
    return {"algo": algo, "steps_timed": len(rows), "first_step_timed": warmup + 1,
            **{f"{p}_s": mean(f"time_{p}") for p in PHASES},
            "step_s": mean("step_seconds"),
            **{f"total_{p}_s": sum(r.get(f"time_{p}") or 0.0 for r in rows) for p in PHASES},
            "total_step_s": sum(r["step_seconds"] for r in rows),
            "teacher_steps": sum((r.get("lambda") or 0.0) > 0 for r in rows),  # lambda > 0: teacher ran
            "step_median_s": statistics.median(r["step_seconds"] for r in rows),
            "lambda_first": rows[0]["lambda"], "lambda_last": rows[-1]["lambda"],
            "generate_share": mean("time_generate") / max(mean("step_seconds"), 1e-9),
            "tokens_per_s": mean("tokens_per_second"),
            "skipped_rollouts": mean("skipped_rollouts"),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in rows)}


def mean_of_runs(runs: list[dict]) -> dict:
    """``step_time_split`` results of repeated runs of one algorithm, averaged field by
    field (numbers), with ``run_totals_s`` the steps-total of each run (the spread)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.fmean(r[key] for r in runs)
    out["steps_timed"] = runs[0]["steps_timed"]
    out["teacher_steps"] = runs[0]["teacher_steps"]
    out["run_totals_s"] = [r["total_step_s"] for r in runs]
    return out


def sampler_decode(model: Path, *, device: str, dtype: torch.dtype, prompts: int, n: int,
                   max_new_tokens: int, rounds: int) -> dict:
    """One ``HFEngine.generate`` call of ``prompts`` built-in arithmetic prompts x ``n``
    samples at T = 1 (fixed seeds, one batch), timed with the lean decoder and with the
    model's own forward at every step (two engines, calls alternated, one warm-up call
    each); median and min seconds per call, generated tokens and whether both gave the
    same tokens."""
    from transformers import AutoTokenizer

    from cepo.arithmetic import make_split
    from cepo.contexts import render_prompt
    from cepo.sampler import HFEngine, SamplingParams

    tok = AutoTokenizer.from_pretrained(model)
    ids = [render_prompt(tok, r["prompt"]) for r in make_split("train", prompts, 0)]
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, return_logprobs=True)
    engines = {name: HFEngine(str(model), tokenizer=tok, device=device, dtype=dtype,
                              max_batch_size=prompts * n, lean=name == "lean")
               for name in ("lean", "model forward")}
    times: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list] = {}
    for k in range(rounds + 1):  # call 0 of each engine is a warm-up
        for name in (list(engines) if k % 2 else list(engines)[::-1]):
            timing.synchronize(device)
            start = time.perf_counter()
            out = engines[name].generate(ids, n, params, seeds=list(range(prompts)))
            timing.synchronize(device)
            if k:
                times[name].append(time.perf_counter() - start)
            tokens[name] = [[c.token_ids for c in group] for group in out]
    generated = sum(len(t) for group in tokens["lean"] for t in group)
    rows = [{"decoder": name, "median_s": statistics.median(times[name]),
             "min_s": min(times[name]), "tokens": generated,
             "tokens_per_s": generated / statistics.median(times[name])} for name in engines]
    return {"rows": rows, "same_tokens": tokens["lean"] == tokens["model forward"],
            "speedup": rows[1]["median_s"] / rows[0]["median_s"], "prompts": prompts, "n": n,
            "max_new_tokens": max_new_tokens, "calls": rounds}


def left_padded_prompts(batch: int, width: int, vocab: int, seed: int):
    """Random left-padded prompts (each row keeps at least one token): ids [B, W], attention
    mask [B, W] and positions [B, W] (the mask's cumulative sum - 1, 0 on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, width), generator=g)
    mask = torch.ones(batch, width, dtype=torch.long)
    for b in range(batch):
        pad = int(torch.randint(0, width - 1, (1,), generator=g))
        mask[b, :pad] = 0
        ids[b, :pad] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def lean_and_model_logits(model, *, batch: int = 5, width: int = 7, steps: int = 6,
                          drop_at: dict[int, list[int]] | None = None, seed: int = 0):
    """Decode ``steps`` random tokens after one prompt forward, once with the model's own
    forward at every step and once with ``cepo.sampler.lean_decoder``; ``drop_at`` {step:
    rows kept} drops rows before that step (as the engine does when rows stop). Returns
    (model logits, lean logits): two lists of [B_step, V] tensors, on the model's device."""
    from transformers import DynamicCache

    from cepo.sampler.lean_decoder import LeanDecoder, LeanWeights

    device = next(model.parameters()).device
    ids, mask, positions = (t.to(device) for t in left_padded_prompts(
        batch, width, model.config.vocab_size, seed))
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(2, model.config.vocab_size, (steps, batch), generator=g).to(device)
    weights = LeanWeights(model)
    results = []
    for lean in (False, True):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
              use_cache=True)
        decoder = LeanDecoder(weights, cache, mask, steps) if lean else None
        rows, m, pos, out = torch.arange(batch, device=device), mask, positions[:, -1:], []
        for step in range(steps):
            if drop_at and step in drop_at:
                keep = torch.tensor(drop_at[step], device=device)
                rows, pos = rows[keep], pos[keep]
                if lean:
                    decoder.select(keep)
                else:
                    cache.batch_select_indices(keep)
                    m = m[keep]
            pos = pos + 1
            if lean:
                out.append(decoder.forward(tokens[step, rows], pos))
            else:
                m = torch.cat([m, m.new_ones((m.shape[0], 1))], 1)
                out.append(model(input_ids=tokens[step, rows][:, None], attention_mask=m,
                                 position_ids=pos, cache=cache, use_cache=True).logits[:, -1])
        results.append(out)
    return results[0], results[1]


def _packed(budget: int, vocab: int, device, seq_len: int = 512):
    """A packed row of ``budget`` random tokens in sequences of ``seq_len`` (the second
    half of each is the response), with its gather index and targets."""
    from cepo.packing import pack_sequences, response_gather_index

    g = torch.Generator().manual_seed(budget)
    lengths = [seq_len] * (budget // seq_len) + ([budget % seq_len] if budget % seq_len else [])
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    batch = pack_sequences(seqs)
    prompt = [n - n // 2 for n in lengths]
    index, targets = response_gather_index(batch, prompt, [n // 2 for n in lengths])
    return batch.to(device), index.to(device), targets.to(device)


def update_step(policy, budget: int, head: str):
    """A function running one update micro-batch (forward + backward) of ``budget`` tokens
    through the fused PPO head or through naive logits (h W^T, log_softmax, gather)."""
    weight = policy.head_weight()
    batch, index, targets = _packed(budget, weight.shape[0], weight.device)
    adv = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1)).to(weight.device)
    mask = torch.ones_like(targets, dtype=torch.bool)

    def fused():
        loss, _ = policy(batch, index, targets, ppo=dict(
            old_logprobs=None, token_advantages=adv, mask=mask))
        loss.backward()
        policy.zero_grad(set_to_none=True)

    def naive():
        hidden = policy(batch, index)
        logits = (hidden @ weight.T).float()
        lp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
        ratio = torch.exp(lp - lp.detach())
        loss = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv).mean()
        loss.backward()
        policy.zero_grad(set_to_none=True)

    return fused if head == "fused" else naive


def peak_update_memory(policy, budget: int, head: str, device) -> dict:
    """Peak extra memory (MiB) and time (s) of one update micro-batch; OOM is a result."""
    fn = update_step(policy, budget, head)
    try:
        if timing.is_cuda(device):
            fn()  # warm-up (cuBLAS workspaces, autotuning)
            ms, peak = timing.cuda_call_with_peak(fn, device)
            seconds = ms / 1e3
        else:
            seconds, peak, _ = timing.cpu_call_with_peak(fn)
        return {"head": head, "budget": budget, "status": "ok", "peak_mib": peak,
                "seconds": seconds}
    except torch.OutOfMemoryError:
        return {"head": head, "budget": budget, "status": "OOM"}
    finally:
        del fn
        timing.release(device, collect=True)


def largest_budget(policy, head: str, device, *, start: int = 4096, cap: int = 1 << 18) -> dict:
    """CUDA: the largest micro-batch (tokens, to 1/8 of the first failing size) whose
    update runs, doubling from ``start`` to ``cap`` and then bisecting."""
    ok, bad, rows = 0, None, []
    budget = start
    while budget <= cap:
        r = peak_update_memory(policy, budget, head, device)
        rows.append(r)
        if r["status"] != "ok":
            bad = budget
            break
        ok, budget = budget, budget * 2
    if bad is not None:
        step = max(512, bad // 8)
        for budget in range(ok + step, bad, step):
            r = peak_update_memory(policy, budget, head, device)
            rows.append(r)
            if r["status"] != "ok":
                break
            ok = budget
    return {"head": head, "largest_ok": ok, "first_oom": bad, "capped": bad is None,
            "trials": rows}


def _group_rows(groups: int, group_size: int, context_len: int, response_len: int,
                vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """(contexts, responses), one per rollout: ``groups`` random contexts of
    ``context_len`` tokens, each followed by ``group_size`` responses of 1/2 to 3/2 times
    ``response_len`` tokens (a step's groups under one teacher context each)."""
    import random

    rng = random.Random(seed)
    contexts, responses = [], []
    for _ in range(groups):
        ctx = [rng.randrange(1, vocab) for _ in range(context_len)]
        for _ in range(group_size):
            n = rng.randint(max(1, response_len // 2), response_len * 3 // 2)
            contexts.append(ctx)
            responses.append([rng.randrange(1, vocab) for _ in range(n)])
    return contexts, responses


def shared_context_pass(policy, *, groups: int, group_size: int, context_len: int,
                        response_len: int, grad: bool, token_budget: int = 1 << 16) -> dict:
    """One packed pass over ``groups`` x ``group_size`` (context, response) sequences,
    each context shared by its group: the plain packing (every sequence whole) against
    shared-context packing (each context once, cepo.shared_context), as the teacher
    phase (no grad) or the update (forward + backward of the gathered hidden states)
    runs it. Median seconds of each (round-robin timing), the peak extra memory of one
    pass (MiB; activations, and gradients with ``grad``) and the tokens each feeds."""
    from cepo.step import Responses, Sequence, micro_batches

    vocab = policy.head_weight().shape[0]
    device = policy.head_weight().device
    contexts, response_ids = _group_rows(groups, group_size, context_len, response_len, vocab)
    responses = Responses.of(response_ids)
    sequences = [Sequence(c, i) for i, c in enumerate(contexts)]
    fed: dict[str, int] = {}

    def run(share: bool):
        def go():
            tokens = 0
            with torch.set_grad_enabled(grad):
                for members, batch, index in micro_batches(sequences, responses, token_budget,
                                                           device, share_contexts=share):
                    tokens += batch.num_tokens
                    h = policy(batch, index)
                    if grad:
                        h.float().square().mean().backward()
            if grad:
                policy.zero_grad(set_to_none=True)
            fed["shared" if share else "plain"] = tokens
        return go

    fns = {"plain": run(False), "shared": run(True)}
    peaks = {}
    for name, fn in fns.items():  # warm-up, and the peak extra memory of one pass
        if timing.is_cuda(device):
            _, peaks[name] = timing.cuda_call_with_peak(fn, device)
        else:
            _, peaks[name], _ = timing.cpu_call_with_peak(fn)
        timing.release(device, collect=True)
    if timing.is_cuda(device):
        seconds = {k: timing.measure_cuda(fn, device).time_ms / 1e3 for k, fn in fns.items()}
    else:
        times = timing.time_cpu_round_robin(fns, min_rounds=3, max_rounds=7, budget_s=5.0)
        seconds = {k: statistics.median(v) / 1e3 for k, v in times.items()}
    return {"groups": groups, "group_size": group_size, "context_len": context_len,
            "response_len": response_len, "grad": grad,
            "plain_s": seconds["plain"], "shared_s": seconds["shared"],
            "plain_tokens": fed["plain"], "shared_tokens": fed["shared"],
            "plain_peak_mib": peaks["plain"], "shared_peak_mib": peaks["shared"],
            "speedup": seconds["plain"] / seconds["shared"]}
