"""The Hugging Face ``generate`` engine: CPU, and wherever vLLM is absent.

Sampling is controlled entirely here, not by the checkpoint's ``generation_config.json``
(whose top_k / repetition_penalty defaults would otherwise leak in silently): the model
copy gets a blank generation config, and temperature / top-k / top-p are applied by
warpers this module passes in, followed by a recorder that reads the log-probabilities
of the sampled tokens from the very scores they were drawn from, one step at a time
(no [batch, steps, vocab] score tensor is kept).
"""

from __future__ import annotations

import copy
import os
from typing import Iterable

import torch

from cepo.sampler.base import (Completion, Sampler, SamplingParams, stop_token_ids,
                               weight_update_error)


class _LogprobRecorder:
    """Last logits processor: keeps log_softmax of the final scores of the previous step
    and, at the next step (or at the end), gathers the token that was sampled from it."""

    def __init__(self):
        self.prev: torch.Tensor | None = None      # [B, V] log-probs of the pending step
        self.steps: list[torch.Tensor] = []        # each [B]

    def _take(self, tokens: torch.Tensor) -> None:
        self.steps.append(self.prev.gather(1, tokens[:, None].to(self.prev.device))[:, 0].cpu())
        self.prev = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self._take(input_ids[:, -1])
        self.prev = scores.float().log_softmax(-1)
        return scores

    def result(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[B, steps] log-probs of ``new_tokens`` [B, steps] (the generated part)."""
        if self.prev is not None:
            self._take(new_tokens[:, -1])
        if len(self.steps) != new_tokens.shape[1]:
            raise RuntimeError(f"HFEngine: recorded {len(self.steps)} sampling steps for "
                               f"{new_tokens.shape[1]} generated tokens")
        return torch.stack(self.steps, 1) if self.steps else torch.zeros(new_tokens.shape)



class HFEngine(Sampler):
    """Holds its own copy of the model (as vLLM would), in eval mode, on ``device``.

    model: a local Hugging Face model directory (loaded with ``local_files_only``) or a
    ``PreTrainedModel`` whose config and weights are copied (DTensor weights are
    gathered with ``full_tensor()``); the engine never shares storage with the trainer.
    A separate copy keeps generation independent of FSDP2 sharding: ranks generate
    different numbers of tokens, which a sharded forward (collective per layer) cannot.
    dtype: the copy's dtype (default: float32 from a path, the source's from a model).
    max_batch_size: rows (prompt x sample) per ``model.generate`` call; bounds memory.
    Stop tokens: the tokenizer's EOS plus any EOS ids in the model's generation config
    (e.g. both <|im_end|> and <|endoftext|> for Qwen instruct models).
    """

    def __init__(self, model, *, tokenizer, device: torch.device | str = "cpu",
                 max_batch_size: int = 64, dtype: torch.dtype | None = None):
        from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

        if max_batch_size < 1:
            raise ValueError(f"HFEngine: max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device)
        if isinstance(model, PreTrainedModel):
            source_gen = model.generation_config
            self.model = self._copy_model(model, self.device, dtype)
        elif isinstance(model, (str, os.PathLike)):
            self.model = AutoModelForCausalLM.from_pretrained(
                str(model), dtype=dtype or torch.float32, use_safetensors=True,
                local_files_only=True).to(self.device)
            source_gen = self.model.generation_config
        else:
            raise TypeError(f"HFEngine: model must be a model directory or a PreTrainedModel "
                            f"(unwrap PEFT / FSDP wrappers first), got {type(model).__name__}")
        self.model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        stop = stop_token_ids(tokenizer.eos_token_id, getattr(source_gen, "eos_token_id", None))
        if not stop:
            raise ValueError("HFEngine: the tokenizer has no eos_token_id and the model's "
                             "generation config names none; set tokenizer.eos_token")
        self.stop_ids = stop
        self.eos_id = stop[0]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        # a blank generation config: nothing from generation_config.json leaks into sampling
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            bos_token_id=getattr(source_gen, "bos_token_id", None))
        # tied weights appear under every name (lm_head.weight and embed_tokens.weight)
        self._params = dict(self.model.named_parameters(remove_duplicate=False))
        self._params.update({k: v for k, v in self.model.named_buffers(remove_duplicate=False)
                             if k not in self._params})

    @staticmethod
    def _copy_model(model, device: torch.device, dtype: torch.dtype | None):
        """A fresh instance of ``type(model)`` holding a copy of its weights."""
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
                 for k, v in model.state_dict().items()}
        dtype = dtype or next(iter(state.values())).dtype
        with torch.device(device):
            clone = type(model)(copy.deepcopy(model.config))
        clone.to(dtype)
        missing, unexpected = clone.load_state_dict(state, strict=False)
        tied = set(getattr(clone, "_tied_weights_keys", None) or ())
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError(f"HFEngine: copying the model failed; missing {missing}, "
                             f"unexpected {unexpected}")
        return clone

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full tensors [any shape, matching the parameter] into the engine's model.

        Names are Hugging Face parameter (or buffer) names; a tied weight may be given
        under either name. Names not given keep their values: a partial update, e.g. one
        bucket of a streamed sync. DTensors are gathered with ``full_tensor()``. Unknown
        names and shape mismatches raise one ValueError naming all of them, after the
        valid tensors of the call have been copied.
        """
        unknown, bad_shape = [], []
        for name, tensor in named_tensors:
            target = self._params.get(name)
            if target is None:
                unknown.append(name)
                continue
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            if tuple(target.shape) != tuple(tensor.shape):
                bad_shape.append(f"{name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(target.shape)}")
                continue
            target.copy_(tensor.detach().to(target.device, target.dtype))
        error = weight_update_error(unknown, bad_shape)
        if error is not None:
            raise error

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], n: int,
                 params: SamplingParams) -> list[list[Completion]]:
        """``n`` completions per prompt ([P][n]); see ``Sampler.generate``.

        Rows (prompt x sample) go through ``model.generate`` in micro-batches of
        ``max_batch_size``, left-padded. A seed makes the call reproducible (for the same
        prompts, n and max_batch_size) without touching the caller's global RNG state.
        Greedy decoding generates each prompt once and copies it n times.
        """
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        for i, ids in enumerate(prompt_token_ids):
            if len(ids) == 0:
                raise ValueError(f"generate: prompt_token_ids[{i}] is empty; render the prompt "
                                 f"(cepo.contexts.render_prompt) before sampling")
        copies = 1 if params.greedy else n
        jobs = [p for p in range(len(prompt_token_ids)) for _ in range(copies)]
        results: list[list[Completion]] = [[] for _ in prompt_token_ids]
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None
                       else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices, enabled=params.seed is not None):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(jobs), self.max_batch_size):
                chunk = jobs[start:start + self.max_batch_size]
                batch = self._generate_batch([list(prompt_token_ids[p]) for p in chunk], params)
                for p, comp in zip(chunk, batch):
                    comp.prompt_index = p
                    results[p].append(comp)
        if copies == 1 and n > 1:
            results = [[group[0]] + [copy.deepcopy(group[0]) for _ in range(n - 1)]
                       for group in results]
        return results

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        from transformers import (GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        # knobs explicit: a None would be filled from defaults (e.g. top_k=50); HF's own
        # warpers stay off (T=1, top_k=0, top_p=1), this module's are passed in below
        knobs = dict(temperature=1.0, top_k=0, top_p=1.0) if not params.greedy else {}
        config = GenerationConfig(
            do_sample=not params.greedy, max_new_tokens=params.max_new_tokens, min_new_tokens=0,
            repetition_penalty=1.0, num_beams=1, eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id, return_dict_in_generate=True, **knobs)
        processors = LogitsProcessorList()
        if not params.greedy:  # HF's own order: temperature, top-k, top-p
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        recorder = _LogprobRecorder() if params.return_logprobs else None
        if recorder is not None:
            processors.append(recorder)
        out = self.model.generate(input_ids=ids.to(self.device),
                                  attention_mask=mask.to(self.device),
                                  generation_config=config, logits_processor=processors)
        new = out.sequences[:, width:]
        logprobs = recorder.result(new) if recorder is not None else None
        new = new.cpu()
        stop = set(self.stop_ids)
        completions = []
        for i in range(len(prompts)):
            row = new[i].tolist()
            cut = next((j for j, t in enumerate(row) if t in stop), None)
            reason = "length" if cut is None else "stop"
            tokens = row if cut is None else row[:cut]
            completions.append(Completion(
                prompt_index=-1, token_ids=tokens, finish_reason=reason,
                text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                logprobs=logprobs[i, :len(tokens)].tolist() if logprobs is not None else None))
        return completions

    def close(self) -> None:
        """Drop the model copy (and the CUDA cache it used)."""
        if getattr(self, "model", None) is not None:
            self.model = None
            self._params = {}
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
