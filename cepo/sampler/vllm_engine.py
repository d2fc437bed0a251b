"""The colocated vLLM engine: one engine per training rank, sharing the GPU with training.

Life of a step (``generate``): wake the weights, stream the new weights in, reset the
prefix cache, wake the KV cache, generate, sleep (level 1 by default) so the memory is
free for the update. The order avoids two bugs seen in peers: weights written before
the engine wakes are lost (TRL #5142), and a wake-up that restores weights after a sync
overwrites the fresh ones (TRL #5312) — here weights are only written after waking them
and nothing restores them afterwards. Weights go in through ``collective_rpc`` into a
worker extension (``WeightSyncExtension``), the supported route in vLLM V1, never
through ``llm_engine.model_executor`` (removed in V1, vLLM #16434).

vLLM is an optional extra (``pip install 'cepo[vllm]'``); it is imported lazily.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch

from cepo.sampler.base import Completion, Sampler, SamplingParams


class WeightSyncExtension:
    """Mixed into vLLM's GPU worker (``worker_extension_cls``): loads (name, tensor) pairs."""

    def cepo_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        model = self.model_runner.model
        device = next(model.parameters()).device
        model.load_weights(weights=[(n, t.to(device, non_blocking=True)) for n, t in weights])
        return len(weights)


class VLLMEngine(Sampler):
    """vLLM with ``distributed_executor_backend="external_launcher"`` and sleep mode.

    Every training rank builds its own engine (tensor parallel 1 by default) seeded by
    rank; ``update_weights`` buffers nothing: each bucket is loaded as it arrives, after
    the weights have been woken.
    """

    def __init__(self, model_path: str, *, tokenizer, seed: int = 0, rank: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.35,
                 max_model_len: int | None = None, sleep_level: int = 1, dtype: str = "bfloat16"):
        try:
            import vllm
        except ImportError as e:
            raise ImportError("vLLM is not installed: pip install 'cepo[vllm]' "
                              "(or use --engine hf)") from e
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.sleep_level = sleep_level
        kwargs = dict(model=model_path, tensor_parallel_size=tensor_parallel_size,
                      distributed_executor_backend="external_launcher", enable_sleep_mode=True,
                      seed=seed + rank, gpu_memory_utilization=gpu_memory_utilization,
                      dtype=dtype, enable_prefix_caching=True,
                      worker_extension_cls=f"{__name__}.WeightSyncExtension",
                      logprobs_mode="processed_logprobs")
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)
        self.llm.sleep(level=self.sleep_level)
        self._asleep = True
        self._weights_awake = False

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Wake the weights (once per sync), then load this bucket; see the module docstring."""
        if not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        self.llm.collective_rpc("cepo_load_weights", args=(list(named_tensors),))
        self._synced = True

    def generate(self, prompt_token_ids, n, params: SamplingParams):
        if not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        if getattr(self, "_synced", False):
            self.llm.reset_prefix_cache()  # cached prefixes were computed with old weights
            self._synced = False
        self.llm.wake_up(tags=["kv_cache"])
        sp = self._vllm.SamplingParams(
            n=n, temperature=max(params.temperature, 0.0), top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
            seed=params.seed, logprobs=0 if params.return_logprobs else None)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_token_ids], sp,
                                    use_tqdm=False)
        results = []
        for p, out in enumerate(outputs):
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                eos = self.tokenizer.eos_token_id
                if eos in ids:
                    ids = ids[:ids.index(eos)]
                lps = None
                if params.return_logprobs and c.logprobs is not None:
                    lps = [step[tok].logprob for step, tok in zip(c.logprobs, ids)]
                group.append(Completion(p, ids, self.tokenizer.decode(ids, skip_special_tokens=True),
                                        "stop" if c.finish_reason == "stop" else "length", lps))
            results.append(group)
        self.llm.sleep(level=self.sleep_level)
        self._weights_awake = False
        return results

    def close(self) -> None:
        del self.llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def choose_engine(requested: str, device_type: str, vllm_installed: bool) -> tuple[str, str | None]:
    """(engine name, warning or None): vllm when asked, or by default on CUDA when installed;
    Hugging Face generate otherwise. Asking for vllm without it installed is an error."""
    if requested not in ("auto", "hf", "vllm"):
        raise ValueError(f"config: 'engine' must be auto, hf or vllm, got {requested!r}")
    if requested == "hf":
        return "hf", None
    if requested == "vllm":
        if not vllm_installed:
            raise ValueError("config: 'engine' is vllm but vLLM is not installed; "
                             "pip install 'cepo[vllm]'")
        if device_type != "cuda":
            raise ValueError("config: 'engine' is vllm but the device is not CUDA")
        return "vllm", None
    if device_type == "cuda" and vllm_installed:
        return "vllm", None
    if device_type == "cuda":
        return "hf", ("vLLM is not installed: falling back to the Hugging Face generate engine "
                      "(slower); pip install 'cepo[vllm]'")
    return "hf", None
