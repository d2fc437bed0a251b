"""Self-teachers for OPSD and SDPO: which rollouts are distilled, and the teacher's context.

Both methods score the student's own rollout twice with the SAME weights: once after the
prompt alone (the student, with gradient) and once after a prompt that carries privileged
information (the teacher, no gradient); the loss is a divergence between the two full
next-token distributions at every response position (docs/algorithm.md, "OPSD and SDPO").

- OPSD (Zhao et al., arXiv 2601.18734): the privileged information is the problem's
  reference solution, or its final answer when the data has no solution (a template may
  also ask for the answer alone). Every rollout is distilled, whatever its reward.
- SDPO (Hübotter et al., arXiv 2601.20802), scalar-reward setting: the feedback for a
  rollout is a *successful* rollout of the same group (the first one in sampling order
  that is not the rollout itself). A rollout without one (a group with no success, or
  the group's only success) gets no teacher and is not distilled.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from cepo.data import Example
from cepo.rollout import Groups, Rollout, TrainItem

THINKING = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


def privileged_solution(example: Example) -> str:
    """OPSD's privileged information: the reference solution when the row has one, else the
    final answer."""
    return example.solution if example.solution else example.answer


def opsd_teacher_message(example: Example, template: str) -> str:
    """The OPSD teacher's user message: ``template`` with {prompt}, {solution} (the
    reference solution, or the answer where the row has none) and {answer} (the answer)."""
    return template.format(prompt=example.prompt, solution=privileged_solution(example),
                           answer=example.answer)


def strip_thinking(text: str) -> str:
    """A demonstration without its <think>...</think> blocks (as the SDPO reference does)."""
    return THINKING.sub("", text)


def choose_demonstrations(correct: Sequence[bool], *,
                          failed_only: bool = False) -> list[int | None]:
    """SDPO: per rollout of ONE group (sampling order), the index of the rollout whose text
    is its demonstration, or None.

    The demonstration is the first successful rollout of the group other than the rollout
    itself, so a failed rollout learns from a success, a success learns from another
    success, and the only success of a group, like every rollout of a group without one,
    gets None (not distilled). ``failed_only``: successes get None too (only the failed
    rollouts are distilled)."""
    successes = [j for j, ok in enumerate(correct) if ok]
    return [None if failed_only and correct[i] else next((j for j in successes if j != i), None)
            for i in range(len(correct))]


def sdpo_teacher_message(example: Example, demonstration: str, template: str) -> str:
    """The SDPO teacher's user message: ``template`` with {prompt} and {demonstration}."""
    return template.format(prompt=example.prompt, demonstration=strip_thinking(demonstration))


def teacher_messages(groups: Groups, algo: str, *, group_size: int, opsd_template: str,
                     sdpo_template: str, sdpo_failed_only: bool = False) -> list[str | None]:
    """One teacher user message per rollout of ``groups`` (group-major), or None where that
    rollout is not distilled."""
    if algo == "opsd":
        return [opsd_teacher_message(groups.examples[r.group], opsd_template)
                for r in groups.rollouts]
    if algo != "sdpo":
        raise ValueError(f"teacher_messages: algo must be 'opsd' or 'sdpo', got {algo!r}")
    out: list[str | None] = []
    for g, example in enumerate(groups.examples):
        group = groups.rollouts[g * group_size:(g + 1) * group_size]
        for demo in choose_demonstrations([r.correct for r in group],
                                          failed_only=sdpo_failed_only):
            out.append(None if demo is None else
                       sdpo_teacher_message(example, group[demo].text, sdpo_template))
    return out


def distill_items(groups: Groups, *, algo: str, group_size: int, render: Callable[[str], list[int]],
                  opsd_template: str, sdpo_template: str, with_policy_gradient: bool,
                  sdpo_failed_only: bool = False) -> list[TrainItem]:
    """The rollouts an OPSD / SDPO step trains on, each with its teacher context
    (``TrainItem.teacher_ids``: the rendered teacher message, None when not distilled).

    A rollout is kept when its response is non-empty and it is distilled, or, with
    ``with_policy_gradient`` (distill_pg_coef > 0), when its advantage is non-zero.
    ``render(message)`` gives a context's token ids (``cepo.contexts.render_prompt`` with
    the run's system prompt and chat template), exactly as the student's prompt is rendered.
    """
    messages = teacher_messages(groups, algo, group_size=group_size, opsd_template=opsd_template,
                                sdpo_template=sdpo_template, sdpo_failed_only=sdpo_failed_only)
    items = []
    for r, message in zip(groups.rollouts, messages):
        if not r.response_ids:
            continue
        if message is None and not (with_policy_gradient and r.advantage != 0.0):
            continue
        items.append(_item(r, render(message) if message is not None else None))
    return items


def _item(r: Rollout, teacher_ids: list[int] | None) -> TrainItem:
    return TrainItem(r.prompt_ids, None, None, r.response_ids, r.advantage, r.correct,
                     r.sampler_logprobs, teacher_ids=teacher_ids)
