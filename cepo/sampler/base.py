"""The sampler interface: one small contract that the Hugging Face and vLLM engines share.

The trainer hands an engine token ids (already rendered through the chat template) and
gets token ids back, so tokenisation happens exactly once, in the trainer. Weights go
the other way as (Hugging Face parameter name, full tensor) pairs, the format both
``PreTrainedModel.state_dict()`` and vLLM's ``load_weights`` speak.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

FINISH_REASONS = ("stop", "length")


@dataclass
class SamplingParams:
    """How to sample.

    temperature: 0 means greedy decoding (top_p / top_k / seed are then irrelevant).
    top_p: nucleus sampling mass in (0, 1]; 1 is off. top_k: 0 is off.
    max_new_tokens: the response budget; a response that reaches it without EOS
    finishes with reason "length". seed: used only when ``generate`` gets no per-prompt
    ``seeds``: the same seed reproduces the same samples for the same call (same prompts
    in the same order, n and engine settings); None draws from the engine's own random
    state. return_logprobs: fill ``Completion.logprobs``.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int | None = None
    return_logprobs: bool = False

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, "
                             f"got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax (temperature 0)."""
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled response.

    prompt_index: position of its prompt in the ``generate`` call.
    token_ids: the response tokens, without the prompt, cut before the first stop token
    (the stop token itself is not included; it is ``stop_token_id``).
    text: ``token_ids`` decoded with ``skip_special_tokens=True``.
    finish_reason: "stop" (a stop token was produced) or "length" (max_new_tokens
    reached without one; then ``len(token_ids) == max_new_tokens``).
    stop_token_id: the stop token the engine actually emitted (one of the engine's
    ``stop_ids``: the tokenizer's EOS or another EOS id of the generation config) when
    finish_reason is "stop"; None for "length". The response as trained is
    ``token_ids + [stop_token_id]`` for "stop", ``token_ids`` for "length"
    (``trained_ids``).
    logprobs: when asked, one float per token of the response as trained:
    ``len(logprobs) == len(token_ids) + (finish_reason == "stop")``, the last one being
    the stop token's. Each is the log-probability of the sampled token under the
    distribution it was actually drawn from, i.e.
    ``log_softmax(logits / temperature)`` after top-k / top-p truncation (renormalised
    over the kept tokens; vLLM's ``logprobs_mode="processed_logprobs"``). With
    top_p = 1 and top_k = 0 this is exactly ``log_softmax(logits / T)[token]``, what the
    trainer's kernels recompute. Greedy decoding reports ``log_softmax(logits)``.
    Always <= 0. None when not asked.
    """

    prompt_index: int
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    stop_token_id: int | None = None

    @property
    def trained_ids(self) -> list[int]:
        """The response as trained: ``token_ids`` plus the emitted stop token for "stop"."""
        return self.token_ids + ([self.stop_token_id] if self.stop_token_id is not None else [])


PromptDone = Callable[[int, list[Completion]], None]
"""``on_prompt_done(prompt_index, completions)``: see ``Sampler.generate``."""


class Sampler(abc.ABC):
    """Generates responses and receives new weights from the trainer.

    Usable as a context manager (``close`` on exit). ``check_sampler_conformance`` in
    ``cepo.sampler.conformance`` is the executable form of this contract.
    """

    @abc.abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], n: int, params: SamplingParams,
                 seeds: list[int] | None = None,
                 on_prompt_done: PromptDone | None = None) -> list[list[Completion]]:
        """Sample ``n`` completions for each prompt (token ids, no padding).

        Returns one list per prompt, in prompt order, each holding ``n`` Completions.
        seeds: one int per prompt. Prompt p's samples then depend only on its token ids,
        ``seeds[p]``, n, params and the weights: not on the other prompts of the call,
        their order or how the engine batches rows (so one call per training step gives
        rank-invariant, resumable rollouts). ``params.seed`` is then unused. Without
        seeds, ``params.seed`` seeds the whole call (see ``SamplingParams``).
        on_prompt_done(p, completions): called exactly once per prompt, with the very
        list returned for it, as soon as its n completions exist (while later prompts
        may still be generating), so the caller can start scoring them; an engine that
        returns everything at once calls it for every prompt before returning.
        """

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (unsharded) tensors, given by Hugging Face parameter name.

        Names not given keep their current values (a partial update, e.g. one bucket of
        a streamed sync). An unknown name raises ValueError naming it.
        """

    def close(self) -> None:
        """Release the engine's resources (model copy, KV cache). Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_generate_args(prompt_token_ids, n: int, seeds) -> None:
    """The ValueError for bad ``generate`` arguments, naming the field and the fix."""
    if n < 1:
        raise ValueError(f"generate: n must be >= 1, got {n}")
    for i, ids in enumerate(prompt_token_ids):
        if len(ids) == 0:
            raise ValueError(f"generate: prompt_token_ids[{i}] is empty; render the prompt "
                             f"(cepo.contexts.render_prompt) before sampling")
    if seeds is not None:
        if len(seeds) != len(prompt_token_ids):
            raise ValueError(f"generate: seeds must hold one int per prompt, got {len(seeds)} "
                             f"seeds for {len(prompt_token_ids)} prompts")
        bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int)]
        if bad:
            raise ValueError(f"generate: seeds must be Python ints, got {bad[:3]}")


def mix_seed(*values: int) -> int:
    """A 62-bit integer that is a pure function of ``values`` (any Python ints, negative
    or large): the per-request seed both engines derive from a prompt's seed, the same
    on every machine and Python version (blake2b, not ``hash``). 62 bits leave room for
    vLLM's ``seed + sample_index`` without overflowing int64."""
    data = b"".join(int(v).to_bytes(16, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2


def prompt_seeds(n_prompts: int, params: SamplingParams,
                 seeds: list[int] | None) -> list[int] | None:
    """Per-prompt seeds for a call: ``seeds`` as given; else derived from ``params.seed``
    and the prompt's position in the call; else None (the engine's own random state)."""
    if seeds is not None:
        return [int(s) for s in seeds]
    if params.seed is None:
        return None
    return [mix_seed(params.seed, p) for p in range(n_prompts)]


def as_id_list(value) -> list[int]:
    """A token id, a list of them, or None, as a list of ints."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def stop_token_ids(tokenizer_eos, generation_eos) -> list[int]:
    """The tokenizer's EOS first, then the generation config's other EOS ids (e.g. both
    <|im_end|> and <|endoftext|> for Qwen instruct models), without repeats."""
    stop = as_id_list(tokenizer_eos)
    return stop + [i for i in as_id_list(generation_eos) if i not in stop]


def weight_update_error(unknown: list[str], bad_shape: list[str], prefix: str = ""):
    """The ValueError for an update_weights call with unknown names or wrong shapes
    (None when there are neither); one message naming every problem."""
    problems = []
    if unknown:
        problems.append(f"unknown parameter names {unknown} (give Hugging Face names "
                        f"such as 'model.norm.weight', without wrapper prefixes like "
                        f"'module.' or '_orig_mod.')")
    if bad_shape:
        problems.append("; ".join(bad_shape))
    return ValueError("update_weights: " + prefix + "; ".join(problems)) if problems else None
