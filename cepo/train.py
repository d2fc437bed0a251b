"""``torchrun -m cepo.train``: GRPO / RLSD / CEPO training of a Hugging Face causal LM.

One step (docs/algorithm.md): sample -> score -> advantages -> contexts -> evidence ->
update -> sync -> log. With no arguments it trains CEPO on the built-in arithmetic task
with the tiny model shipped in cepo/assets, on CPU (settings: cepo/configs/tiny-arith.yaml).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import torch

import cepo_kernels as ck
from cepo import distributed as dist_utils
from cepo.algorithms import lambda_at
from cepo.build import (build_image_preparer, build_optimizer, build_policy, build_reference, build_sampler,
                        drop_long_prompts, load_datasets, load_tokenizer, sync_sampler,
                        warn_about_settings)
from cepo.config import TrainConfig, parse_config
from cepo.contexts import build_contexts, render_prompt
from cepo.data import Example, step_prompts
from cepo.evaluation import evaluate
from cepo.metrics import MetricsLogger, plot_training_curves
from cepo.rollout import Groups, TrainItem, balance_items, sample_groups, train_items
from cepo.run_lock import LauncherWatch, OutputDirLock
from cepo.samples import SampleWriter, gather_to_main, sample_record
from cepo.sampler import SamplingParams
from cepo.self_distill import distill_items
from cepo.step import (DistillSpec, Responses, context_hidden_states, evidence, policy_logprobs,
                       ppo_update)
from cepo.hints import teacher_hints
from cepo.teacher import build_teacher
from cepo.step_metrics import REDUCTIONS, STATUS_PREFIX, TIME_PREFIX, StepMetrics
from cepo.vision import display_prompt

log = logging.getLogger("cepo")

PHASES = ("generate", "score", "teacher", "update", "sync")
"""The phases of a step, timed as time_<phase>; step_seconds is their sum."""

DISTILL_ALGOS = ("opsd", "sdpo")
"""Self-distillation algorithms: the loss is a divergence to a self-teacher (cepo.self_distill)."""


@dataclass
class Run:
    """Everything a run holds between steps."""

    cfg: TrainConfig
    info: dist_utils.DistInfo
    out: Path
    tokenizer: object
    policy: torch.nn.Module
    sampler: object
    verifier: object
    train: list[Example]
    evals: list[Example]
    optimizer: torch.optim.Optimizer
    scheduler: object
    metrics_log: MetricsLogger
    samples: SampleWriter
    eval_samples: SampleWriter
    reference: torch.nn.Module | None = None
    verifier_statuses: tuple[str, ...] = ()
    teacher: object | None = None    # cepo.teacher.Teacher (None: the policy scores teachers)
    watch: LauncherWatch = field(default_factory=LauncherWatch)
    bad_steps: int = 0               # consecutive steps with a non-finite loss / grad norm
    preparer: object = None          # vision-language models: cepo.vision.ImagePreparer
    image_cache: dict = field(default_factory=dict)  # this step's image embeddings, per model

    def prepare(self, examples: list[Example]) -> list[Example]:
        """Multimodal examples with their images processed and placeholders expanded
        (cepo.vision); text examples as they are."""
        if self.preparer is None:
            return examples
        return [self.preparer.prepare(ex) for ex in examples]

    def images(self, items) -> dict:
        """Keyword arguments of the step passes for the items' images: each item's
        ``ImageInputs`` and the step's embedding cache; {} for a text model."""
        if self.preparer is None:
            return {}
        return dict(images=[it.vision for it in items], image_cache=self.image_cache)

    def render(self, prompt: str) -> list[int]:
        """The policy context of a prompt, as the sampler sees it."""
        return render_prompt(self.tokenizer, prompt, system_prompt=self.cfg.system_prompt,
                             chat_template=self.cfg.chat_template)

    def contexts(self, prompts, answers, wrong_answers):
        """(policy, pos, neg) contexts per group; see cepo.contexts.build_contexts."""
        return build_contexts(self.tokenizer, prompts, answers, wrong_answers,
                              self.cfg.hint_template, system_prompt=self.cfg.system_prompt,
                              chat_template=self.cfg.chat_template)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak, or the RSS high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ----------------------------------------------------------------------------- the step

def sample_and_score(run: Run, step: int, m: StepMetrics) -> Groups:
    """Sample G responses for this rank's prompts of the step (one sampler call), score
    them, compute group advantages and wrong-answer hints; record rollout metrics."""
    cfg, info = run.cfg, run.info
    examples, seeds = step_prompts(run.train, step, prompts_per_step=cfg.prompts_per_step,
                                   seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    examples = run.prepare(examples)
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, return_logprobs=cfg.logprob_check)
    groups = sample_groups(examples, [run.render(e.prompt) for e in examples], seeds,
                           sampler=run.sampler, verifier=run.verifier, group_size=cfg.group_size,
                           params=params, std_normalize=cfg.std_normalize,
                           wrong_answer_strategy=cfg.wrong_answer_strategy,
                           find_wrong_answers=cfg.algo == "cepo",
                           # scoring overlaps generation when the sampler runs on a GPU; on
                           # CPU the two would only compete for the same cores
                           overlap_scoring=info.device.type == "cuda")
    m.add("time_generate", groups.generate_seconds)
    m.add("time_score", groups.score_seconds)
    for r in groups.rollouts:
        m.add("reward_mean", r.reward)
        m.add("accuracy", float(r.correct))
        m.add("response_length", len(r.response_ids))
        m.add("response_tokens", len(r.response_ids))
        m.add("truncated_frac", float(r.truncated))
        m.add("skipped_rollouts", float(r.advantage == 0.0 or not r.response_ids))
        m.add("verifier_timeouts", float(r.status == "timeout"))
        m.add("verifier_errors", float(r.status == "error"))
        for status in run.verifier_statuses:
            m.add(STATUS_PREFIX + status, float(r.status == status))
    for wrong in groups.wrong_answers:
        m.add("groups_with_negative_frac", float(wrong is not None))
    return groups


def per_token(values, lengths: torch.Tensor, dtype) -> torch.Tensor:
    """[N]: one value per rollout repeated over its tokens."""
    return torch.repeat_interleave(torch.tensor(values, dtype=dtype), lengths)


def score_evidence(run: Run, items: list[TrainItem], resp: Responses, lam: float,
                   m: StepMetrics) -> ck.Evidence:
    """The contrastive evidence and token advantages of the step's items (one packed pass
    over the contexts they need); records the evidence metrics."""
    cfg = run.cfg
    lengths = torch.tensor([len(it.response_ids) for it in items], dtype=torch.long)
    want_policy = cfg.mini_batches > 1  # lp_policy is then the old log-probs of every row
    contexts = {
        "policy": [it.policy_ids if (want_policy or it.neg_ids is None) else None
                   for it in items],
        "pos": [it.pos_ids for it in items],
        "neg": [it.neg_ids for it in items],
    }
    ev = evidence(run.policy, contexts, resp, per_token([it.advantage for it in items], lengths,
                                                        torch.float32),
                  per_token([it.neg_ids is not None for it in items], lengths, torch.bool),
                  lam=lam, eps_w=cfg.eps_w, temperature=cfg.temperature,
                  token_budget=cfg.token_budget, pad_id=run.tokenizer.pad_token_id,
                  device=run.info.device,
                  teacher=run.teacher.model if run.teacher is not None else None,
                  **run.images(items))
    d = ev.delta.abs().float().cpu()
    correct = per_token([it.correct for it in items], lengths, torch.bool)
    if correct.any():
        m.add("delta_abs_correct", float(d[correct].mean()), weight=float(correct.sum()))
    if (~correct).any():
        m.add("delta_abs_wrong", float(d[~correct].mean()), weight=float((~correct).sum()))
    if d.numel():
        m.add("weight_clipped_frac", float(ev.clipped.float().mean()), weight=float(d.numel()))
    return ev


def update(run: Run, items: list[TrainItem], resp: Responses, token_adv: torch.Tensor,
           old_lp: torch.Tensor | None, ref_lp: torch.Tensor | None,
           m: StepMetrics, teacher_h: torch.Tensor | None = None) -> torch.Tensor | None:
    """PPO update(s) over ``mini_batches`` chunks of the items; a mini-batch whose loss or
    gradient norm is not finite skips its optimizer step (counted). Returns the trainer's
    [N] log-probs under the weights the rollouts were sampled with (for the sync check).
    ``teacher_h`` [N, H] (OPSD / SDPO): the self-teacher's hidden states; the loss is then
    the self-distillation term, plus the PPO term when distill_pg_coef > 0."""
    cfg, device = run.cfg, run.info.device
    params = [p for p in run.policy.parameters() if p.requires_grad]
    chunks = [c.tolist() for c in torch.arange(len(items)).chunk(cfg.mini_batches)] if items else []
    trainer_lp = old_lp
    seq = cfg.loss_agg == "seq"
    token_w = loss_agg_weights(resp) if seq else None
    for k in range(cfg.mini_batches):
        members = chunks[k] if k < len(chunks) else []
        distill = None
        if teacher_h is None:
            n_global = dist_utils.all_reduce_sum([trained_count(resp, members, seq)], device)[0]
        else:
            pg = [i for i in members if items[i].advantage != 0.0]
            taught = [i for i in members if items[i].teacher_ids is not None]
            n_global, n_taught = dist_utils.all_reduce_sum(
                [trained_count(resp, pg, seq), trained_count(resp, taught, seq)], device)
            distill = distill_spec(cfg, items, resp, teacher_h, max(n_taught, 1.0), token_w)
        extra = {}
        if token_w is not None:
            extra["token_weights"] = token_w
        if cfg.clip_dual is not None:
            extra["clip_dual"] = cfg.clip_dual
        if distill is not None:
            extra["distill"] = distill
        part = ppo_update(run.policy, [it.policy_ids for it in items], resp, members,
                          token_advantages=token_adv, old_logprobs=old_lp, ref_logprobs=ref_lp,
                          global_tokens=max(n_global, 1.0), world_size=run.info.world_size,
                          clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                          temperature=cfg.temperature, kl_coef=cfg.kl_coef,
                          token_budget=cfg.token_budget, pad_id=run.tokenizer.pad_token_id,
                          device=device, **extra, **run.images(items))
        if k == 0 and old_lp is None:  # before any optimizer step: the sampled weights
            trainer_lp = part.logprobs
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0
                                              else float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        finite = float(torch.isfinite(torch.tensor([part.loss, grad_norm])).all())
        finite = -dist_utils.all_reduce_max_float(-finite, device)  # min over ranks
        if finite:
            run.optimizer.step()
        else:
            log.error("non-finite loss (%s) or gradient norm (%s): optimizer step skipped",
                      part.loss, grad_norm)
        run.optimizer.zero_grad(set_to_none=True)
        m.add("nonfinite_update", 0.0 if finite else 1.0)
        m.add("loss", part.loss / cfg.mini_batches)
        m.add("trained_tokens", part.tokens)
        m.add("grad_norm", grad_norm if finite else 0.0)
        for key, total in part.stat_sums.items():
            if part.stat_tokens:
                m.add(key, total / part.stat_tokens, weight=part.stat_tokens)
        if distill is not None:  # each rank's share times the ranks: the mean is the total
            m.add("distill_loss", part.distill_loss * run.info.world_size)
    return trainer_lp


def trained_count(resp: Responses, rollouts: list[int], seq: bool) -> float:
    """This rank's share of a loss normaliser: the rollouts' tokens (loss_agg token) or the
    number of rollouts (loss_agg seq)."""
    if seq:
        return float(len(rollouts))
    return float(sum(len(resp.response_ids[i]) for i in rollouts))


def loss_agg_weights(resp: Responses) -> torch.Tensor:
    """[N] token weights of loss_agg seq: 1 / the length of the token's rollout, so that,
    divided by the number of sequences, the loss is the mean of per-sequence token means."""
    lengths = torch.tensor([len(r) for r in resp.response_ids], dtype=torch.long)
    return per_token([1.0 / max(int(n), 1) for n in lengths], lengths, torch.float32)


def distill_spec(cfg: TrainConfig, items: list[TrainItem], resp: Responses,
                 teacher_h: torch.Tensor, normalizer: float,
                 token_w: torch.Tensor | None) -> DistillSpec:
    """The OPSD / SDPO part of an update: teacher states, masks and the loss settings."""
    lengths = torch.tensor([len(it.response_ids) for it in items], dtype=torch.long)
    return DistillSpec(
        teacher_hidden=teacher_h,
        distilled=per_token([it.teacher_ids is not None for it in items], lengths, torch.bool),
        pg_mask=per_token([it.advantage != 0.0 for it in items], lengths, torch.bool),
        normalizer=normalizer, coef=cfg.distill_coef, pg_coef=cfg.distill_pg_coef,
        divergence=cfg.distill_divergence, beta=cfg.distill_beta, token_weights=token_w)


def record_logprob_check(items: list[TrainItem], trainer_lp: torch.Tensor | None,
                         m: StepMetrics) -> None:
    """|sampler - trainer| token log-probs over this rank's trained tokens (weights before
    the update): mean and max. Tokens the sampler did not report are skipped."""
    if trainer_lp is None or not items or any(it.sampler_logprobs is None for it in items):
        return
    nan = float("nan")
    sampler_lp = torch.tensor([x for it in items for x in list(it.sampler_logprobs)[
        :len(it.response_ids)] + [nan] * (len(it.response_ids) - len(it.sampler_logprobs))],
        dtype=torch.float64)
    diff = (sampler_lp - trainer_lp.double().cpu()).abs()
    diff = diff[~torch.isnan(diff)]
    if diff.numel():
        m.add("logprob_diff_mean", float(diff.mean()), weight=float(diff.numel()))
        m.add("logprob_diff_max", float(diff.max()))


def train_step(run: Run, step: int) -> dict:
    """One rollout batch and its update(s); returns the step's metrics (all ranks reduced)."""
    cfg, info, device = run.cfg, run.info, run.info.device
    m = StepMetrics()  # every rank declares every name, whatever it has to report
    m.declare(*REDUCTIONS, *(STATUS_PREFIX + s for s in run.verifier_statuses),
              *(TIME_PREFIX + phase for phase in PHASES))
    lam = lambda_at(step, algo=cfg.algo, lam0=cfg.lam0, t_warm=cfg.t_warm,
                    schedule=cfg.lam_schedule)
    m.add("lambda", lam)
    if run.teacher is not None:
        run.teacher.at_step(step)  # a lagged teacher is refreshed when step % k == 0

    # sample -> score -> advantages (and the wrong-answer hints)
    groups = sample_and_score(run, step, m)
    run.image_cache.clear()  # embeddings are reused within a step only

    # contexts: rollouts with A != 0 (OPSD / SDPO: the distilled ones), balanced over ranks
    use_teachers = cfg.algo != "grpo" and lam > 0.0
    distilling = cfg.algo in DISTILL_ALGOS
    if distilling:
        local_items = distill_items(groups, algo=cfg.algo, group_size=cfg.group_size,
                                    render=run.render, opsd_template=cfg.opsd_template,
                                    sdpo_template=cfg.sdpo_template,
                                    with_policy_gradient=cfg.distill_pg_coef > 0,
                                    sdpo_failed_only=cfg.sdpo_failed_only)
        if groups.rollouts:  # the share of sampled rollouts that got a self-teacher
            taught = sum(it.teacher_ids is not None for it in local_items)
            m.add("distilled_frac", taught / len(groups.rollouts), weight=len(groups.rollouts))
    else:
        hints = None
        if use_teachers and cfg.hint_source != "answer":
            hints = teacher_hints(groups, source=cfg.hint_source, k=cfg.hint_tokens,
                                  decode=lambda ids: run.tokenizer.decode(
                                      ids, skip_special_tokens=True))
        local_items = train_items(groups, build_contexts=run.contexts,
                                  with_teachers=use_teachers, algo=cfg.algo, hints=hints)
    items = balance_items(local_items, info.rank, info.world_size)
    resp = Responses.of([it.response_ids for it in items])
    lengths = torch.tensor([len(it.response_ids) for it in items], dtype=torch.long)
    active = dist_utils.all_reduce_sum([float(len(items))], device)[0] > 0

    # evidence -> token advantages (old / reference log-probs where needed)
    t0 = time.perf_counter()
    token_adv = per_token([it.advantage for it in items], lengths, torch.float32)
    old_lp = ref_lp = ev = teacher_h = None
    if active and distilling:  # the self-teacher: one no-grad pass over the teacher contexts
        teacher_h = context_hidden_states(
            run.policy, {"teacher": [it.teacher_ids for it in items]}, resp,
            token_budget=cfg.token_budget, pad_id=run.tokenizer.pad_token_id,
            device=device)["teacher"]
    if active and use_teachers:
        ev = score_evidence(run, items, resp, lam, m)
        token_adv = ev.token_advantages
        old_lp = ev.lp_policy if cfg.mini_batches > 1 else None
        if cfg.dump_evidence:
            dump_evidence(run.out / f"evidence_rank{info.rank}.jsonl", step + 1, items, ev, lam)
    elif active and cfg.mini_batches > 1 and not (distilling and cfg.distill_pg_coef == 0):
        old_lp = policy_logprobs(run.policy, [it.policy_ids for it in items], resp,
                                 temperature=cfg.temperature, token_budget=cfg.token_budget,
                                 pad_id=run.tokenizer.pad_token_id, device=device,
                                 **run.images(items))
    if active and run.reference is not None:
        ref_lp = policy_logprobs(run.reference, [it.policy_ids for it in items], resp,
                                 temperature=cfg.temperature, token_budget=cfg.token_budget,
                                 pad_id=run.tokenizer.pad_token_id, device=device,
                                 **run.images(items))
    m.add("time_teacher", time.perf_counter() - t0)

    # update
    t0 = time.perf_counter()
    trainer_lp = None
    m.add("update_skipped", 0.0 if active else 1.0)
    if active:
        trainer_lp = update(run, items, resp, token_adv, old_lp, ref_lp, m, teacher_h)
        run.scheduler.step()
    else:
        with warnings.catch_warnings():  # no optimizer step happened, on purpose
            warnings.simplefilter("ignore", UserWarning)
            run.scheduler.step()
    m.add("time_update", time.perf_counter() - t0)

    # sync the sampler's weights
    t0 = time.perf_counter()
    if active:
        sync_sampler(run.policy, run.sampler)
    m.add("time_sync", time.perf_counter() - t0)

    # log
    if cfg.logprob_check:
        record_logprob_check(items, trainer_lp, m)
    m.add("lr", run.scheduler.get_last_lr()[0])
    m.add("peak_memory_gb", peak_memory_gb(device))
    metrics = finish_metrics(m.reduce(device))
    report_step(run, step, metrics, active)
    write_samples(run, step, groups)
    return metrics


def finish_metrics(reduced: dict) -> dict:
    """Derived figures: step time (sum of the phases), tokens/s; integer counts."""
    metrics = {k: v for k, v in reduced.items() if v is not None or k.startswith("delta_abs")}
    step_seconds = sum(v for k, v in reduced.items() if k.startswith("time_") and v)
    metrics["step_seconds"] = step_seconds
    metrics["tokens_per_second"] = reduced.get("response_tokens", 0.0) / max(step_seconds, 1e-9)
    for key in ("skipped_rollouts", "verifier_timeouts", "verifier_errors", "trained_tokens"):
        if key in metrics:
            metrics[key] = int(metrics[key])
    return metrics


def report_step(run: Run, step: int, metrics: dict, active: bool) -> None:
    """Plain log lines for what a user must know about this step."""
    cfg = run.cfg
    if not run.info.is_main:
        return
    if not active and cfg.algo == "sdpo":
        log.info("step %d: no rollout had a self-teacher (no group had a successful rollout to "
                 "learn from) and none carried a policy-gradient signal: update skipped",
                 step + 1)
    elif not active:
        log.info("step %d: no rollout carried a signal (every group's rewards were equal): "
                 "update skipped", step + 1)
    if (cfg.algo == "cepo" and metrics.get("lambda", 0) > 0 and active
            and metrics.get("groups_with_negative_frac") == 0.0):
        log.warning("step %d: no group had a wrong answer with an extractable final answer, so "
                    "CEPO fell back to RLSD for every group (answer_extraction=%s; read "
                    "samples.jsonl to see what the model writes)", step + 1, cfg.answer_extraction)
    unparseable = metrics.get("verifier_status_unparseable") or 0.0
    if unparseable >= 0.5:
        log.warning("step %d: %.0f%% of the responses had no final answer the verifier could "
                    "extract (answer_extraction=%s: ask for \\boxed{} in the prompt or with "
                    "--system_prompt; samples.jsonl shows what the model writes)", step + 1,
                    100 * unparseable, cfg.answer_extraction)
    diff = metrics.get("logprob_diff_mean")
    if diff is not None and diff > cfg.logprob_diff_warn:
        log.warning("step %d: the sampler's token log-probs differ from the trainer's by %.3g on "
                    "average (max %.3g; warn above logprob_diff_warn=%g): check the weight sync, "
                    "the sampler's dtype and top_p", step + 1, diff,
                    metrics.get("logprob_diff_max", float("nan")), cfg.logprob_diff_warn)


def write_samples(run: Run, step: int, groups: Groups) -> None:
    """Every samples_every steps: the first samples_per_step rollouts of each rank."""
    cfg = run.cfg
    if not cfg.samples_every or (step + 1) % cfg.samples_every:
        return
    rows = [sample_record(step + 1, prompt=display_prompt(groups.examples[r.group].prompt),
                          response=r.text,
                          extracted=r.extracted, gold=groups.examples[r.group].answer,
                          reward=r.reward, status=r.status, truncated=r.truncated,
                          advantage=r.advantage)
            for r in groups.rollouts[: cfg.samples_per_step]]
    rows = gather_to_main(rows)[: cfg.samples_per_step]
    run.samples.write(step + 1, rows, "samples/train")


def dump_evidence(path: Path, step: int, items: list[TrainItem], ev: ck.Evidence,
                  lam: float) -> None:
    """Append one JSON line per trained rollout: tokens, delta and the token weight w_t,
    read back from the kernel's token advantages (A_t = A ((1 - lam) + lam w_t))."""
    delta = ev.delta.float().cpu()
    token_adv = ev.token_advantages.float().cpu()
    offset = 0
    with path.open("a") as f:
        for it in items:
            n = len(it.response_ids)
            d = delta[offset:offset + n]
            w = (token_adv[offset:offset + n] / it.advantage - (1.0 - lam)) / lam
            f.write(json.dumps({"step": step, "advantage": it.advantage, "correct": it.correct,
                                "has_negative": it.neg_ids is not None, "lambda": lam,
                                "tokens": it.response_ids,
                                "delta": [round(x, 5) for x in d.tolist()],
                                "weight": [round(x, 5) for x in w.tolist()]}) + "\n")
            offset += n


# ----------------------------------------------------------------------------- the run

def resolve_output_dir(cfg: TrainConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def run_evaluation(run: Run, step: int) -> dict:
    """Evaluate on the held-out set (collective); the responses go to eval_samples.jsonl."""
    cfg = run.cfg
    metrics, rows = evaluate(run.prepare(run.evals), render=run.render, sampler=run.sampler,
                             verifier=run.verifier, info=run.info,
                             max_new_tokens=cfg.max_new_tokens, samples=cfg.eval_samples,
                             temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                             step=step)
    run.eval_samples.write(step, gather_to_main(rows), "samples/eval")
    return metrics


def setup(cfg: TrainConfig, info, out: Path) -> tuple[Run, dict]:
    """Build every part of the run and restore a checkpoint when resuming; returns the run
    and the restored trainer state ({} for a fresh run)."""
    from cepo.checkpoint import latest_checkpoint, load_checkpoint
    from cepo.verifier import STATUSES, Verifier

    tokenizer = load_tokenizer(cfg)
    preparer = build_image_preparer(cfg, tokenizer)
    train, evals = load_datasets(cfg)
    render = partial(render_prompt, tokenizer, system_prompt=cfg.system_prompt,
                     chat_template=cfg.chat_template)
    prepare = preparer.prepare if preparer is not None else None
    train = drop_long_prompts(train, render, cfg.max_prompt_tokens, "training", prepare)
    evals = (drop_long_prompts(evals, render, cfg.max_prompt_tokens, "evaluation", prepare)
             if evals else [])
    if info.is_main:
        warn_about_settings(cfg)
    policy = build_policy(cfg, info.device)
    optimizer, scheduler = build_optimizer(cfg, policy)
    reference = teacher = saved = None
    if cfg.teacher != "policy" and cfg.algo != "grpo":  # built before a resume restores it
        reference = build_reference(cfg, info.device) if cfg.kl_coef > 0 else None
        teacher = build_teacher(cfg, policy, info.device, reference=reference)
        saved = {"teacher": teacher.saved} if teacher.saved is not None else None
    # the sampler before any RNG state is restored: an engine may reseed the global RNGs
    sampler = build_sampler(cfg, tokenizer, info)
    state: dict = {}
    if cfg.resume:
        latest = latest_checkpoint(out / "checkpoints")
        if latest is None:
            raise ValueError(f"config: 'resume' is true but {out / 'checkpoints'} holds no "
                             "complete checkpoint")
        state = load_checkpoint(latest, model=policy, optimizer=optimizer, scheduler=scheduler,
                                extra_models=saved)
        log.info("resumed from %s at step %d", latest, int(state["step"]))
    sync_sampler(policy, sampler)
    verifier = Verifier(timeout_s=cfg.verifier_timeout, num_workers=cfg.verifier_workers,
                        format_reward=cfg.format_reward, reward_fn=cfg.reward_fn,
                        answer_extraction=cfg.answer_extraction)
    resume_step = int(state["step"]) if state else None
    metrics_log = MetricsLogger(out, enabled=info.is_main, tensorboard=cfg.tensorboard,
                                wandb_project=cfg.wandb_project, config=cfg.to_dict(),
                                resume_step=resume_step)
    writers = [SampleWriter(out / name, enabled=info.is_main, tensorboard=metrics_log.tensorboard,
                            wandb_run=metrics_log.wandb_run)
               for name in ("samples.jsonl", "eval_samples.jsonl")]
    if resume_step is not None:
        for w in writers:
            w.truncate_after(resume_step)
    run = Run(cfg=cfg, info=info, out=out, tokenizer=tokenizer, policy=policy, sampler=sampler,
              verifier=verifier, train=train, evals=evals, optimizer=optimizer,
              scheduler=scheduler, metrics_log=metrics_log, samples=writers[0],
              eval_samples=writers[1],
              reference=(reference if reference is not None or cfg.kl_coef <= 0
                         else build_reference(cfg, info.device)),
              verifier_statuses=tuple(STATUSES), teacher=teacher, preparer=preparer)
    return run, state


def train_loop(run: Run, start_step: int, acc_before) -> None:
    """Steps start_step .. cfg.steps: train, evaluate, log, checkpoint; stops early (with
    a message) when the launcher died or too many consecutive updates were non-finite."""
    from cepo.checkpoint import save_checkpoint

    cfg, info = run.cfg, run.info
    progress = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm
        progress = tqdm(total=cfg.steps, initial=start_step, desc=cfg.algo, dynamic_ncols=True)
    try:
        for step in range(start_step, cfg.steps):
            if run.watch.launcher_died():
                raise SystemExit(f"step {step}: the launcher (torchrun, PID {run.watch.parent}) "
                                 "is gone; stopping instead of training unseen. Resume with "
                                 "--resume true")
            metrics = train_step(run, step)
            done = step + 1
            run.bad_steps = run.bad_steps + 1 if metrics.get("nonfinite_update") else 0
            if run.bad_steps >= cfg.max_bad_steps:
                raise FloatingPointError(
                    f"step {done}: {run.bad_steps} consecutive steps with a non-finite loss or "
                    f"gradient norm (max_bad_steps={cfg.max_bad_steps}); the weights were not "
                    "updated by them. Lower lr, check the data, or use float32")
            if run.evals and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                metrics.update(run_evaluation(run, done))
            run.metrics_log.log(done, metrics)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}",
                                     acc=f"{metrics['accuracy']:.2f}",
                                     lam=f"{metrics['lambda']:.2f}")
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
                save_checkpoint(run.out / "checkpoints", done, model=run.policy,
                                optimizer=run.optimizer, scheduler=run.scheduler,
                                trainer_state={"step": done, "lambda": metrics["lambda"],
                                               "data_position": done * cfg.prompts_per_step,
                                               "accuracy_before": acc_before},
                                keep_last=cfg.keep_checkpoints,
                                extra_models=({"teacher": run.teacher.saved}
                                              if run.teacher is not None
                                              and run.teacher.saved is not None else None))
    finally:
        if progress is not None:
            progress.close()


def run(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns the summary (also written to output_dir/summary.json)."""
    from cepo.export import export_hf
    from cepo.threads import configure_threads

    wall0 = time.perf_counter()
    info = dist_utils.init_distributed(cfg.device, cpu_offload=cfg.cpu_offload)
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if info.device.type == "cpu":
        threads, why = configure_threads(cfg.cpu_threads)
        if info.is_main:
            log.info("CPU intra-op threads per process: %d (%s)", threads, why)
    ck.set_backend(cfg.kernel_backend)
    torch.manual_seed(cfg.seed)
    out = resolve_output_dir(cfg)
    lock = None
    if info.is_main:
        lock = OutputDirLock(out).acquire()
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    dist_utils.barrier()

    run_, state = setup(cfg, info, out)
    start_step = int(state.get("step", 0))
    if "accuracy_before" in state:
        acc_before = state["accuracy_before"]
    else:
        before = run_evaluation(run_, 0) if run_.evals else {}
        acc_before = before.get("eval_accuracy")
        if info.is_main and acc_before is not None:
            print(f"held-out accuracy before training: {acc_before:.3f} ({len(run_.evals)} problems)")
            run_.metrics_log.log(0, before)

    train_loop(run_, start_step, acc_before)

    after = run_evaluation(run_, cfg.steps) if run_.evals else {}
    acc_after = after.get("eval_accuracy")
    if run_.evals:
        run_.metrics_log.log(cfg.steps, after)
    if cfg.export:
        export_hf(run_.policy, run_.tokenizer, out / "export",
                  image_processor=run_.preparer.processor if run_.preparer else None,
                  source_dir=cfg.model)
    peak = dist_utils.all_reduce_max_float(peak_memory_gb(info.device), info.device)
    summary = {"algo": cfg.algo, "accuracy_before": acc_before, "accuracy_after": acc_after,
               "mean_at_k_after": after.get("eval_mean_at_k"), "eval_samples": cfg.eval_samples,
               "steps": cfg.steps, "wall_seconds": time.perf_counter() - wall0,
               "peak_memory_gb": peak, "eval_problems": len(run_.evals),
               "world_size": info.world_size, "device": info.device.type, "output_dir": str(out)}
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        try:
            plot_training_curves(out / "metrics.jsonl", out / "training_curves.png")
        except Exception as e:  # a plot must never lose a finished run
            log.warning("could not plot training curves: %s", e)
        if acc_after is not None:
            print(f"held-out accuracy after {cfg.steps} steps: {acc_after:.3f} "
                  f"(before: {acc_before:.3f})")
        print(f"outputs in {out} (samples.jsonl: what the model wrote)")
    run_.metrics_log.close()
    run_.verifier.close()
    run_.sampler.close()
    dist_utils.barrier()
    if lock is not None:
        lock.release()
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    try:
        run(cfg)
    finally:
        dist_utils.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
