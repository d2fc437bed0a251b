"""Samplers: the interface and its engines (Hugging Face generate; vLLM, optional)."""

from cepo.sampler.base import Completion, Sampler, SamplingParams
from cepo.sampler.hf_engine import HFEngine

__all__ = ["Completion", "HFEngine", "Sampler", "SamplingParams"]
