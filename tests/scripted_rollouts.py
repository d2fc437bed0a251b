"""A scripted sampler and verifier for rollout tests: no model, every answer chosen by hand."""

from __future__ import annotations

from cepo.verifier import Score


class ScriptedSampler:
    """Returns ``script[p][:n]`` for prompt p and records every generate call. It reports
    the odd prompts through ``on_prompt_done`` (as an engine does while still generating)
    and leaves the even ones to the caller, so both paths of a caller run."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompt_token_ids, n, params, seeds=None, on_prompt_done=None):
        self.calls.append((prompt_token_ids, n, seeds))
        out = [[self.script[p][j] for j in range(n)] for p in range(len(prompt_token_ids))]
        if on_prompt_done is not None:
            for p in range(1, len(out), 2):
                on_prompt_done(p, out[p])
        return out


class ScriptedVerifier:
    """verdicts: response text -> (reward, correct, status, extracted)."""

    def __init__(self, verdicts):
        self.verdicts = verdicts

    def score(self, texts, answers):
        return [Score(*self.verdicts[t]) for t in texts]
