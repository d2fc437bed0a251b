"""The colocated vLLM engine: one engine per training rank, sharing the GPU with training.

Life of a step: ``update_weights`` wakes the weights (once) and streams the new weights
in; ``generate`` resets the prefix cache, wakes the KV cache, runs ONE ``llm.generate``
for all prompts of the step (one request per prompt, each with its own seed), and
sleeps (level 1 by default) so the memory is free for the update: one wake of each
kind and one sleep per step. Before every wake-up PyTorch's CUDA cache is emptied:
vLLM maps fresh physical memory on wake-up and cannot reuse blocks that PyTorch's
caching allocator still holds from the update (TRL does the same). The order avoids two
bugs seen in peers: weights written before the engine wakes are lost (TRL #5142), and a
wake-up that restores weights after a sync overwrites the fresh ones (TRL #5312) — here
weights are only written after waking them and nothing restores them afterwards.
Weights go in through ``collective_rpc`` into a worker extension
(``WeightSyncExtension``), which reaches the model through
``model_runner.get_model()``. ``collective_rpc`` is the public route that works with
and without V1 multiprocessing; ``LLM.llm_engine`` exists in V1 too, but its
``model_executor`` is an internal that only exists in-process, so it is not used.

What vLLM does not check is checked here, on the driver, before anything is sent:
parameter names and shapes come from the checkpoint's safetensors headers (vLLM's
``load_weights`` raises mid-way on an unknown name (ValueError from its
``AutoWeightsLoader``, KeyError from models with their own loop), or skips it silently, e.g.
``lm_head.weight`` of a tied model), and stop tokens are the tokenizer's EOS plus the
EOS ids of ``generation_config.json``, passed as ``stop_token_ids`` and cut off the
returned ``token_ids`` (which, in vLLM, include the stop token; it is reported as
``Completion.stop_token_id``, its logprob last in ``Completion.logprobs``).

vLLM is an optional extra (``pip install 'cepo[vllm]'``); it is imported lazily.
"""

from __future__ import annotations

import copy
import gc
import json
import os
from pathlib import Path
from typing import Iterable

import torch

from cepo.sampler.base import (Completion, Sampler, SamplingParams, check_generate_args,
                               mix_seed, prompt_seeds, stop_token_ids, weight_update_error)

DEFAULT_GPU_MEMORY_UTILIZATION = 0.35
"""The fraction of the GPU's total memory vLLM takes while awake (weights + KV cache).

vLLM checks at start-up that this much is free and sizes its KV cache to fill it; the
engine is built before the trainer's optimizer state exists, but wakes up next to it on
every step. So this must leave room for what training keeps across the sampler's turn:
the (sharded) policy, its gradients and AdamW's two fp32 moments, about 16 bytes per
parameter per rank for full fine-tuning (FSDP shards divide that by the world size),
plus the reference model when the KL term is on. 0.35 fits a ~1.5B-parameter full
fine-tune on an 80 GB GPU; lower it for bigger models (the KV cache shrinks; vLLM
fails at start-up when not even the weights fit), raise it for LoRA."""

_VLLM_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def vllm_dtype(dtype) -> str:
    """vLLM's name for the sampler's compute dtype (a torch.dtype or its name)."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in _VLLM_DTYPES.values():
            return name
    elif dtype in _VLLM_DTYPES:
        return _VLLM_DTYPES[dtype]
    raise ValueError(f"VLLMEngine: dtype must be bfloat16, float16 or float32 (the trainer's "
                     f"compute dtype), got {dtype!r}")


class WeightSyncExtension:
    """Mixed into vLLM's GPU worker (``worker_extension_cls``): loads (name, tensor) pairs."""

    def cepo_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        model = self.model_runner.get_model()
        device = next(model.parameters()).device
        model.load_weights(weights=[(n, t.to(device, non_blocking=True)) for n, t in weights])
        return len(weights)


def checkpoint_shapes(model_path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{Hugging Face parameter name: shape} of a local safetensors checkpoint.

    Reads only the safetensors headers (no tensor data), of ``model.safetensors`` or of
    every shard: the files named by ``model.safetensors.index.json`` when there is one,
    else every ``*.safetensors`` file in the directory.
    """
    from safetensors import safe_open

    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"VLLMEngine: no model directory at {str(path)!r} (models are "
                                "never downloaded; pass a local Hugging Face checkpoint)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"VLLMEngine: {str(path)!r} has no *.safetensors weights")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def checkpoint_stop_ids(model_path: str | os.PathLike, tokenizer) -> list[int]:
    """The tokenizer's EOS, then the EOS ids of the checkpoint's generation config
    (``generation_config.json``, else ``config.json``), as ``HFEngine`` stops."""
    path = Path(model_path)
    gen = _read_json(path / "generation_config.json") or _read_json(path / "config.json")
    return stop_token_ids(getattr(tokenizer, "eos_token_id", None), gen.get("eos_token_id"))


def _tied_embeddings(model_path: str | os.PathLike) -> bool:
    value = _read_json(Path(model_path) / "config.json").get("tie_word_embeddings")
    if value is None:  # not written: the architecture's default, as vLLM reads it
        from transformers import AutoConfig

        value = AutoConfig.from_pretrained(str(model_path), local_files_only=True
                                           ).get_text_config().tie_word_embeddings
    return bool(value)


class VLLMEngine(Sampler):
    """vLLM with ``distributed_executor_backend="external_launcher"`` and sleep mode.

    Every training rank builds its own engine (tensor parallel 1 by default) seeded by
    rank; construction is collective (with ``external_launcher`` vLLM joins the
    torchrun process group), so every rank must build it at the same point.
    ``update_weights`` buffers nothing: each bucket is loaded as it arrives, after the
    weights have been woken.

    Build it BEFORE restoring the RNG state of a resumed run: vLLM's worker reseeds the
    global Python / NumPy / torch RNGs with ``seed + rank`` at start-up, which would
    overwrite a state that ``load_checkpoint`` restored (or restore the RNG state again
    after building it).

    model_path: a local Hugging Face checkpoint directory (safetensors). Its headers give
    the names and shapes ``update_weights`` accepts; its ``generation_config.json`` adds
    stop ids. sleep_level: 1 keeps a CPU copy of the weights while asleep; 2 discards
    them, so every ``generate`` must be preceded by a full ``update_weights``.
    gpu_memory_utilization: see ``DEFAULT_GPU_MEMORY_UTILIZATION``. dtype: the compute
    dtype of vLLM's copy (torch.dtype or name; follow the trainer's compute dtype so the
    sampler's log-probs match the trainer's).
    """

    def __init__(self, model_path: str, *, tokenizer, seed: int = 0, rank: int = 0,
                 tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
                 max_model_len: int | None = None, sleep_level: int = 1,
                 dtype: torch.dtype | str = torch.bfloat16):
        if not 0 < gpu_memory_utilization < 1:
            raise ValueError(f"VLLMEngine: gpu_memory_utilization must be in (0, 1), got "
                             f"{gpu_memory_utilization}")
        dtype = vllm_dtype(dtype)
        # the engine must run in this process (external_launcher asserts it); an
        # inherited "1" would break that, so this is set, not defaulted, before import
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            import vllm
        except ImportError as e:
            raise ImportError("vLLM is not installed: pip install 'cepo[vllm]' "
                              "(or use --engine hf)") from e
        if sleep_level not in (1, 2):
            raise ValueError(f"VLLMEngine: sleep_level must be 1 or 2, got {sleep_level}")
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.sleep_level = sleep_level
        self.param_shapes = checkpoint_shapes(model_path)
        # vLLM skips "lm_head.*" of a tied model (the head *is* the embedding): load it
        # under the embedding's name instead, as HFEngine's shared tensor would take it
        self._aliases: dict[str, str] = {}
        embed = [k for k in self.param_shapes if k.endswith("embed_tokens.weight")]
        if _tied_embeddings(model_path) and len(embed) == 1:
            self._aliases["lm_head.weight"] = embed[0]
        self.stop_ids = checkpoint_stop_ids(model_path, tokenizer)
        self.image_token_id = _read_json(Path(model_path) / "config.json").get("image_token_id")
        if not self.stop_ids:
            raise ValueError("VLLMEngine: the tokenizer has no eos_token_id and the model's "
                             "generation config names none; set tokenizer.eos_token")
        kwargs = dict(model=str(model_path), tensor_parallel_size=tensor_parallel_size,
                      distributed_executor_backend="external_launcher", enable_sleep_mode=True,
                      seed=seed + rank, gpu_memory_utilization=gpu_memory_utilization,
                      dtype=dtype, enable_prefix_caching=True,
                      worker_extension_cls=f"{__name__}.WeightSyncExtension",
                      logprobs_mode="processed_logprobs")
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)
        self.llm.sleep(level=self.sleep_level)
        self._weights_awake = False
        self._synced = False
        self._loaded: set[str] = set()  # names loaded since the last sleep (for level 2)

    def _wake(self, tag: str) -> None:
        # vLLM maps fresh memory on wake-up; blocks PyTorch's caching allocator still
        # holds from the update cannot be reused by it: hand them back to the driver
        torch.cuda.empty_cache()
        self.llm.wake_up(tags=[tag])

    def _wake_weights(self) -> None:
        if not self._weights_awake:
            self._wake("weights")
            self._weights_awake = True

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full tensors, given by Hugging Face name; see ``Sampler.update_weights``.

        Atomic per call: every (name, shape) of the call is checked against the
        checkpoint first, and a call with any unknown name or wrong shape raises one
        ValueError naming all of them, having loaded nothing (and woken nothing). For a
        tied model ``lm_head.weight`` is loaded as the embedding. DTensors are gathered
        with ``full_tensor()``. Wakes the weights (once per sync), then loads this
        bucket; see the module docstring.
        """
        batch, unknown, bad_shape = [], [], []
        for name, tensor in named_tensors:
            target = self._aliases.get(name, name)
            shape = self.param_shapes.get(target)
            if shape is None:
                unknown.append(name)
            elif tuple(tensor.shape) != shape:
                bad_shape.append(f"{name!r} has shape {tuple(tensor.shape)}, expected {shape}")
            else:
                batch.append((target, tensor))
        error = weight_update_error(unknown, bad_shape, prefix="nothing was loaded: ")
        if error is not None:
            raise error
        if not batch:
            return
        batch = [(n, (t.full_tensor() if hasattr(t, "full_tensor") else t).detach())
                 for n, t in batch]
        self._wake_weights()
        self.llm.collective_rpc("cepo_load_weights", args=(batch,))
        self._synced = True
        self._loaded.update(n for n, _ in batch)

    def _sampling_params(self, n: int, params: SamplingParams, seed: int | None):
        """vLLM's SamplingParams for one prompt. Greedy asks for one sample (vLLM rejects
        n > 1 at temperature 0; ``generate`` copies it) and no seed; top_k -1 is "off" in
        every vLLM version (newer ones also take 0). With a seed, vLLM gives sample j of
        the request the seed ``seed + j`` (``ParentRequest``), so a request's samples
        depend on its own seed only."""
        greedy = params.greedy
        return self._vllm.SamplingParams(
            n=1 if greedy else n, temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=params.top_k if params.top_k > 0 and not greedy else -1,
            max_tokens=params.max_new_tokens, seed=None if greedy else seed,
            logprobs=0 if params.return_logprobs else None, stop_token_ids=list(self.stop_ids))

    def generate(self, prompt_token_ids, n, params: SamplingParams, seeds=None,
                 on_prompt_done=None, images=None):
        """``n`` completions per prompt ([P][n]); see ``Sampler.generate``.

        One ``llm.generate`` call for all prompts, one request per prompt with its own
        ``SamplingParams``: n samples and the seed ``mix_seed(seeds[p])`` (vLLM seeds
        sample j with that + j, from a per-request generator, so the draws do not depend
        on the other requests; the logits can still differ in the last bits with the
        batch vLLM forms, unless vLLM's batch-invariant mode is on). Without ``seeds``,
        per-prompt seeds come from ``params.seed`` and the prompt's position, or, when
        that is None too, from vLLM's own random state.

        Completions are cut before the first stop id (finish_reason "stop", the id in
        ``stop_token_id`` and its logprob last); vLLM's ``token_ids`` include the stop
        token. A completion that neither stopped nor reached max_new_tokens (prompt +
        response hit max_model_len) raises RuntimeError rather than break the "length"
        contract. ``llm.generate`` returns every request at once: ``on_prompt_done`` is
        called for each prompt after it, in prompt order (no overlap with scoring).

        images (vision-language models): one ``cepo.vision.ImageInputs`` (or None) per
        prompt. vLLM expands image placeholders itself, so a prompt goes in with each run
        of ``<|image_pad|>`` cut to one id and its images (resized to their patch grids,
        so vLLM's processor makes the trainer's patches) as ``multi_modal_data``.
        """
        check_generate_args(prompt_token_ids, n, seeds)
        if images is not None and len(images) != len(prompt_token_ids):
            raise ValueError(f"generate: images must hold one entry per prompt, got "
                             f"{len(images)} for {len(prompt_token_ids)} prompts")
        if not prompt_token_ids:
            return []
        if self.sleep_level == 2:
            missing = {k for k in self.param_shapes if k not in self._loaded
                       and k not in self._aliases and not k.endswith("rotary_emb.inv_freq")}
            if missing:
                raise RuntimeError(f"VLLMEngine: sleep_level 2 discarded the weights and "
                                   f"{len(missing)} parameters (e.g. {sorted(missing)[0]!r}) "
                                   f"were not loaded since; update_weights with all of them "
                                   f"before each generate")
        per_prompt = prompt_seeds(len(prompt_token_ids), params, seeds)
        sps = [self._sampling_params(n, params, None if per_prompt is None
                                     else mix_seed(per_prompt[p]))
               for p in range(len(prompt_token_ids))]
        self._wake_weights()
        if self._synced:
            self.llm.reset_prefix_cache()  # cached prefixes were computed with old weights
            self._synced = False
        self._wake("kv_cache")
        try:
            requests = [self._request(ids, None if images is None else images[p])
                        for p, ids in enumerate(prompt_token_ids)]
            outputs = self.llm.generate(requests, sps, use_tqdm=False)
        finally:
            self.llm.sleep(level=self.sleep_level)
            self._weights_awake = False
            self._loaded.clear()
        if len(outputs) != len(prompt_token_ids):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for "
                               f"{len(prompt_token_ids)} prompts")
        results = []
        for p, out in enumerate(outputs):
            group = [self._completion(p, c, params) for c in
                     sorted(out.outputs, key=lambda c: c.index)]
            if len(group) != sps[p].n:
                raise RuntimeError(f"vLLM returned {len(group)} completions for prompt {p}, "
                                   f"asked for {sps[p].n}")
            group += [copy.deepcopy(group[0]) for _ in range(n - len(group))]  # greedy copies
            results.append(group)
        if on_prompt_done is not None:
            for p, group in enumerate(results):
                on_prompt_done(p, group)
        return results

    def _request(self, ids, image_inputs) -> dict:
        if image_inputs is None:
            return {"prompt_token_ids": list(ids)}
        from cepo.vision import collapse_image_tokens

        if self.image_token_id is None:
            raise ValueError("VLLMEngine: images given but the checkpoint's config.json has "
                             "no image_token_id (not a vision-language model)")
        if not image_inputs.images:
            raise ValueError("VLLMEngine: ImageInputs without PIL images (prepare examples "
                             "with cepo.vision.ImagePreparer)")
        return {"prompt_token_ids": collapse_image_tokens(list(ids), self.image_token_id),
                "multi_modal_data": {"image": list(image_inputs.images)}}

    def _completion(self, p: int, c, params: SamplingParams) -> Completion:
        ids = [int(t) for t in c.token_ids]
        stop = set(self.stop_ids)
        cut = next((j for j, t in enumerate(ids) if t in stop), None)
        if cut is None and c.finish_reason == "stop" and ids:
            cut = len(ids) - 1  # stopped on an id vLLM knows as EOS; it is the last token
        if cut is not None:
            kept, reason, stop_id = ids[:cut], "stop", ids[cut]
        elif len(ids) >= params.max_new_tokens:
            kept, reason, stop_id = ids[:params.max_new_tokens], "length", None
        else:
            raise RuntimeError(
                f"vLLM ended a completion after {len(ids)} of {params.max_new_tokens} tokens "
                f"without a stop token (finish_reason {c.finish_reason!r}): prompt + "
                f"max_new_tokens does not fit max_model_len, or the request was aborted")
        lps = None
        if params.return_logprobs:
            trained = kept + ([stop_id] if stop_id is not None else [])
            if c.logprobs is None or len(c.logprobs) < len(trained):
                raise RuntimeError("vLLM returned no logprobs (or too few) for a completion")
            lps = [float(c.logprobs[j][tok].logprob) for j, tok in enumerate(trained)]
        return Completion(p, kept, self.tokenizer.decode(kept, skip_special_tokens=True),
                          reason, lps, stop_id)

    def close(self) -> None:
        """Drop the engine (and the CUDA cache it used). Idempotent."""
        if getattr(self, "llm", None) is not None:
            self.llm = None
            gc.collect()
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
