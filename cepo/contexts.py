"""Teacher contexts: the same response scored after the prompt alone (policy), after the
correct answer as a hint (teacher +), and after a wrong answer taken from a rejected
rollout of the same group (teacher -). No extra sampling is needed for r-.

The hint goes into the user message: ``prompt + "\\n\\n" + hint_template.format(answer=a)``.
The same template frames the correct and the wrong answer, so the model is never told
which one it sees.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Mapping, Sequence

import torch

ANSWER_ONLY_TEMPLATE = "{answer}"
"""Default: the answer alone, as the reference code does."""

NATURAL_HINT_TEMPLATE = "A reference final answer is {answer}."
"""Natural-language option (the text ``cepo.sweep`` runs). Neutral on purpose: it frames
the wrong answer too."""

HINT_SEPARATOR = "\n\n"

STRATEGIES = ("worst", "most_frequent", "random")


def check_hint_template(hint_template: str) -> None:
    """Raise ValueError unless ``hint_template`` formats with ``answer`` and shows it."""
    try:
        probe = hint_template.format(answer="\x00")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"hint_template {hint_template!r} must be a str.format template "
                         f"with only the field {{answer}} (write literal braces as {{{{ }}}}): "
                         f"{e!r}") from None
    if "\x00" not in probe:
        raise ValueError(f"hint_template {hint_template!r} must contain {{answer}}")


def hinted_prompt(prompt: str, hint: str | None, hint_template: str = ANSWER_ONLY_TEMPLATE) -> str:
    """The user message of a context: the prompt, plus the formatted hint when given."""
    if hint is None:
        return prompt
    check_hint_template(hint_template)
    return prompt + HINT_SEPARATOR + hint_template.format(answer=hint)


def _encode_plain(tokenizer, text: str) -> list[int]:
    """``text`` as ids with the tokenizer's leading special token (BOS) if it adds one,
    but never a trailing one (an EOS after a prompt would end the response at once)."""
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids[:1] != [bos]:
        with_special = list(tokenizer(text, add_special_tokens=True).input_ids)
        if with_special[:1] == [bos]:
            ids = [bos] + ids
    return ids


def render_prompt(tokenizer, prompt: str, hint: str | None = None,
                  hint_template: str = ANSWER_ONLY_TEMPLATE, *, system_prompt: str | None = None,
                  chat_template: bool = True) -> list[int]:
    """Token ids of one context, ready for the response tokens to follow.

    With a chat template (and ``chat_template``): ``apply_chat_template(messages,
    add_generation_prompt=True)`` where messages are an optional system message
    (``system_prompt``) and ``{"role": "user", "content": c}``; the template is tokenised
    without adding special tokens, so a BOS it writes appears once. Otherwise: the system
    prompt and ``c`` joined by a blank line, then ``"\\n"``, with the tokenizer's BOS if
    it adds one and no EOS. ``c`` is ``hinted_prompt(...)``.
    """
    content = hinted_prompt(prompt, hint, hint_template)
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and ids[:2] == [bos, bos]:
            ids = ids[1:]
        return ids
    if system_prompt is not None:
        content = system_prompt + HINT_SEPARATOR + content
    return _encode_plain(tokenizer, content + "\n")


def normalise_answer(answer: str) -> str:
    """Light normalisation for comparing answers: strip and drop all whitespace."""
    return "".join(answer.split())


def _pick(candidates: list, rng) -> object:
    if isinstance(rng, torch.Generator):
        return candidates[int(torch.randint(len(candidates), (1,), generator=rng))]
    if rng is None:
        raise ValueError("choose_wrong_answers: strategy 'random' needs rng "
                         "(a random.Random or a torch.Generator)")
    return rng.choice(candidates)


def choose_wrong_answers(groups: Sequence[Sequence[Mapping]], strategy: str,
                         rng: random.Random | torch.Generator | None = None, *,
                         gold_answers: Sequence[str | None] | None = None) -> list[str | None]:
    """Per group, the wrong answer r- used as the wrong-teacher hint, or None.

    groups: one entry per prompt, each its rollouts in sampling order, each a mapping
    with ``answer`` (the extracted ``\\boxed{}`` content, or None), ``reward`` (float)
    and ``correct`` (bool). Candidates are the rejected rollouts (correct False) whose
    answer is non-empty after stripping; with ``gold_answers`` (one per group),
    candidates equal to the gold answer after ``normalise_answer`` are skipped too (a
    rollout can be rejected for its format or a verifier timeout while its answer is
    right; as r- it would cancel r+). Strategies:
      worst:         the candidate with the lowest reward, as the reference code does;
                     ties go to the first in sampling order;
      most_frequent: the most common candidate answer after ``normalise_answer``; ties go
                     to the answer seen first; returned as first written;
      random:        uniform over candidates (with repetition: a frequent wrong answer is
                     likelier), drawn from ``rng`` (random.Random or torch.Generator), so
                     a seeded rng reproduces the choices.
    A None entry (no candidate: all correct, or no wrong rollout has an answer) tells the
    caller to use the RLSD fallback for that group (has_negative False).
    """
    picked = choose_wrong_rollouts(groups, strategy, rng, gold_answers=gold_answers)
    return [None if i is None else str(groups[g][i]["answer"]).strip()
            for g, i in enumerate(picked)]


def choose_wrong_rollouts(groups: Sequence[Sequence[Mapping]], strategy: str,
                          rng: random.Random | torch.Generator | None = None, *,
                          gold_answers: Sequence[str | None] | None = None) -> list[int | None]:
    """Per group, the index (in sampling order, within the group) of the rejected rollout
    whose answer ``choose_wrong_answers`` returns, or None: same candidates, strategies
    and random draws. A chain-of-thought hint (``cepo.hints``) takes that rollout's tokens.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"wrong_answer_strategy must be one of {STRATEGIES}, got {strategy!r}")
    if gold_answers is not None and len(gold_answers) != len(groups):
        raise ValueError(f"choose_wrong_answers: {len(gold_answers)} gold_answers for "
                         f"{len(groups)} groups")
    chosen: list[int | None] = []
    for g, group in enumerate(groups):
        gold = None
        if gold_answers is not None and gold_answers[g] is not None:
            gold = normalise_answer(str(gold_answers[g]))
        candidates = []  # (answer, reward, index in the group)
        for i, r in enumerate(group):
            try:
                answer, correct, reward = r["answer"], r["correct"], r["reward"]
            except KeyError as e:
                raise ValueError(f"choose_wrong_answers: group {g} rollout {i} lacks {e}; each "
                                 f"rollout needs 'answer', 'reward' and 'correct'") from None
            if correct or answer is None or not str(answer).strip():
                continue
            if gold is not None and normalise_answer(str(answer)) == gold:
                continue
            candidates.append((str(answer).strip(), float(reward), i))
        if not candidates:
            chosen.append(None)
        elif strategy == "worst":
            chosen.append(min(candidates, key=lambda c: c[1])[2])  # min keeps the first of ties
        elif strategy == "most_frequent":
            counts = Counter(normalise_answer(a) for a, _, _ in candidates)
            best = max(counts.values())
            chosen.append(next(i for a, _, i in candidates if counts[normalise_answer(a)] == best))
        else:
            chosen.append(_pick(candidates, rng)[2])
    return chosen


def build_contexts(tokenizer, prompts: Sequence[str], answers: Sequence[str],
                   wrong_answers: Sequence[str | None],
                   hint_template: str = ANSWER_ONLY_TEMPLATE, *, system_prompt: str | None = None,
                   chat_template: bool = True
                   ) -> tuple[list[list[int]], list[list[int]], list[list[int] | None]]:
    """The three contexts of each group, as token ids: (policy_ids, pos_ids, neg_ids).

    policy: the prompt alone (what the sampler saw); pos: prompt + hint r+ (the dataset
    answer); neg: prompt + hint r- (``choose_wrong_answers``), None where the group has
    no wrong answer (the RLSD fallback ignores it; a caller needing a tensor substitutes
    the policy context). The trainer appends each rollout's response ids to them.
    ``system_prompt`` / ``chat_template``: as in ``render_prompt``, the same for all three.
    """
    if not len(prompts) == len(answers) == len(wrong_answers):
        raise ValueError(f"build_contexts: prompts, answers and wrong_answers must have one "
                         f"entry per group, got {len(prompts)}, {len(answers)} and "
                         f"{len(wrong_answers)}")
    check_hint_template(hint_template)
    fmt = dict(system_prompt=system_prompt, chat_template=chat_template)
    policy = [render_prompt(tokenizer, p, **fmt) for p in prompts]
    pos = [render_prompt(tokenizer, p, str(a), hint_template, **fmt)
           for p, a in zip(prompts, answers)]
    neg = [render_prompt(tokenizer, p, w, hint_template, **fmt) if w is not None else None
           for p, w in zip(prompts, wrong_answers)]
    return policy, pos, neg
