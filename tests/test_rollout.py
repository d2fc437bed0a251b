"""sample_groups: one sampler call per step with per-prompt seeds, the emitted stop token
trained, group advantages, and wrong-answer hints from the verifier's own extraction."""

import pytest
from scripted_rollouts import ScriptedSampler, ScriptedVerifier

from cepo.data import Example
from cepo.rollout import sample_groups
from cepo.sampler import SamplingParams
from cepo.sampler.base import Completion
from cepo.verifier import Score


def completion(text, ids, stop=None):
    return Completion(prompt_index=0, token_ids=ids, text=text,
                      finish_reason="stop" if stop is not None else "length",
                      logprobs=[-0.5] * (len(ids) + (stop is not None)), stop_token_id=stop)


def test_one_call_stop_tokens_advantages_and_hints():
    script = [[completion("right", [5, 6], stop=2), completion("junk", [7], stop=0),
               completion("eleven", [8, 9, 10]), completion("gold-but-late", [3], stop=2)],
              [completion("a", [4], stop=2)] * 4]
    verdicts = {"right": (1.0, True, "ok", "12"),
                "junk": (0.0, False, "too_complex", "9^9^9^9"),  # refused: never a hint
                "eleven": (0.0, False, "wrong", "11"),
                "gold-but-late": (0.0, False, "timeout", "12"),  # right answer, scored 0
                "a": (1.0, True, "ok", "3")}
    sampler = ScriptedSampler(script)
    groups = sample_groups([Example("p0", "12", "s"), Example("p1", "3", "s")], [[1, 2], [1, 3]],
                           [101, 202], sampler=sampler, verifier=ScriptedVerifier(verdicts),
                           group_size=4, params=SamplingParams(max_new_tokens=3),
                           std_normalize=True, wrong_answer_strategy="worst",
                           find_wrong_answers=True)
    assert len(sampler.calls) == 1 and sampler.calls[0][1:] == (4, [101, 202])
    r = groups.rollouts
    assert r[0].response_ids == [5, 6, 2] and r[1].response_ids == [7, 0]  # the emitted stop
    assert r[2].response_ids == [8, 9, 10] and r[2].truncated  # cut by length: no stop token
    assert [x.extracted for x in r[:4]] == ["12", "9^9^9^9", "11", "12"]
    assert r[0].advantage > 0 > r[2].advantage and all(x.advantage == 0 for x in r[4:])
    # the wrong hint: not the refused one, not the gold answer, the worst remaining rollout
    assert groups.wrong_answers == ["11", None]


@pytest.mark.parametrize("find", [False, True])
def test_no_prompts_no_call(find):
    sampler = ScriptedSampler([])
    groups = sample_groups([], [], [], sampler=sampler, verifier=ScriptedVerifier({}), group_size=2,
                           params=SamplingParams(), std_normalize=True,
                           wrong_answer_strategy="worst", find_wrong_answers=find)
    assert sampler.calls == [] and groups.rollouts == [] and groups.wrong_answers == []


def test_scoring_overlaps_generation_and_keeps_group_order():
    """A group reported done is scored while the sampler is still generating (the
    verifier runs before generate returns), and scores land on their own group."""
    import threading

    started = threading.Event()
    texts = [f"t{p}-{j}" for p in range(3) for j in range(2)]

    class SlowSampler:
        def generate(self, prompt_token_ids, n, params, seeds=None, on_prompt_done=None):
            out = [[completion(f"t{p}-{j}", [4 + p], stop=2) for j in range(n)]
                   for p in range(len(prompt_token_ids))]
            for p in (2, 0, 1):  # done out of order
                on_prompt_done(p, out[p])
                if p == 2:  # "generating" the rest: the verifier must already be at work
                    assert started.wait(timeout=30), "group 2 was not scored during generation"
            return out

    class Verifier:
        def __init__(self):
            self.calls = []

        def score(self, batch, answers):
            self.calls.append((list(batch), list(answers)))
            started.set()
            return [Score(1.0 if t.endswith("-0") else 0.0, t.endswith("-0"), "ok", t)
                    for t in batch]

    verifier = Verifier()
    examples = [Example(f"p{p}", f"gold{p}", "s") for p in range(3)]
    groups = sample_groups(examples, [[1, p + 3] for p in range(3)], [1, 2, 3],
                           sampler=SlowSampler(), verifier=verifier, group_size=2,
                           params=SamplingParams(max_new_tokens=3), std_normalize=True,
                           wrong_answer_strategy="worst", find_wrong_answers=True)
    assert verifier.calls[0] == (["t2-0", "t2-1"], ["gold2", "gold2"])  # one call per group
    assert sorted(c for call in verifier.calls for c in call[0]) == sorted(texts)
    assert [r.text for r in groups.rollouts] == texts
    assert [r.extracted for r in groups.rollouts] == texts
    assert [r.reward for r in groups.rollouts] == [1.0, 0.0] * 3
    assert groups.wrong_answers == ["t0-1", "t1-1", "t2-1"]


def test_without_overlap_every_group_is_scored_after_generation():
    events = []

    class Sampler:
        def generate(self, prompt_token_ids, n, params, seeds=None, on_prompt_done=None):
            assert on_prompt_done is None  # not asked to report groups early
            events.append("generated")
            return [[completion(f"t{p}", [4], stop=2)] * n for p in range(len(prompt_token_ids))]

    class Verifier:
        def score(self, texts, answers):
            events.append("scored")
            return [Score(1.0, True, "ok", t) for t in texts]

    groups = sample_groups([Example(f"p{p}", "1", "s") for p in range(2)], [[1], [2]], [1, 2],
                           sampler=Sampler(), verifier=Verifier(), group_size=2,
                           params=SamplingParams(max_new_tokens=3), std_normalize=True,
                           wrong_answer_strategy="worst", find_wrong_answers=False,
                           overlap_scoring=False)
    assert events == ["generated", "scored", "scored"]
    assert [r.text for r in groups.rollouts] == ["t0", "t0", "t1", "t1"]
