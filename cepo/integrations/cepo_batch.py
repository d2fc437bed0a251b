"""CEPO on a batch another trainer already sampled and scored: the wrong answer of each
group, the hinted teacher prompts, and the token advantages from ``contrastive_evidence``.

Framework-free (torch and cepo only): the TRL adapter calls these with TRL's batch.
Rollouts of one group are consecutive (G = num_generations per prompt), as TRL, verl and
OpenRLHF lay them out.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import cepo_kernels as ck
from cepo.algorithms import lambda_at
from cepo.contexts import (ANSWER_ONLY_TEMPLATE, STRATEGIES, check_hint_template,
                           choose_wrong_answers, hinted_prompt)
from cepo.integrations.head import completion_rows, no_autocast

ALGOS = ("cepo", "rlsd")
SCHEDULES = ("linear", "constant", "cosine")


def answer_extractor(mode: str = "boxed") -> Callable[[str], str | None]:
    """Response text -> final answer, as cepo's trainer extracts it: ``extract_answer(text,
    mode)`` from cepo.answers (modes ``ANSWER_EXTRACTION_MODES``: boxed, last_number,
    math_verify); where that function is absent, only "boxed" (``extract_boxed``)."""
    from cepo import answers

    extract = getattr(answers, "extract_answer", None)
    if extract is None:
        if mode != "boxed":
            raise ValueError(f"cepo_answer_extraction={mode!r}: this cepo has only 'boxed'")
        return answers.extract_boxed
    modes = getattr(answers, "ANSWER_EXTRACTION_MODES", None)
    if modes is not None and mode not in modes:
        raise ValueError(f"cepo_answer_extraction must be one of {tuple(modes)}, got {mode!r}")
    return functools.partial(extract, mode=mode)


@dataclass
class CEPOOptions:
    """CEPO's knobs (docs/algorithm.md steps 2-5). ``lambda0 = 0`` turns CEPO off (GRPO exactly).

    lambda0 / t_warm / schedule: lambda decays from lambda0 to 0 over t_warm optimizer
    steps (cepo.algorithms.lambda_at). eps_w: token weights are clipped to 1 +- eps_w.
    algo: "cepo" (wrong-answer teacher, RLSD fallback per group) or "rlsd" (always the
    fallback, delta = lp_pos - lp_policy). hint_template: how a hint is appended to the
    user message (cepo.contexts.hinted_prompt). answer_column: the dataset column with the
    gold answer. wrong_answer_strategy: cepo.contexts.choose_wrong_answers. correct_threshold:
    a rollout whose total reward is >= this counts as correct (never a wrong-answer
    candidate). answer_extraction: how the final answer is read from a response
    (``answer_extractor``: boxed, last_number, math_verify); answer_extractor, when given,
    replaces it (response text -> final answer or None).
    """

    lambda0: float = 0.0
    t_warm: int = 25
    schedule: str = "linear"
    eps_w: float = 0.2
    algo: str = "cepo"
    hint_template: str = ANSWER_ONLY_TEMPLATE
    answer_column: str = "answer"
    wrong_answer_strategy: str = "worst"
    correct_threshold: float = 1.0
    answer_extraction: str = "boxed"
    answer_extractor: Callable[[str], str | None] | None = None

    def __post_init__(self):
        if not 0.0 <= self.lambda0 <= 1.0:
            raise ValueError(f"cepo_lambda0 must be in [0, 1], got {self.lambda0}")
        if not 0.0 <= self.eps_w <= 1.0:
            raise ValueError(f"cepo_eps_w must be in [0, 1], got {self.eps_w}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"cepo_schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.algo not in ALGOS:
            raise ValueError(f"cepo_algo must be one of {ALGOS}, got {self.algo!r}")
        if self.wrong_answer_strategy not in STRATEGIES:
            raise ValueError(f"cepo_wrong_answer_strategy must be one of {STRATEGIES}, "
                             f"got {self.wrong_answer_strategy!r}")
        check_hint_template(self.hint_template)
        if self.answer_extractor is None:
            self.answer_extractor = answer_extractor(self.answer_extraction)

    @property
    def enabled(self) -> bool:
        return self.lambda0 > 0.0

    def lam(self, step: int) -> float:
        """lambda at a 0-based optimizer step."""
        return lambda_at(step, algo=self.algo, lam0=self.lambda0, t_warm=self.t_warm,
                         schedule=self.schedule)


def completion_text(completion) -> str:
    """A completion as text: TRL gives a str, or a list of messages for chat prompts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m["content"] if isinstance(m.get("content"), str) else ""
                       for m in completion if m.get("role", "assistant") == "assistant")
    raise ValueError(f"completion must be a str or a list of messages, got {type(completion)}")


def wrong_answers_per_rollout(completions: Sequence[str], rewards: Sequence[float],
                              gold_answers: Sequence[str | None], num_generations: int, *,
                              options: CEPOOptions, rng=None) -> list[str | None]:
    """Per rollout, its group's wrong answer r- (None: no candidate, the RLSD fallback).

    completions / rewards / gold_answers: one entry per rollout, groups of
    ``num_generations`` consecutive rollouts (the gold answer is read from each group's
    first rollout). A rollout is a candidate when its reward is finite and below
    ``options.correct_threshold`` and its extracted answer differs from the gold one.
    """
    n = len(completions)
    if not n == len(rewards) == len(gold_answers) or n % num_generations:
        raise ValueError(f"wrong_answers_per_rollout: {n} completions, {len(rewards)} rewards, "
                         f"{len(gold_answers)} gold answers for groups of {num_generations}")
    groups, golds = [], []
    for start in range(0, n, num_generations):
        group = []
        for i in range(start, start + num_generations):
            reward = float(rewards[i])
            ok = math.isfinite(reward)
            group.append({"answer": options.answer_extractor(completions[i]) if ok else None,
                          "reward": reward if ok else 0.0,
                          "correct": (not ok) or reward >= options.correct_threshold})
        groups.append(group)
        golds.append(None if gold_answers[start] is None else str(gold_answers[start]))
    chosen = choose_wrong_answers(groups, options.wrong_answer_strategy, rng, gold_answers=golds)
    return [w for w in chosen for _ in range(num_generations)]


def hinted_trl_prompt(prompt, hint: str, hint_template: str):
    """A TRL prompt with the hint appended to its last user message (chat prompts) or to
    the text (standard prompts), exactly as cepo.contexts.hinted_prompt writes it."""
    if isinstance(prompt, str):
        return hinted_prompt(prompt, hint, hint_template)
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"prompt must be a str or a non-empty list of messages, got {prompt!r}")
    messages = copy.deepcopy(prompt)
    for message in reversed(messages):
        if message.get("role") == "user":
            if not isinstance(message.get("content"), str):
                raise ValueError("CEPO hints need text user messages; multimodal content "
                                 "(a list of parts) is not supported by the TRL adapter")
            message["content"] = hinted_prompt(message["content"], hint, hint_template)
            return messages
    raise ValueError("CEPO hints go into the last user message, and this prompt has none")


def _left_padded(contexts: Sequence[Sequence[int]], completion_ids: torch.Tensor,
                 completion_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P + T] ids and attention mask: contexts left-padded to P, then the completions."""
    width = max(len(c) for c in contexts)
    device = completion_ids.device
    ids = torch.full((len(contexts), width), pad_id, dtype=completion_ids.dtype, device=device)
    mask = torch.zeros((len(contexts), width), dtype=completion_mask.dtype, device=device)
    for i, c in enumerate(contexts):
        if len(c):
            ids[i, width - len(c):] = torch.as_tensor(list(c), dtype=ids.dtype, device=device)
            mask[i, width - len(c):] = 1
    return torch.cat([ids, completion_ids], 1), torch.cat([mask, completion_mask], 1)


@torch.no_grad()
def token_advantages(run, *, policy_contexts: Sequence[Sequence[int]],
                     pos_contexts: Sequence[Sequence[int]],
                     neg_contexts: Sequence[Sequence[int] | None],
                     completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     advantages: torch.Tensor, lam: float, eps_w: float, temperature: float,
                     pad_id: int, batch_size: int, backend: str | None = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """CEPO token advantages [B, T] for a batch of B rollouts (docs/algorithm.md steps 2-5).

    run(input_ids, attention_mask, fn) -> fn(hidden [rows, S, H], lm_head), computed in the
    model's forward (cepo.integrations.head.run_head). *_contexts: per rollout, the prompt
    token ids of the policy, correct-answer and wrong-answer contexts (neg None: the
    group's RLSD fallback). completion_ids / completion_mask [B, T]: the sampled responses,
    right-padded. advantages [B]: the sequence advantages A. Rows with A = 0 keep 0 and
    get no teacher pass; elsewhere masked tokens get A ((1 - lam) + lam w_t) and padding
    keeps A. The three contexts of ``batch_size`` rollouts run as one forward (3 x
    batch_size left-padded rows) and one contrastive_evidence call.
    Returns (token advantages [B, T] float32, metrics).
    """
    adv = advantages.float()
    out = adv[:, None].expand_as(completion_ids).clone()
    rows = [i for i in range(len(adv)) if adv[i].item() != 0.0]
    metrics = {"cepo/frac_with_wrong_answer": sum(n is not None for n in neg_contexts)
               / max(len(neg_contexts), 1)}
    if not rows or lam == 0.0:
        return out, metrics
    clipped, delta_abs, count = 0.0, 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        sel = torch.tensor(chunk, device=completion_ids.device)
        cids, cmask = completion_ids[sel], completion_mask[sel]
        keep = cmask.bool()
        contexts = ([policy_contexts[i] for i in chunk] + [pos_contexts[i] for i in chunk]
                    + [neg_contexts[i] if neg_contexts[i] is not None else pos_contexts[i]
                       for i in chunk])
        ids, attn = _left_padded(contexts, cids.repeat(3, 1), cmask.repeat(3, 1), pad_id)
        targets = cids[keep].long()
        a_tok = adv[sel][:, None].expand_as(cmask)[keep].contiguous()
        has_neg = torch.tensor([neg_contexts[i] is not None for i in chunk], device=cids.device)
        neg_tok = has_neg[:, None].expand_as(cmask)[keep].contiguous()
        flat_keep = keep.reshape(-1)

        def evidence(hidden, head, _n=cids.shape[1]):
            h, weight = completion_rows(hidden, head, _n)
            h = h.view(3, -1, h.shape[-1])
            with no_autocast(h.device):
                return ck.contrastive_evidence(
                    h[0][flat_keep], h[1][flat_keep], h[2][flat_keep], weight, targets, a_tok,
                    neg_tok, lam=float(lam), eps_w=float(eps_w), temperature=temperature,
                    backend=backend)

        ev = run(ids, attn, evidence)
        block = out[sel]
        block[keep] = ev.token_advantages.float()
        out[sel] = block
        clipped += float(ev.clipped.float().sum())
        delta_abs += float(ev.delta.abs().sum())
        count += int(keep.sum())
    metrics["cepo/weight_clip_frac"] = clipped / max(count, 1)
    metrics["cepo/delta_abs_mean"] = delta_abs / max(count, 1)
    return out, metrics
