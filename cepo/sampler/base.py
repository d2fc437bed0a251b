"""The sampler interface: one small contract that the Hugging Face and vLLM engines share."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass
class SamplingParams:
    """How to sample. temperature 0 means greedy; top_k 0 means off; seed None: unseeded."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int | None = None
    return_logprobs: bool = False


@dataclass
class Completion:
    """One sampled response.

    token_ids: the response tokens, without the prompt and without anything after the
    first EOS (the EOS itself is not included). finish_reason: "stop" (EOS produced) or
    "length" (max_new_tokens reached). logprobs: per token, log-prob under the sampling
    distribution actually used (logits / temperature, before top-p/top-k), when asked.
    """

    prompt_index: int
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None


class Sampler(abc.ABC):
    """Generates responses and receives new weights from the trainer."""

    @abc.abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], n: int,
                 params: SamplingParams) -> list[list[Completion]]:
        """n completions per prompt: outer list per prompt, inner list of n samples."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full tensors given by Hugging Face parameter name."""

    def close(self) -> None:
        """Release the engine's resources."""
