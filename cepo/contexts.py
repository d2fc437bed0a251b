"""Teacher contexts: the same response scored after the prompt alone, after the correct
answer as a hint, and after a wrong answer (from a rejected rollout of the group).

The hint goes into the user message: ``prompt + "\\n\\n" + hint_template.format(answer=a)``.
The same template frames the correct and the wrong answer, so the model is never told
which one it sees.
"""

from __future__ import annotations

import random
from collections import Counter

ANSWER_ONLY_TEMPLATE = "{answer}"
"""Default: the answer alone, as the reference code does."""

NATURAL_HINT_TEMPLATE = "A reference answer: {answer}."
"""Natural-language option; neutral, since it frames wrong answers too."""

STRATEGIES = ("worst", "most_frequent", "random")


def hinted_prompt(prompt: str, hint: str | None, hint_template: str = ANSWER_ONLY_TEMPLATE) -> str:
    """The user message of a context: the prompt, plus the formatted hint if any."""
    if hint is None:
        return prompt
    return prompt + "\n\n" + hint_template.format(answer=hint)


def render_prompt(tokenizer, prompt: str, hint: str | None = None,
                  hint_template: str = ANSWER_ONLY_TEMPLATE) -> list[int]:
    """Token ids of a context, through the tokenizer's chat template when it has one
    (plain ``content + "\\n"`` otherwise), ready for the response to follow."""
    content = hinted_prompt(prompt, hint, hint_template)
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                            add_generation_prompt=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)
    return list(tokenizer(content + "\n").input_ids)


def _normalise(answer: str) -> str:
    return "".join(answer.split())


def choose_wrong_answers(groups: list[list[dict]], strategy: str,
                         rng: random.Random) -> list[str | None]:
    """Per group, the wrong answer used as the wrong-teacher hint, or None.

    Each group is its rollouts in sampling order, each a dict with ``answer`` (the
    extracted \\boxed{} content or None), ``reward`` and ``correct``. Candidates are the
    rejected rollouts that have an answer. Strategies:
      worst:         the candidate with the lowest reward (ties: first sampled);
      most_frequent: the most common candidate answer after removing whitespace (ties:
                     first seen), returned as first written;
      random:        uniform over candidates, drawn from ``rng``.
    None (no candidate) means the caller applies the RLSD fallback for that group.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"wrong_answer_strategy must be one of {STRATEGIES}, got {strategy!r}")
    chosen: list[str | None] = []
    for group in groups:
        candidates = [r for r in group if not r["correct"] and r.get("answer")]
        if not candidates:
            chosen.append(None)
        elif strategy == "worst":
            chosen.append(min(candidates, key=lambda r: r["reward"])["answer"])  # min is stable
        elif strategy == "most_frequent":
            counts = Counter(_normalise(r["answer"]) for r in candidates)
            best = max(counts.values())
            chosen.append(next(r["answer"] for r in candidates
                               if counts[_normalise(r["answer"])] == best))
        else:
            chosen.append(rng.choice(candidates)["answer"])
    return chosen


def build_contexts(tokenizer, prompts: list[str], answers: list[str],
                   wrong_answers: list[str | None], hint_template: str = ANSWER_ONLY_TEMPLATE):
    """(policy_ids, pos_ids, neg_ids) per group; neg_ids[g] is None where there is no
    wrong answer (the RLSD fallback does not look at it)."""
    policy = [render_prompt(tokenizer, p) for p in prompts]
    pos = [render_prompt(tokenizer, p, a, hint_template) for p, a in zip(prompts, answers)]
    neg = [render_prompt(tokenizer, p, w, hint_template) if w is not None else None
           for p, w in zip(prompts, wrong_answers)]
    return policy, pos, neg
