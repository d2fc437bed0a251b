"""sample_groups: one sampler call per step with per-prompt seeds, the emitted stop token
trained, group advantages, and wrong-answer hints from the verifier's own extraction."""

from dataclasses import dataclass

import pytest

from cepo.data import Example
from cepo.rollout import sample_groups
from cepo.sampler import SamplingParams
from cepo.sampler.base import Completion


class RecordingSampler:
    """Returns scripted completions; records every generate call."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompt_token_ids, n, params, seeds=None):
        self.calls.append((prompt_token_ids, n, seeds))
        return [[self.script[p][j] for j in range(n)] for p in range(len(prompt_token_ids))]


@dataclass
class FakeScore:
    reward: float
    correct: bool
    status: str
    extracted: str | None


class FakeVerifier:
    def __init__(self, verdicts):
        self.verdicts = verdicts

    def score(self, texts, answers):
        return [FakeScore(*self.verdicts[t]) for t in texts]


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
    sampler = RecordingSampler(script)
    groups = sample_groups([Example("p0", "12", "s"), Example("p1", "3", "s")], [[1, 2], [1, 3]],
                           [101, 202], sampler=sampler, verifier=FakeVerifier(verdicts),
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
    sampler = RecordingSampler([])
    groups = sample_groups([], [], [], sampler=sampler, verifier=FakeVerifier({}), group_size=2,
                           params=SamplingParams(), std_normalize=True,
                           wrong_answer_strategy="worst", find_wrong_answers=find)
    assert sampler.calls == [] and groups.rollouts == [] and groups.wrong_answers == []
