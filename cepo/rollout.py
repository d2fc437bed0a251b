"""Rollouts of one step: sampling, scoring, group advantages and teacher hints.

DESIGN.md steps 1-2, per rank: each rank owns whole groups (a prompt and its G
responses), so group statistics never cross ranks.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace

import torch

from cepo.algorithms import group_advantages
from cepo.answers import extract_boxed
from cepo.contexts import choose_wrong_answers, render_prompt
from cepo.data import Example
from cepo.sampler import SamplingParams


@dataclass
class Rollout:
    """One sampled response and everything the update needs about it."""

    group: int
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    reward: float
    correct: bool
    status: str
    truncated: bool
    advantage: float = 0.0
    sampler_logprobs: list[float] | None = None


@dataclass
class Groups:
    """The rollouts of a rank's prompts, grouped, with their advantages and hints."""

    examples: list[Example]
    rollouts: list[Rollout]          # group-major: group g holds rollouts [g*G, (g+1)*G)
    wrong_answers: list[str | None]  # per group: the wrong-answer hint, or None (RLSD fallback)
    generate_seconds: float = 0.0
    score_seconds: float = 0.0


def response_ids_with_eos(token_ids: list[int], finish_reason: str, eos_id: int | None) -> list[int]:
    """The response as trained on: a response that stopped ends with EOS (the model must
    learn to stop); a truncated one does not."""
    ids = list(token_ids)
    if finish_reason == "stop" and eos_id is not None and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
    return ids


def sample_groups(examples: list[Example], seeds: list[int], *, tokenizer, sampler, verifier,
                  group_size: int, params: SamplingParams, std_normalize: bool,
                  wrong_answer_strategy: str, find_wrong_answers: bool) -> Groups:
    """Generate G responses per prompt, score them, compute A_i, pick the wrong hints.

    Each prompt's group is sampled with its own seed (``seeds``, derived from the prompt's
    global position in the step), so the rollouts, and hence the whole update, do not
    depend on how prompts are divided among ranks.
    """
    t0 = time.perf_counter()
    prompt_ids = [render_prompt(tokenizer, ex.prompt) for ex in examples]
    completions = [sampler.generate([ids], group_size, replace(params, seed=seed))[0]
                   for ids, seed in zip(prompt_ids, seeds)]
    texts = [c.text for group in completions for c in group]
    answers = [ex.answer for ex in examples for _ in range(group_size)]
    t1 = time.perf_counter()
    scores = verifier.score(texts, answers) if texts else []
    t2 = time.perf_counter()
    eos = tokenizer.eos_token_id
    rollouts = []
    for g, group in enumerate(completions):
        for c in group:
            s = scores[len(rollouts)]
            rollouts.append(Rollout(
                group=g, prompt_ids=prompt_ids[g],
                response_ids=response_ids_with_eos(c.token_ids, c.finish_reason, eos),
                text=c.text, reward=float(s.reward), correct=bool(s.correct), status=s.status,
                truncated=c.finish_reason == "length", sampler_logprobs=c.logprobs))
    if examples:
        rewards = torch.tensor([r.reward for r in rollouts]).view(len(examples), group_size)
        adv = group_advantages(rewards, std_normalize=std_normalize).flatten().tolist()
        for r, a in zip(rollouts, adv):
            r.advantage = a
    wrong = [None] * len(examples)
    if find_wrong_answers and examples:
        groups = [[{"answer": extract_boxed(r.text), "reward": r.reward, "correct": r.correct}
                   for r in rollouts[g * group_size:(g + 1) * group_size]]
                  for g in range(len(examples))]
        wrong = [choose_wrong_answers([group], wrong_answer_strategy, random.Random(seed))[0]
                 for group, seed in zip(groups, seeds)]
    return Groups(examples, rollouts, wrong, generate_seconds=t1 - t0, score_seconds=t2 - t1)


@dataclass
class TrainItem:
    """One rollout that carries signal (A != 0), with its three contexts, ready to train."""

    policy_ids: list[int]
    pos_ids: list[int] | None     # correct-answer teacher context (None: no teacher pass)
    neg_ids: list[int] | None     # wrong-answer teacher context (None: RLSD fallback)
    response_ids: list[int]
    advantage: float
    correct: bool
    sampler_logprobs: list[float] | None = None  # the sampler's, when asked (sync check)


def train_items(groups: Groups, *, tokenizer, with_teachers: bool, algo: str,
                hint_template: str) -> list[TrainItem]:
    """The rollouts with A != 0 and a non-empty response; the rest carry no gradient and
    skip every later pass (teacher contexts included)."""
    from cepo.contexts import build_contexts

    keep = [r for r in groups.rollouts if r.advantage != 0.0 and r.response_ids]
    pos = neg = None
    if with_teachers and keep:
        wrong = groups.wrong_answers if algo == "cepo" else [None] * len(groups.examples)
        _, pos, neg = build_contexts(tokenizer, [e.prompt for e in groups.examples],
                                     [e.answer for e in groups.examples], wrong, hint_template)
    return [TrainItem(r.prompt_ids, pos[r.group] if pos else None, neg[r.group] if neg else None,
                      r.response_ids, r.advantage, r.correct, r.sampler_logprobs)
            for r in keep]


def balance_items(items: list[TrainItem], rank: int, world_size: int) -> list[TrainItem]:
    """Redistribute the train items of all ranks so each rank gets about the same number
    of tokens (context + response). Collective; a no-op for a world of one. The result
    does not depend on which rank sampled what, so the update equals a 1-process one."""
    if world_size == 1:
        return items
    import torch.distributed as dist

    from cepo.packing import balance_across_ranks

    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, items)
    everything = [item for part in gathered for item in part]
    lengths = [len(i.policy_ids) + len(i.response_ids) for i in everything]
    return [everything[k] for k in balance_across_ranks(lengths, world_size)[rank]]
