"""Rollouts of one step: sampling, scoring, group advantages and teacher hints.

docs/algorithm.md steps 1-2, per rank: each rank owns whole groups (a prompt and its G
responses), so group statistics never cross ranks. All prompts of a step go to the
sampler in ONE call, each with its own seed, so a group's samples depend only on its
prompt's global position (rank-invariant, resumable) while the engine batches freely.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from cepo.algorithms import group_advantages
from cepo.contexts import choose_wrong_rollouts
from cepo.data import Example
from cepo.sampler import SamplingParams


@dataclass
class Rollout:
    """One sampled response and everything the update needs about it."""

    group: int
    prompt_ids: list[int]
    response_ids: list[int]          # as trained: the sampled tokens, then the stop token
                                     # the sampler emitted (Completion.trained_ids)
    text: str
    reward: float
    correct: bool
    status: str
    truncated: bool
    extracted: str | None = None     # the final answer the verifier extracted
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
    wrong_rollouts: list[int | None] = field(default_factory=list)
    # per group: the index (within the group) of the rollout wrong_answers[g] came from


def sample_groups(examples: list[Example], prompt_ids: list[list[int]], seeds: list[int], *,
                  sampler, verifier, group_size: int, params: SamplingParams,
                  std_normalize: bool, wrong_answer_strategy: str,
                  find_wrong_answers: bool, overlap_scoring: bool = True) -> Groups:
    """Generate G responses per prompt in one sampler call, score them, compute A_i and
    pick the wrong-answer hints.

    prompt_ids: the rendered prompts (``cepo.contexts.render_prompt``); seeds: one per
    prompt, derived from its global position in the step (``seeds[g]`` also seeds the
    random wrong-answer choice of group g). Examples carrying images (``ex.vision``,
    cepo.vision) send them to the sampler with their prompt (``images=``). A group is sent
    to the verifier (one background thread driving its worker processes) as soon as the
    sampler reports it done (``on_prompt_done``), so scoring overlaps the generation still
    under way; ``score_seconds`` is the wait for scores after generation ended. With
    ``overlap_scoring`` False every group is scored after generation instead: when the
    sampler computes on the same CPU cores as the verifier, overlapping only makes them
    compete (measured on 2 cores: a GRPO step 0.76 s without, 0.87 s with).
    """
    t0 = time.perf_counter()
    images = [getattr(ex, "vision", None) for ex in examples]
    extra = {"images": images} if any(im is not None for im in images) else {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cepo-score") as scoring:
        pending: dict[int, Future] = {}

        def score_group(p: int, group) -> None:  # while later prompts are still generating
            pending[p] = scoring.submit(verifier.score, [c.text for c in group],
                                        [examples[p].answer] * len(group))

        if overlap_scoring:
            extra["on_prompt_done"] = score_group
        completions = (sampler.generate(prompt_ids, group_size, params, seeds=seeds, **extra)
                       if examples else [])
        t1 = time.perf_counter()
        for p, group in enumerate(completions):  # an engine that did not call back
            if p not in pending:
                score_group(p, group)
        scores = [s for p in range(len(completions)) for s in pending[p].result()]
    t2 = time.perf_counter()
    rollouts = []
    for g, group in enumerate(completions):
        for c in group:
            s = scores[len(rollouts)]
            rollouts.append(Rollout(
                group=g, prompt_ids=prompt_ids[g], response_ids=c.trained_ids,
                text=c.text, reward=float(s.reward), correct=bool(s.correct), status=s.status,
                truncated=c.finish_reason == "length", extracted=s.extracted,
                sampler_logprobs=c.logprobs))
    if examples:
        rewards = torch.tensor([r.reward for r in rollouts]).view(len(examples), group_size)
        adv = group_advantages(rewards, std_normalize=std_normalize).flatten().tolist()
        for r, a in zip(rollouts, adv):
            r.advantage = a
    wrong: list[str | None] = [None] * len(examples)
    wrong_index: list[int | None] = [None] * len(examples)
    if find_wrong_answers and examples:
        refused = ("too_long", "too_complex")  # refused junk never becomes a hint
        per_group = [[{"answer": r.extracted if r.status not in refused else None,
                       "reward": r.reward, "correct": r.correct}
                      for r in rollouts[g * group_size:(g + 1) * group_size]]
                     for g in range(len(examples))]
        wrong_index = [choose_wrong_rollouts([group], wrong_answer_strategy, random.Random(seed),
                                             gold_answers=[ex.answer])[0]
                       for group, seed, ex in zip(per_group, seeds, examples)]
        wrong = [None if i is None else str(group[i]["answer"]).strip()
                 for group, i in zip(per_group, wrong_index)]
    return Groups(examples, rollouts, wrong, generate_seconds=t1 - t0, score_seconds=t2 - t1,
                  wrong_rollouts=wrong_index)


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
    teacher_ids: list[int] | None = None  # opsd / sdpo: the self-teacher's context (None: not
                                          # distilled); cepo.self_distill
    vision: object = None         # the prompt's cepo.vision.ImageInputs (multimodal), or None


def train_items(groups: Groups, *, build_contexts, with_teachers: bool,
                algo: str, hints: tuple[list[str], list[str | None]] | None = None
                ) -> list[TrainItem]:
    """The rollouts with A != 0 and a non-empty response; the rest carry no gradient and
    skip every later pass (teacher contexts included).

    build_contexts(prompts, answers, wrong_answers) -> (policy, pos, neg) token ids per
    group (``cepo.contexts.build_contexts`` with the run's prompt format bound).
    hints: (correct-teacher hints, wrong-teacher hints) per group (``cepo.hints``); None:
    the gold answers and ``groups.wrong_answers``.
    """
    keep = [r for r in groups.rollouts if r.advantage != 0.0 and r.response_ids]
    pos = neg = None
    if with_teachers and keep:
        pos_hints, neg_hints = (hints if hints is not None else
                                ([e.answer for e in groups.examples], groups.wrong_answers))
        wrong = neg_hints if algo == "cepo" else [None] * len(groups.examples)
        _, pos, neg = build_contexts([e.prompt for e in groups.examples], pos_hints, wrong)
    return [TrainItem(r.prompt_ids, pos[r.group] if pos else None, neg[r.group] if neg else None,
                      r.response_ids, r.advantage, r.correct, r.sampler_logprobs,
                      vision=getattr(groups.examples[r.group], "vision", None))
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
