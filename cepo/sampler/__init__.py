"""Samplers: the interface and its engines (Hugging Face generate; vLLM, optional).

``cepo.sampler.conformance.check_sampler_conformance`` is the contract's executable
form; every engine's tests run it.
"""

from cepo.sampler.base import FINISH_REASONS, Completion, Sampler, SamplingParams
from cepo.sampler.hf_engine import HFEngine

__all__ = ["FINISH_REASONS", "Completion", "HFEngine", "Sampler", "SamplingParams"]
