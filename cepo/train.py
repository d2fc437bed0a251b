"""``torchrun -m cepo.train``: GRPO / RLSD / CEPO training of a Hugging Face causal LM.

One step (DESIGN.md): sample G responses per prompt -> verify -> group advantages ->
drop A = 0 -> teacher contexts -> three no-grad passes + contrastive_evidence ->
PPO update(s) with the fused loss -> optimizer -> lambda schedule -> weights to the
sampler -> metrics / evaluation / checkpoint. With no arguments it trains CEPO on the
built-in arithmetic task with the tiny model shipped in cepo/assets, on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

import cepo_kernels as ck
from cepo import distributed as dist_utils
from cepo.algorithms import lambda_at
from cepo.config import BUILTIN_TASK, TrainConfig, parse_config
from cepo.contexts import render_prompt
from cepo.data import Example, load_examples
from cepo.metrics import MetricsLogger, plot_training_curves
from cepo.policy import FusedHeadPolicy, apply_lora, shard
from cepo.rollout import balance_items, sample_groups, train_items
from cepo.sampler import SamplingParams
from cepo.step import Responses, evidence, policy_logprobs, ppo_update
from cepo.weight_sync import iter_weight_buckets

log = logging.getLogger("cepo")


# ----------------------------------------------------------------------------- data

def load_datasets(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples: the built-in task's splits, or user files / datasets."""
    if cfg.train_data == BUILTIN_TASK:
        from cepo.arithmetic import make_split
        to_ex = lambda rows, split: [Example(r["prompt"], r["answer"], f"{split}[{i}]")  # noqa: E731
                                     for i, r in enumerate(rows)]
        train = to_ex(make_split("train", cfg.num_train, cfg.seed), "arithmetic-train")
        evals = to_ex(make_split("test", cfg.num_eval, cfg.eval_seed), "arithmetic-test")
        if cfg.eval_data:
            evals = _load(cfg, cfg.eval_data)[: cfg.num_eval]
        return train, evals
    train = _load(cfg, cfg.train_data)
    if cfg.eval_data == BUILTIN_TASK:  # your training data, the built-in held-out set
        from cepo.arithmetic import make_split
        evals = [Example(r["prompt"], r["answer"], f"arithmetic-test[{i}]")
                 for i, r in enumerate(make_split("test", cfg.num_eval, cfg.eval_seed))]
    else:
        evals = _load(cfg, cfg.eval_data)[: cfg.num_eval] if cfg.eval_data else []
    return train, evals


def _load(cfg: TrainConfig, path: str) -> list[Example]:
    return load_examples(path, prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
                         on_bad_row=cfg.on_bad_row)


def step_prompts(train: list[Example], step: int, cfg: TrainConfig, rank: int, world: int):
    """This rank's prompts for a step and their sampling seeds.

    The data stream is a seeded permutation per epoch; step s takes positions
    [s P, (s + 1) P), so a resumed run continues exactly. Rank r takes every world-th
    prompt; each prompt's seed depends on its global position only.
    """
    start = step * cfg.prompts_per_step
    picked, seeds = [], []
    for pos in range(start + rank, start + cfg.prompts_per_step, world):
        epoch, i = divmod(pos, len(train))
        order = list(range(len(train)))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        picked.append(train[order[i]])
        seeds.append((cfg.seed * 1_000_003 + pos) % 2**31)
    return picked, seeds


# ----------------------------------------------------------------------------- set-up

def resolve_output_dir(cfg: TrainConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def build_policy(cfg: TrainConfig, device: torch.device):
    """(policy module sharded with FSDP2, tokenizer)."""
    from transformers import AutoTokenizer

    from cepo.model import default_attn_implementation, load_causal_lm

    bf16 = device.type == "cuda" and cfg.dtype in ("auto", "bfloat16")
    attn = cfg.attn_implementation or default_attn_implementation(device)
    lm = load_causal_lm(cfg.model, dtype=torch.float32, attn_implementation=attn)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank > 0:
        lm = apply_lora(lm, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
    lm.to(device)
    policy = FusedHeadPolicy(lm)
    shard(policy, device, bf16=bf16, cpu_offload=cfg.cpu_offload)
    return policy, tokenizer


def build_reference(cfg: TrainConfig, device: torch.device):
    """A frozen copy of the initial policy for the k3 KL (only when kl_coef > 0)."""
    from cepo.model import default_attn_implementation, load_causal_lm

    attn = cfg.attn_implementation or default_attn_implementation(device)
    ref = FusedHeadPolicy(load_causal_lm(cfg.model, dtype=torch.float32, attn_implementation=attn))
    ref.requires_grad_(False)
    ref.to(device)
    shard(ref, device, bf16=device.type == "cuda" and cfg.dtype in ("auto", "bfloat16"),
          cpu_offload=cfg.cpu_offload)
    return ref


def build_sampler(cfg: TrainConfig, tokenizer, info):
    """The generation engine: vLLM when asked / available on CUDA, else Hugging Face."""
    import importlib.util

    from cepo.sampler import HFEngine
    from cepo.sampler.vllm_engine import VLLMEngine, choose_engine

    name, warning = choose_engine(cfg.engine, info.device.type,
                                  importlib.util.find_spec("vllm") is not None)
    if warning and info.is_main:
        log.warning(warning)
    if name == "vllm":
        return VLLMEngine(cfg.model, tokenizer=tokenizer, seed=cfg.seed, rank=info.rank,
                          max_model_len=None)
    return HFEngine(cfg.model, tokenizer=tokenizer, device=info.device,
                    max_batch_size=cfg.generation_batch_size)


def build_optimizer(cfg: TrainConfig, policy):
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def sync_sampler(policy, sampler) -> None:
    """Stream the current (LoRA-merged) weights into the sampler, one bucket at a time."""
    for bucket in iter_weight_buckets(policy.lm):
        sampler.update_weights(bucket)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ----------------------------------------------------------------------------- evaluation

def evaluate(cfg, examples, tokenizer, sampler, verifier, info) -> dict:
    """Held-out accuracy over all ranks (fractions in [0, 1]): ``eval_accuracy`` (greedy)
    and, when cfg.eval_samples > 0, ``eval_mean_at_k`` (mean over k samples at the
    training temperature, seeded)."""
    mine = examples[info.rank::info.world_size]
    prompt_ids = [render_prompt(tokenizer, ex.prompt) for ex in mine]
    answers = [ex.answer for ex in mine]

    def solved(n, params):
        if not mine:
            return 0.0
        outs = sampler.generate(prompt_ids, n, params)
        texts = [c.text for group in outs for c in group]
        scores = verifier.score(texts, [a for a in answers for _ in range(n)])
        return float(sum(s.correct for s in scores))

    greedy = solved(1, SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens))
    k = cfg.eval_samples
    sampled = solved(k, SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                       max_new_tokens=cfg.max_new_tokens,
                                       seed=cfg.seed + info.rank)) if k else 0.0
    greedy, sampled, total = dist_utils.all_reduce_sum([greedy, sampled, float(len(mine))],
                                                       info.device)
    result = {"eval_accuracy": greedy / max(total, 1.0)}
    if k:
        result["eval_mean_at_k"] = sampled / max(total * k, 1.0)
    return result


def dump_evidence(path: Path, step: int, items, ev, lam: float, eps_w: float, rank: int) -> None:
    """Append one JSON line per trained rollout: tokens, delta, token weight w_t, A."""
    delta = ev.delta.float().cpu()
    offset = 0
    with path.open("a") as f:
        for it in items:
            n = len(it.response_ids)
            d = delta[offset:offset + n]
            sign = 1.0 if it.advantage > 0 else -1.0
            w = torch.exp(sign * d).clamp(1 - eps_w, 1 + eps_w)
            f.write(json.dumps({"step": step, "rank": rank, "advantage": it.advantage,
                                "correct": it.correct, "has_negative": it.neg_ids is not None,
                                "lambda": lam, "tokens": it.response_ids,
                                "delta": [round(x, 5) for x in d.tolist()],
                                "weight": [round(x, 5) for x in w.tolist()]}) + "\n")
            offset += n


def logprob_differences(items, trainer_lp: torch.Tensor | None) -> tuple[float, float, float]:
    """(sum, count, max) of |sampler - trainer| token log-prob over this rank's trained
    tokens; trainer_lp [N] in the items' token order (NaN: not measured). The EOS that
    ends a stopped response was not reported by the sampler and is not compared."""
    if trainer_lp is None or not items or any(it.sampler_logprobs is None for it in items):
        return 0.0, 0.0, 0.0
    nan = float("nan")
    sampler_lp = torch.tensor([x for it in items for x in it.sampler_logprobs
                               + [nan] * (len(it.response_ids) - len(it.sampler_logprobs))],
                              dtype=torch.float64)
    diff = (sampler_lp - trainer_lp.double().cpu()).abs()
    diff = diff[~torch.isnan(diff)]
    if diff.numel() == 0:
        return 0.0, 0.0, 0.0
    return float(diff.sum()), float(diff.numel()), float(diff.max())


# ----------------------------------------------------------------------------- one step

def train_step(step, cfg, ctx) -> dict:
    """One rollout batch and its update(s); returns the step's metrics (all ranks reduced)."""
    info, policy, tokenizer, sampler, verifier = (ctx["info"], ctx["policy"], ctx["tokenizer"],
                                                  ctx["sampler"], ctx["verifier"])
    device, pad_id = info.device, tokenizer.pad_token_id
    lam = lambda_at(step, algo=cfg.algo, lam0=cfg.lam0, t_warm=cfg.t_warm,
                    schedule=cfg.lam_schedule)
    times = {}

    examples, seeds = step_prompts(ctx["train"], step, cfg, info.rank, info.world_size)
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, return_logprobs=cfg.logprob_check)
    stats_before = verifier.stats()
    groups = sample_groups(examples, seeds, tokenizer=tokenizer, sampler=sampler,
                           verifier=verifier, group_size=cfg.group_size, params=params,
                           std_normalize=cfg.std_normalize,
                           wrong_answer_strategy=cfg.wrong_answer_strategy,
                           find_wrong_answers=cfg.algo == "cepo")
    times["generate"], times["score"] = groups.generate_seconds, groups.score_seconds
    verifier_stats = verifier.stats()
    timeouts = verifier_stats.get("timeout", 0) - stats_before.get("timeout", 0)
    errors = verifier_stats.get("error", 0) - stats_before.get("error", 0)

    rollouts = groups.rollouts
    use_teachers = cfg.algo != "grpo" and lam > 0.0
    items = train_items(groups, tokenizer=tokenizer, with_teachers=use_teachers, algo=cfg.algo,
                        hint_template=cfg.hint_template)
    items = balance_items(items, info.rank, info.world_size)
    resp = Responses.of([it.response_ids for it in items])
    policy_ctx = [it.policy_ids for it in items]
    lengths = torch.tensor([len(it.response_ids) for it in items], dtype=torch.long)

    def per_token(values, dtype):
        return torch.repeat_interleave(torch.tensor(values, dtype=dtype), lengths)

    token_seq_adv = per_token([it.advantage for it in items], torch.float32)
    correct_tok = per_token([it.correct for it in items], torch.bool)

    t0 = time.perf_counter()
    token_adv, old_lp, ev = token_seq_adv, None, None
    global_active = dist_utils.all_reduce_sum([float(len(items))], device)[0]
    if use_teachers and global_active > 0:
        neg_ctx = [it.neg_ids if it.neg_ids is not None else it.policy_ids for it in items]
        has_neg = per_token([it.neg_ids is not None for it in items], torch.bool)
        ev = evidence(policy, policy_ctx, [it.pos_ids for it in items], neg_ctx, resp,
                      token_seq_adv, has_neg, lam=lam, eps_w=cfg.eps_w,
                      temperature=cfg.temperature, token_budget=cfg.token_budget, pad_id=pad_id,
                      device=device)
        token_adv = ev.token_advantages
        if cfg.dump_evidence:
            dump_evidence(ctx["out"] / f"evidence_rank{info.rank}.jsonl", step + 1, items, ev, lam,
                          cfg.eps_w, info.rank)
        if cfg.mini_batches > 1:
            old_lp = ev.lp_policy
    elif cfg.mini_batches > 1 and global_active > 0:
        old_lp = policy_logprobs(policy, policy_ctx, resp, temperature=cfg.temperature,
                                 token_budget=cfg.token_budget, pad_id=pad_id, device=device)
    ref_lp = None
    if cfg.kl_coef > 0 and global_active > 0:
        ref_lp = policy_logprobs(ctx["reference"], policy_ctx, resp, temperature=cfg.temperature,
                                 token_budget=cfg.token_budget, pad_id=pad_id, device=device)
    times["teacher"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    totals = dict(loss=0.0, clip_frac_low=0.0, clip_frac_high=0.0, approx_kl=0.0, ratio_mean=0.0,
                  entropy=0.0, tokens=0.0)
    grad_norm = 0.0
    trainer_lp = old_lp
    optimizer, scheduler = ctx["optimizer"], ctx["scheduler"]
    if global_active > 0:
        chunks = [c.tolist() for c in torch.arange(len(items)).chunk(cfg.mini_batches)] \
            if items else []
        for k in range(cfg.mini_batches):
            members = chunks[k] if k < len(chunks) else []
            n_local = float(sum(len(resp.response_ids[i]) for i in members))
            n_global = dist_utils.all_reduce_sum([n_local], device)[0]
            part = ppo_update(policy, policy_ctx, resp, members, token_advantages=token_adv,
                              old_logprobs=old_lp, ref_logprobs=ref_lp,
                              global_tokens=max(n_global, 1.0), world_size=info.world_size,
                              clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                              temperature=cfg.temperature, kl_coef=cfg.kl_coef,
                              token_budget=cfg.token_budget, pad_id=pad_id, device=device)
            for key in totals:
                totals[key] += part[key]
            if k == 0 and old_lp is None:  # before any optimizer step: the sampled weights
                trainer_lp = part["logprobs"]
            if cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in policy.parameters() if p.requires_grad], cfg.grad_clip)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    times["update"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sync_sampler(policy, sampler)
    times["sync"] = time.perf_counter() - t0

    diff_sum, diff_count, diff_max = (logprob_differences(items, trainer_lp)
                                      if cfg.logprob_check else (0.0, 0.0, 0.0))

    # ---- metrics, summed over ranks then normalised
    n_roll = float(len(rollouts))
    sums = {
        "rollouts": n_roll,
        "reward": sum(r.reward for r in rollouts),
        "correct": float(sum(r.correct for r in rollouts)),
        "response_tokens": float(sum(len(r.response_ids) for r in rollouts)),
        "truncated": float(sum(r.truncated for r in rollouts)),
        "skipped": n_roll - sum(r.advantage != 0.0 and bool(r.response_ids) for r in rollouts),
        "timeouts": float(timeouts),
        "verifier_errors": float(errors),
        "groups_with_negative": float(sum(w is not None for w in groups.wrong_answers)),
        "groups": float(len(groups.examples)),
        "logprob_diff_sum": diff_sum,
        "logprob_diff_tokens": diff_count,
        **{k: v for k, v in totals.items()},
    }
    if ev is not None:
        d = ev.delta.abs().cpu()
        corr = correct_tok
        sums.update(delta_abs_correct_sum=float(d[corr].sum()), correct_tokens=float(corr.sum()),
                    delta_abs_wrong_sum=float(d[~corr].sum()), wrong_tokens=float((~corr).sum()),
                    weights_clipped=float(ev.clipped.sum()), evidence_tokens=float(d.numel()))
    keys = list(sums)
    reduced = dict(zip(keys, dist_utils.all_reduce_sum([sums[k] for k in keys], device)))
    tok = max(reduced["tokens"], 1.0)
    metrics = {
        "reward_mean": reduced["reward"] / max(reduced["rollouts"], 1),
        "accuracy": reduced["correct"] / max(reduced["rollouts"], 1),
        "response_length": reduced["response_tokens"] / max(reduced["rollouts"], 1),
        "truncated_frac": reduced["truncated"] / max(reduced["rollouts"], 1),
        "skipped_rollouts": int(reduced["skipped"]),
        "verifier_timeouts": int(reduced["timeouts"]),
        "verifier_errors": int(reduced["verifier_errors"]),
        "groups_with_negative_frac": reduced["groups_with_negative"] / max(reduced["groups"], 1),
        "loss": reduced["loss"] / cfg.mini_batches,  # ranks' parts add up to the token mean
        "clip_frac_low": reduced["clip_frac_low"] / tok,
        "clip_frac_high": reduced["clip_frac_high"] / tok,
        "approx_kl": reduced["approx_kl"] / tok,
        "ratio_mean": reduced["ratio_mean"] / tok,
        "entropy": reduced["entropy"] / tok,
        "trained_tokens": int(reduced["tokens"]),
        "lambda": lam,
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": grad_norm,
    }
    if cfg.logprob_check and reduced["logprob_diff_tokens"]:
        metrics["logprob_diff_mean"] = (reduced["logprob_diff_sum"]
                                        / reduced["logprob_diff_tokens"])
        metrics["logprob_diff_max"] = dist_utils.all_reduce_max_float(diff_max, device)
        if metrics["logprob_diff_mean"] > cfg.logprob_diff_warn:
            log.warning("step %d: the sampler's token log-probs differ from the trainer's by "
                        "%.3g on average (max %.3g; warn above logprob_diff_warn=%g): check "
                        "the weight sync, the sampler's dtype and top_p", step + 1,
                        metrics["logprob_diff_mean"], metrics["logprob_diff_max"],
                        cfg.logprob_diff_warn)
    if ev is not None:
        metrics.update(
            delta_abs_correct=(reduced["delta_abs_correct_sum"] / reduced["correct_tokens"]
                               if reduced["correct_tokens"] else None),
            delta_abs_wrong=(reduced["delta_abs_wrong_sum"] / reduced["wrong_tokens"]
                             if reduced["wrong_tokens"] else None),
            weight_clipped_frac=reduced["weights_clipped"] / max(reduced["evidence_tokens"], 1))
    total_time = sum(times.values())
    metrics.update({f"time_{k}": v for k, v in times.items()})
    metrics["step_seconds"] = total_time
    metrics["tokens_per_second"] = reduced["response_tokens"] / max(total_time, 1e-9)
    metrics["peak_memory_gb"] = peak_memory_gb(device)
    return metrics


# ----------------------------------------------------------------------------- main

def run(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns the summary (also written to output_dir/summary.json)."""
    from cepo.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
    from cepo.verifier import Verifier

    wall0 = time.perf_counter()
    info = dist_utils.init_distributed(cfg.device)
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ck.set_backend(cfg.kernel_backend)
    torch.manual_seed(cfg.seed)
    out = resolve_output_dir(cfg)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    dist_utils.barrier()

    train, evals = load_datasets(cfg)
    policy, tokenizer = build_policy(cfg, info.device)
    optimizer, scheduler = build_optimizer(cfg, policy)
    ckpt_root = out / "checkpoints"
    start_step, state = 0, {}
    if cfg.resume:
        latest = latest_checkpoint(ckpt_root)
        if latest is None:
            raise ValueError(f"config: 'resume' is true but {ckpt_root} holds no complete checkpoint")
        state = load_checkpoint(latest, model=policy, optimizer=optimizer, scheduler=scheduler)
        start_step = int(state["step"])
        log.info("resumed from %s at step %d", latest, start_step)
    sampler = build_sampler(cfg, tokenizer, info)
    sync_sampler(policy, sampler)
    verifier = Verifier(timeout_s=cfg.verifier_timeout, num_workers=cfg.verifier_workers,
                        format_reward=cfg.format_reward, reward_fn=cfg.reward_fn)
    ctx = dict(info=info, policy=policy, tokenizer=tokenizer, sampler=sampler, verifier=verifier,
               train=train, optimizer=optimizer, scheduler=scheduler, out=out)
    if cfg.kl_coef > 0:
        ctx["reference"] = build_reference(cfg, info.device)
    metrics_log = MetricsLogger(out, enabled=info.is_main, tensorboard=cfg.tensorboard,
                                wandb_project=cfg.wandb_project, config=cfg.to_dict(),
                                resume_step=start_step if cfg.resume else None)

    if "accuracy_before" in state:
        acc_before = state["accuracy_before"]
    else:
        before = evaluate(cfg, evals, tokenizer, sampler, verifier, info) if evals else {}
        acc_before = before.get("eval_accuracy")
        if info.is_main and acc_before is not None:
            print(f"held-out accuracy before training: {acc_before:.3f} ({len(evals)} problems)")
            metrics_log.log(0, before)

    progress = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm
        progress = tqdm(total=cfg.steps, initial=start_step, desc=f"{cfg.algo}", dynamic_ncols=True)
    for step in range(start_step, cfg.steps):
        metrics = train_step(step, cfg, ctx)
        done = step + 1
        if evals and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            metrics.update(evaluate(cfg, evals, tokenizer, sampler, verifier, info))
        metrics_log.log(done, metrics)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}",
                                 acc=f"{metrics['accuracy']:.2f}", lam=f"{metrics['lambda']:.2f}")
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            save_checkpoint(ckpt_root, done, model=policy, optimizer=optimizer, scheduler=scheduler,
                            trainer_state={"step": done, "lambda": metrics["lambda"],
                                           "data_position": done * cfg.prompts_per_step,
                                           "accuracy_before": acc_before},
                            keep_last=cfg.keep_checkpoints)
    if progress is not None:
        progress.close()

    after = evaluate(cfg, evals, tokenizer, sampler, verifier, info) if evals else {}
    acc_after = after.get("eval_accuracy")
    if evals:
        metrics_log.log(cfg.steps, after)
    if cfg.export:
        export_hf(policy, tokenizer, out / "export")
    summary = {"algo": cfg.algo, "accuracy_before": acc_before, "accuracy_after": acc_after,
               "mean_at_k_after": after.get("eval_mean_at_k"), "eval_samples": cfg.eval_samples,
               "steps": cfg.steps, "wall_seconds": time.perf_counter() - wall0,
               "eval_problems": len(evals), "world_size": info.world_size,
               "device": info.device.type, "output_dir": str(out)}
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        try:
            plot_training_curves(out / "metrics.jsonl", out / "training_curves.png")
        except Exception as e:  # a plot must never lose a finished run
            log.warning("could not plot training curves: %s", e)
        if acc_after is not None:
            print(f"held-out accuracy after {cfg.steps} steps: {acc_after:.3f} "
                  f"(before: {acc_before:.3f})")
        print(f"outputs in {out}")
    metrics_log.close()
    verifier.close()
    sampler.close()
    dist_utils.barrier()
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    try:
        run(cfg)
    finally:
        dist_utils.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
