"""What the teachers read: the hints of docs/algorithm.md step 2, per group.

``--hint_source answer`` (the default) hints the gold answer r+ and the wrong rollout's
extracted answer r-. ``cot_prefix`` / ``cot_suffix`` hint chain-of-thought instead, as the
CEPO reference code's CoT teacher does: the first / last ``hint_tokens`` generated tokens

- of the group's *best correct* rollout for the correct-answer teacher: the correct
  rollout (``correct`` True) with the highest reward, the first in sampling order on ties
  (the reference's ``max`` over scores). A group with no correct rollout falls back to the
  gold answer string;
- of the group's *wrong* rollout for the wrong-answer teacher: the rollout whose answer
  ``choose_wrong_rollouts`` picks (``wrong_answer_strategy``; the default ``worst`` is the
  reference's lowest reward, first on ties). A group without one has no r- (RLSD
  fallback), exactly as with answer hints.

The tokens are the sampled ones without the stop token (``Rollout.response_ids`` minus
its last id when the response stopped); they are decoded with ``skip_special_tokens`` and
the text goes into the same ``hint_template`` as an answer hint, inside the user message
(the reference splices the raw ids after the rendered prompt instead; cepo keeps one way
of building a context). A decoded hint that is empty after stripping falls back to the
answer string (gold for r+, the extracted wrong answer for r-).

Every rollout of a group reads the same hints, including the rollout they were taken
from: its first (or last) k tokens are then copied from its own context, so its teacher
log-probs there are high. The reference does the same (no exclusion); with the token
weights clipped to [1 - eps_w, 1 + eps_w] the effect on that rollout is bounded.
"""

from __future__ import annotations

from typing import Callable, Sequence

HINT_SOURCES = ("answer", "cot_prefix", "cot_suffix")


def best_correct_rollout(rewards: Sequence[float], correct: Sequence[bool]) -> int | None:
    """Index of the correct rollout with the highest reward (first on ties), or None."""
    best = None
    for i, (r, ok) in enumerate(zip(rewards, correct)):
        if ok and (best is None or float(r) > float(rewards[best])):
            best = i
    return best


def hint_token_ids(ids: Sequence[int], source: str, k: int) -> list[int]:
    """The first (cot_prefix) or last (cot_suffix) ``k`` of ``ids`` (all of them if fewer)."""
    if k < 1:
        raise ValueError(f"hint_tokens must be >= 1, got {k}")
    if source == "cot_prefix":
        return list(ids[:k])
    if source == "cot_suffix":
        return list(ids[max(0, len(ids) - k):])
    raise ValueError(f"hint_source must be cot_prefix or cot_suffix here, got {source!r}")


def generated_ids(response_ids: Sequence[int], truncated: bool) -> list[int]:
    """The sampled tokens of a rollout as trained, without the stop token a stopped
    response ends with (``Completion.trained_ids``)."""
    return list(response_ids if truncated else response_ids[:-1])


def teacher_hints(groups, *, source: str, k: int,
                  decode: Callable[[list[int]], str]) -> tuple[list[str], list[str | None]]:
    """(correct-teacher hints, wrong-teacher hints), one per group of ``groups``
    (``cepo.rollout.Groups``), for ``cepo.rollout.train_items``.

    decode: token ids -> text (``lambda ids: tokenizer.decode(ids, skip_special_tokens=True)``).
    source answer: the gold answers and ``groups.wrong_answers`` (today's contexts).
    """
    if source not in HINT_SOURCES:
        raise ValueError(f"hint_source must be one of {HINT_SOURCES}, got {source!r}")
    gold = [str(e.answer) for e in groups.examples]
    if source == "answer":
        return gold, list(groups.wrong_answers)
    size = len(groups.rollouts) // max(1, len(groups.examples))
    wrong_index = groups.wrong_rollouts or [None] * len(groups.examples)

    def text(rollout, fallback):
        hint = decode(hint_token_ids(generated_ids(rollout.response_ids, rollout.truncated),
                                     source, k))
        return hint if hint.strip() else fallback

    pos, neg = [], []
    for g in range(len(groups.examples)):
        members = groups.rollouts[g * size:(g + 1) * size]
        best = best_correct_rollout([r.reward for r in members], [r.correct for r in members])
        pos.append(gold[g] if best is None else text(members[best], gold[g]))
        w, answer = wrong_index[g], groups.wrong_answers[g]
        neg.append(None if w is None or answer is None else text(members[w], answer))
    return pos, neg
