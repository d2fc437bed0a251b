"""A stand-in for the parts of vLLM that ``cepo.sampler.vllm_engine`` uses, on CPU.

Tests put this module in ``sys.modules["vllm"]`` (``install(monkeypatch)``). ``LLM`` runs
a real tiny Hugging Face model (float32, CPU) with vLLM's documented behaviour, so that
``check_sampler_conformance`` can run on ``VLLMEngine`` without a GPU:

- ``SamplingParams``: vLLM's names and checks (n, temperature in [0, 2], top_p, top_k
  with 0 / -1 off, seed, max_tokens, logprobs, stop_token_ids); temperature 0 is greedy
  and then only n = 1 is accepted. Child ``i`` of a seeded request uses seed + i.
- Stopping: at the tokenizer's EOS, at a generation_config.json EOS or at any of
  ``stop_token_ids``; the stop token stays in ``token_ids`` (and in ``logprobs``),
  finish_reason "stop", else "length" at max_tokens (or max_model_len).
- ``logprobs=k``: per token a dict {token_id: Logprob} with the sampled token and the k
  most likely, from the processed distribution ("processed_logprobs": temperature,
  top-k, top-p applied and renormalised; raw log_softmax when greedy).
- Sleep mode: ``sleep(1)`` backs the weights up, ``sleep(2)`` discards them (NaN);
  ``wake_up(["weights"])`` restores the backup, ``wake_up(["kv_cache"])`` the cache.
  Generating while either is asleep, or ``collective_rpc`` while the weights are,
  raises. Waking an awake part does nothing (vLLM warns).
- ``collective_rpc(method, args=...)`` calls the method on a worker that has
  ``worker_extension_cls`` mixed in; its ``model_runner.get_model().load_weights``
  copies Hugging Face-named tensors, raising ValueError on an unknown name (vLLM's
  ``AutoWeightsLoader``) and skipping ``lm_head.*`` of a tied model.
- ``LLM.generate(prompts, sampling_params)`` takes one SamplingParams for all prompts
  or a list with one per prompt (ValueError on a length mismatch), as vLLM does.
- What vLLM enforces at construction: ``distributed_executor_backend=
  "external_launcher"`` asserts ``VLLM_ENABLE_V1_MULTIPROCESSING`` is off (vLLM's
  default is on); construction is collective when torch.distributed is initialised
  (every rank must build the engine, with the same model and tensor parallel size);
  the worker reseeds the global Python / NumPy / torch RNGs with ``seed``.
- Memory (``DEVICE``, a ``FakeDevice``): vLLM takes ``gpu_memory_utilization`` of the
  device at start-up (ValueError when that much is not free, or when the weights leave
  no room for a KV cache); ``sleep`` releases weights and KV cache; ``wake_up`` maps
  them again and raises a CUDA out-of-memory RuntimeError when the free memory (total
  minus vLLM's, minus what PyTorch has allocated AND what its caching allocator still
  holds) is short. ``install`` routes ``torch.cuda.empty_cache`` to ``DEVICE``.
- Prefix cache: ``generate`` caches each prompt with the weights' version; ``sleep``
  resets it (``LLM.sleep`` calls ``reset_prefix_cache``), as does
  ``reset_prefix_cache``; reusing a prefix computed with older weights raises (vLLM
  would silently serve stale KV).
- ``LLM.llm_engine`` exists (as in V1) but touching it is recorded
  (``llm_engine_touched``): the engine must not reach into its internals.

Every call on ``LLM`` is appended to ``LLM.calls`` (a per-instance list).
"""

from __future__ import annotations

import functools
import importlib
import os
import random
import sys
import types
from dataclasses import dataclass, field

import torch

_SAMPLING_EPS = 1e-5
ENGINE_ARGS = {"tokenizer", "tensor_parallel_size", "distributed_executor_backend",
               "enable_sleep_mode", "seed", "gpu_memory_utilization", "dtype",
               "enable_prefix_caching", "worker_extension_cls", "logprobs_mode",
               "max_model_len", "max_num_seqs", "enforce_eager", "generation_config"}


GiB = 2 ** 30


class FakeDevice:
    """One GPU's memory (bytes), shared by vLLM and PyTorch's caching allocator.

    ``torch_alloc`` / ``torch_free`` model the trainer: freed blocks stay reserved by
    PyTorch's cache (and are reused by later PyTorch allocations) until
    ``empty_cache``; vLLM's sleep-mode allocator cannot reuse them.
    """

    def __init__(self, total: int = 80 * GiB):
        self.total = total
        self.torch_allocated = 0
        self.torch_cached = 0
        self.vllm: dict[str, int] = {}   # "weights" / "kv_cache" -> bytes mapped
        self.empty_cache_calls = 0

    def free(self) -> int:
        return self.total - self.torch_allocated - self.torch_cached - sum(self.vllm.values())

    def _oom(self, what: str, need: int):
        return RuntimeError(f"CUDA out of memory: {what} needs {need / GiB:.2f} GiB, "
                            f"{self.free() / GiB:.2f} GiB free ({self.torch_cached / GiB:.2f} "
                            f"GiB held by PyTorch's cache)")

    def torch_alloc(self, nbytes: int) -> None:
        reuse = min(nbytes, self.torch_cached)
        if nbytes - reuse > self.free():
            raise self._oom("PyTorch allocation", nbytes)
        self.torch_cached -= reuse
        self.torch_allocated += nbytes

    def torch_free(self, nbytes: int) -> None:
        assert nbytes <= self.torch_allocated
        self.torch_allocated -= nbytes
        self.torch_cached += nbytes

    def empty_cache(self) -> None:
        self.empty_cache_calls += 1
        self.torch_cached = 0

    def vllm_map(self, tag: str, nbytes: int) -> None:
        if nbytes > self.free():
            raise self._oom(f"vLLM wake_up({tag!r})", nbytes)
        self.vllm[tag] = nbytes

    def vllm_unmap(self, tag: str) -> None:
        self.vllm.pop(tag, None)


DEVICE = FakeDevice()


def install(monkeypatch, device: FakeDevice | None = None) -> types.ModuleType:
    """Make ``import vllm`` return this module for the test, on a fresh ``DEVICE``
    (``torch.cuda.empty_cache`` empties its PyTorch cache)."""
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "DEVICE", device or FakeDevice())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: module.DEVICE.empty_cache())
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}.")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must contain only integers, "
                             f"got {self.stop_token_ids}.")
        if self.temperature < _SAMPLING_EPS:
            self.top_p, self.top_k = 1.0, 0
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


def top_k_top_p(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """vLLM's apply_top_k_top_p for one row: ascending sort, drop below the k-th
    largest, then drop the low tail whose mass is <= 1 - p (keeping at least one)."""
    if k <= 0 and p >= 1.0:
        return logits
    values, order = logits.sort(descending=False)
    if k > 0:
        values = values.masked_fill(values < values[max(values.numel() - k, 0)], -float("inf"))
    if p < 1.0:
        drop = values.softmax(-1).cumsum(-1) <= 1 - p
        drop[-1] = False
        values = values.masked_fill(drop, -float("inf"))
    return torch.empty_like(logits).scatter_(0, order, values)


class _Model(torch.nn.Module):
    """What ``model_runner.get_model()`` offers the worker extension: ``load_weights``."""

    def __init__(self, hf, tied: bool):
        super().__init__()
        self.hf, self.tied = hf, tied

    @torch.no_grad()
    def load_weights(self, weights) -> set[str]:
        params = dict(self.hf.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if self.tied and name.startswith("lm_head."):
                continue  # AutoWeightsLoader(skip_prefixes=["lm_head."]) when tied
            if name not in params:
                raise ValueError(f"There is no module or parameter named {name!r} in "
                                 f"{type(self.hf).__name__}")
            param = params[name]
            assert param.shape == tensor.shape, \
                f"Attempted to load weight ({tensor.shape}) into parameter ({param.shape})"
            param.copy_(tensor)
            loaded.add(name)
        self.version += 1
        return loaded

    version = 0  # bumped by every load_weights: what a cached prefix was computed with


class _ModelRunner:
    def __init__(self, model: _Model):
        self.model = model

    def get_model(self) -> _Model:
        return self.model


class _Worker:
    def __init__(self, model: _Model):
        self.model_runner = _ModelRunner(model)


_DTYPES = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "float": torch.float32}


def _multiprocessing_on() -> bool:
    return bool(int(os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1")))


def _collective_construction(model: str, kwargs: dict) -> None:
    """What external_launcher does at start-up: join torchrun's process group (every
    rank must construct, with the same model and tensor parallel size)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    tp = kwargs.get("tensor_parallel_size", 1)
    if dist.get_world_size() % tp:
        raise ValueError(f"world size {dist.get_world_size()} is not a multiple of "
                         f"tensor_parallel_size {tp}")
    mine = (model, tp, kwargs.get("dtype"), kwargs.get("enable_sleep_mode"))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if any(other != mine for other in every):
        raise AssertionError(f"ranks built different engines: {every}")


def _resolve(qualname: str):
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


class LLM:
    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs got unexpected keyword arguments {sorted(unknown)}")
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            assert not _multiprocessing_on(), \
                "VLLM_ENABLE_V1_MULTIPROCESSING=0 is required for external_launcher"
        if kwargs.get("logprobs_mode", "raw_logprobs") != "processed_logprobs":
            raise NotImplementedError("fake vLLM: only logprobs_mode='processed_logprobs'")
        dtype = kwargs.get("dtype", "auto")
        if dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype: {dtype}")
        _collective_construction(model, kwargs)
        self.kwargs = kwargs
        self.calls: list[tuple] = [("init",)]
        self.llm_engine_touched = False
        from cepo.vision import is_vl_checkpoint

        self.vl = is_vl_checkpoint(model)
        if self.vl:  # vision-language: vLLM runs its own image processor on the images
            from transformers import AutoImageProcessor, AutoModelForImageTextToText

            hf = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32,
                                                             local_files_only=True).eval()
            self._image_processor = AutoImageProcessor.from_pretrained(model)
        else:
            hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32,
                                                      local_files_only=True).eval()
        # memory: the budget is taken at start-up; the KV cache fills what the weights leave
        budget = int(kwargs.get("gpu_memory_utilization", 0.9) * DEVICE.total)
        if budget > DEVICE.free():
            raise ValueError(f"Free memory on device ({DEVICE.free() / GiB:.2f}/"
                             f"{DEVICE.total / GiB:.2f} GiB) on startup is less than desired "
                             f"GPU memory utilization ({budget / GiB:.2f} GiB)")
        weight_bytes = sum(p.numel() for p in hf.parameters()) * _DTYPES[dtype].itemsize
        if budget - weight_bytes <= 0:
            raise ValueError("No available memory for the cache blocks. Try increasing "
                             "`gpu_memory_utilization` when initializing the engine.")
        self.sizes = {"weights": weight_bytes, "kv_cache": budget - weight_bytes}
        for tag, nbytes in self.sizes.items():
            DEVICE.vllm_map(tag, nbytes)
        self.prefix_cache: dict[tuple[int, ...], int] = {}  # prompt -> weights version
        seed = kwargs.get("seed", 0)  # the worker's set_random_seed
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            import numpy
            numpy.random.seed(seed)
        except ImportError:
            pass
        self._tokenizer = AutoTokenizer.from_pretrained(model)
        self._eos = self._tokenizer.eos_token_id  # vLLM's primary EOS: its tokenizer's
        gen_eos = GenerationConfig.from_pretrained(model).eos_token_id
        self._gen_stop = {gen_eos} if isinstance(gen_eos, int) else set(gen_eos or ())
        self.max_model_len = (kwargs.get("max_model_len")
                              or hf.config.get_text_config().max_position_embeddings)
        self._rng = torch.Generator().manual_seed(kwargs.get("seed", 0))
        ext = kwargs.get("worker_extension_cls")
        worker_cls = type("Worker", (_Worker, _resolve(ext)) if ext else (_Worker,), {})
        self.worker = worker_cls(_Model(hf, bool(getattr(hf.config, "tie_word_embeddings",
                                                         False))))
        self.awake = {"weights": True, "kv_cache": True}
        self._backup = None

    @property
    def llm_engine(self):
        self.llm_engine_touched = True  # exists in V1; its internals are not an API
        return types.SimpleNamespace(model_executor=None)

    @property
    def _hf(self):
        return self.worker.model_runner.model.hf

    def sleep(self, level: int = 1) -> None:
        if not self.kwargs.get("enable_sleep_mode"):
            raise AssertionError("Sleep mode is not enabled")
        if level not in (1, 2):
            raise ValueError(f"sleep level {level}")
        self.calls.append(("sleep", level))
        self.prefix_cache.clear()  # LLM.sleep resets the prefix cache first
        for tag in self.awake:
            DEVICE.vllm_unmap(tag)
        params = dict(self._hf.named_parameters())
        if level == 1:
            self._backup = {n: p.detach().clone() for n, p in params.items()}
        else:
            self._backup = None
            with torch.no_grad():
                for p in params.values():
                    p.fill_(float("nan"))
        self.awake = dict.fromkeys(self.awake, False)

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = list(tags) if tags is not None else list(self.awake)
        if not set(tags) <= set(self.awake):
            raise ValueError(f"unknown sleep tags {tags}")
        self.calls.append(("wake_up", tuple(tags)))
        for tag in tags:
            if not self.awake[tag]:
                DEVICE.vllm_map(tag, self.sizes[tag])  # fresh memory: OOM when short
        if "weights" in tags and not self.awake["weights"] and self._backup is not None:
            with torch.no_grad():
                for n, p in self._hf.named_parameters():
                    p.copy_(self._backup[n])
        for tag in tags:
            self.awake[tag] = True

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None) -> list:
        if not self.awake["weights"]:
            raise RuntimeError("collective_rpc while the weights sleep: writes are lost "
                               "(TRL #5142)")
        name = method if isinstance(method, str) else method.__name__
        self.calls.append(("collective_rpc", name))
        fn = (getattr(self.worker, method) if isinstance(method, str)
              else functools.partial(method, self.worker))
        return [fn(*args, **(kwargs or {}))]

    def reset_prefix_cache(self, *args, **kwargs) -> bool:
        self.calls.append(("reset_prefix_cache",))
        self.prefix_cache.clear()
        return True

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        if not all(self.awake.values()):
            raise RuntimeError(f"generate while asleep: {self.awake}")
        sps = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(sps, (list, tuple)):
            if len(sps) != len(prompts):
                raise ValueError("The lengths of prompts and sampling_params must be the same.")
        else:
            sps = [sps] * len(prompts)
        self.calls.append(("generate", len(prompts), tuple(sp.n for sp in sps)))
        self.last_sampling_params = list(sps)
        version = self.worker.model_runner.get_model().version
        out = []
        self.last_prompts = list(prompts)
        for i, (prompt, sp) in enumerate(zip(prompts, sps)):
            ids = [int(t) for t in prompt["prompt_token_ids"]]
            vision = self._vision(ids, prompt.get("multi_modal_data"))
            if vision is not None:
                ids, vision = vision
            if len(ids) >= self.max_model_len:
                raise ValueError(f"prompt of {len(ids)} tokens >= max_model_len")
            cached = self.prefix_cache.get(tuple(ids))
            if cached is not None and cached != version:
                raise AssertionError("a prefix cached with older weights was reused: reset "
                                     "the prefix cache after a weight update")
            self.prefix_cache[tuple(ids)] = version
            out.append(RequestOutput(str(i), ids, [self._sample(ids, sp, k, vision)
                                                   for k in range(sp.n)]))
        return out

    def _vision(self, ids: list[int], mm_data):
        """vLLM's multimodal input processing: the prompt holds ONE image token per image
        (vLLM expands it to the image's token count, as here); None without images."""
        if not mm_data:
            return None
        if not self.vl:
            raise ValueError("multi_modal_data given to a text-only model")
        images = mm_data.get("image")
        images = images if isinstance(images, list) else [images]
        image_id = self._hf.config.image_token_id
        if ids.count(image_id) != len(images):
            raise ValueError(f"the prompt holds {ids.count(image_id)} image tokens for "
                             f"{len(images)} images: vLLM wants one placeholder per image "
                             "(it expands them itself)")
        out = self._image_processor(images=images, return_tensors="pt")
        counts = (out["image_grid_thw"].prod(-1) // self._image_processor.merge_size ** 2)
        expanded, k = [], 0
        for t in ids:
            if t == image_id:
                expanded += [image_id] * int(counts[k])
                k += 1
            else:
                expanded.append(t)
        return expanded, dict(pixel_values=out["pixel_values"],
                              image_grid_thw=out["image_grid_thw"], n_prompt=len(expanded))

    def _forward_logits(self, ids: list[int], vision) -> torch.Tensor:
        x = torch.tensor([ids])
        if vision is None:
            return self._hf(x).logits[0, -1].float()
        # one sequence through cepo.vision's packed forward (a sampled <|image_pad|> in the
        # response is text there, as in a real engine's decode), on this engine's own
        # processing of the images it was given
        from cepo.packing import pack_sequences
        from cepo.vision import ImageInputs, encode_images, packed_hidden_states

        im = ImageInputs("fake", vision["pixel_values"].float(), vision["image_grid_thw"])
        h = packed_hidden_states(self._hf, pack_sequences([ids]), [im],
                                 encode_images(self._hf, [im]))
        return self._hf.lm_head(h[-1]).float()

    def _sample(self, prompt: list[int], sp: SamplingParams, index: int,
                vision=None) -> CompletionOutput:
        rng = self._rng if sp.seed is None else torch.Generator().manual_seed(sp.seed + index)
        greedy = sp.temperature < _SAMPLING_EPS
        tokens, logprobs, reason, stop_reason = [], [], None, None
        while reason is None:
            logits = self._forward_logits(prompt + tokens, vision)
            if not greedy:
                logits = top_k_top_p(logits / sp.temperature, sp.top_k, sp.top_p)
            lp = logits.log_softmax(-1)
            tok = int(lp.argmax()) if greedy else int(torch.multinomial(lp.exp(), 1, generator=rng))
            tokens.append(tok)
            if sp.logprobs is not None:
                top = lp.topk(sp.logprobs).indices.tolist() if sp.logprobs else []
                logprobs.append({t: Logprob(float(lp[t])) for t in [tok] + top})
            if tok == self._eos:
                reason = "stop"
            elif tok in self._gen_stop or tok in sp.stop_token_ids:
                reason, stop_reason = "stop", tok
            elif len(tokens) >= sp.max_tokens or len(prompt) + len(tokens) >= self.max_model_len:
                reason = "length"
        shown = tokens[:-1] if reason == "stop" else tokens
        return CompletionOutput(index, self._tokenizer.decode(shown, skip_special_tokens=True),
                                tokens, None, logprobs if sp.logprobs is not None else None,
                                reason, stop_reason)
