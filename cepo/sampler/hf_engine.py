"""The Hugging Face ``generate`` engine: CPU, and wherever vLLM is absent.

Sampling is controlled entirely here, not by the checkpoint's ``generation_config.json``
(whose top_k / repetition_penalty defaults would otherwise leak in silently): the model
copy gets a blank generation config, temperature / top-k / top-p are applied by warpers
this module passes in, and the last logits processor draws each row's token with
counter-based randomness of its own (per prompt seed, sample index and step), records
its log-probability from the very distribution it was drawn from (no [batch, steps,
vocab] score tensor is kept) and forces it, so ``generate`` runs greedy.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
from typing import Iterable

import torch

from cepo.sampler.base import (Completion, PromptDone, Sampler, SamplingParams, check_generate_args,
                               mix_seed, prompt_seeds, stop_token_ids, weight_update_error)
from cepo.sampler.lean_decoder import LeanDecoder, LeanWeights, lean_decoder_unsupported


def row_uniform(row_key: int, step: int) -> float:
    """A uniform number in (0, 1) that is a pure function of (row_key, step): 53 bits of
    ``mix_seed(row_key, step)``. Counter-based, so a row's draws do not depend on which
    other rows share its batch, nor on the device."""
    return ((mix_seed(row_key, step) >> 9) + 0.5) / float(1 << 53)


def row_uniforms(row_keys: list[int], step: int) -> list[float]:
    """``[row_uniform(k, step) for k in row_keys]``, the same numbers at less than half the
    cost (the step's bytes are encoded once; called once per decoding step)."""
    tail = int(step).to_bytes(16, "little", signed=True)
    blake, from_bytes = hashlib.blake2b, int.from_bytes
    # mix_seed's 62 bits (>> 2), then row_uniform's top 53 of them (>> 9)
    return [((from_bytes(blake(int(k).to_bytes(16, "little", signed=True) + tail,
                               digest_size=8).digest(), "little") >> 11) + 0.5) / float(1 << 53)
            for k in row_keys]


def draw_tokens(scores: torch.Tensor, row_keys: list[int] | None,
                step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's next token and its log-probability: ([B] long, [B] float32).

    scores: [B, V], the processed logits (temperature, top-k, top-p applied). Sampling:
    inverse CDF of ``exp(log_softmax(scores))`` (float64) at ``row_uniform(row_keys[b],
    step)``, so a row's samples depend only on its key and its own logits; greedy
    (``row_keys`` None): argmax. The log-probability is under that very distribution.
    """
    logp = scores.float().log_softmax(-1)      # [B, V]
    if row_keys is None:
        tokens = scores.argmax(-1)
    else:
        u = torch.tensor(row_uniforms(row_keys, step),
                         dtype=torch.float64, device=scores.device)
        cdf = logp.double().exp().cumsum(-1)   # [B, V]; rows sum to 1 up to rounding
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])[:, 0]
        tokens = tokens.clamp_(max=scores.shape[-1] - 1)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def shared_prompt_rows(ids: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Which rows of a left-padded prompt batch ([B, W] ids and attention mask) repeat the
    row above them (same ids, same mask).

    Returns (first, expand): ``first`` [U] the index of the first row of each run of
    identical adjacent rows, ``expand`` [B] the run each row belongs to, so that
    ``x[first][expand]`` rebuilds any per-row quantity of a batch; (None, None) when no
    two adjacent rows are equal. A prompt's n samples sit next to each other in a batch,
    so its prompt forward (the prefill) is run once instead of n times.
    """
    if ids.shape[0] < 2:
        return None, None
    starts = torch.ones(ids.shape[0], dtype=torch.bool)
    starts[1:] = ((ids[1:] != ids[:-1]) | (mask[1:] != mask[:-1])).any(-1)
    if bool(starts.all()):
        return None, None
    return starts.nonzero()[:, 0], starts.cumsum(0) - 1


class _RowSampler:
    """Last logits processor of ``generate`` (the vision-language path): draws every row's
    next token with ``draw_tokens`` and forces it (the returned scores are -inf except at
    the chosen token, so that ``generate``'s greedy pick returns exactly it), recording
    the chosen tokens' log-probabilities when asked.
    """

    def __init__(self, row_keys: list[int] | None, record: bool):
        self.row_keys = row_keys
        self.record = record
        self.step = 0
        self.logprobs: list[torch.Tensor] = []     # per step, [B] float32 on the CPU

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens, logp = draw_tokens(scores, self.row_keys, self.step)
        if self.record:
            self.logprobs.append(logp.cpu())
        self.step += 1
        return torch.full_like(scores, -float("inf")).scatter_(1, tokens[:, None], 0.0)

    def result(self, n_new: int) -> torch.Tensor:
        """[B, n_new] recorded log-probs of the generated tokens."""
        if len(self.logprobs) != n_new:
            raise RuntimeError(f"HFEngine: recorded {len(self.logprobs)} sampling steps for "
                               f"{n_new} generated tokens")
        return torch.stack(self.logprobs, 1)


class HFEngine(Sampler):
    """Holds its own copy of the model (as vLLM would), in eval mode, on ``device``.

    Sampling is done by this engine, not by ``generate``'s sampler: the last logits
    processor draws each row's token from a uniform number that is a pure function of
    (the prompt's seed, the sample index, the decoding step) and forces it (see
    ``_RowSampler``). A prompt's samples therefore do not depend on the other prompts of
    the call, their order or ``max_batch_size``, up to floating-point differences of the
    logits between batch shapes (which flip a token only when its uniform falls within
    rounding of a CDF boundary; the tests see identical tokens in fp32 on CPU).

    model: a local Hugging Face model directory (loaded with ``local_files_only``) or a
    ``PreTrainedModel`` whose config and weights are copied (DTensor weights are
    gathered with ``full_tensor()``); the engine never shares storage with the trainer.
    A separate copy keeps generation independent of FSDP2 sharding: ranks generate
    different numbers of tokens, which a sharded forward (collective per layer) cannot.
    dtype: the copy's dtype (default: float32 from a path, the source's from a model).
    max_batch_size: rows (prompt x sample) decoded together; bounds memory.
    decode: "compact" runs the engine's own decoding loop over a ``DynamicCache`` and drops
    each row from the batch (its cache rows too) as soon as it emits a stop token, so a
    batch costs the sum of its rows' lengths rather than rows x the longest; "generate"
    calls ``model.generate``; "auto" (default) is "compact" for text models whose cache
    layers can drop rows (full or sliding-window attention) and "generate" otherwise
    (vision-language models, linear-attention or quantised caches). Both draw the same
    tokens from the same keys (``draw_tokens``).
    lean: in the compact loop, run the decoding steps of Llama / Qwen2 / Qwen3 text models
    through ``cepo.sampler.lean_decoder`` (the model's weights, its q / k / v and gate / up
    projections fused in place, a preallocated KV cache; 1.4x less generation time for
    the embedded default on 2 CPU cores) instead of the model's forward; the prompt's
    forward is always the model's. Other models ignore it.
    Stop tokens: the tokenizer's EOS plus any EOS ids in the model's generation config
    (e.g. both <|im_end|> and <|endoftext|> for Qwen instruct models).
    """

    def __init__(self, model, *, tokenizer, device: torch.device | str = "cpu",
                 max_batch_size: int = 64, dtype: torch.dtype | None = None,
                 decode: str = "auto", lean: bool = True):
        from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

        if max_batch_size < 1:
            raise ValueError(f"HFEngine: max_batch_size must be >= 1, got {max_batch_size}")
        if decode not in ("auto", "compact", "generate"):
            raise ValueError(f"HFEngine: decode must be 'auto', 'compact' or 'generate', "
                             f"got {decode!r}")
        self.device = torch.device(device)
        if isinstance(model, PreTrainedModel):
            source_gen = model.generation_config
            self.model = self._copy_model(model, self.device, dtype)
        elif isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForImageTextToText

            from cepo.vision import is_vl_checkpoint
            auto = (AutoModelForImageTextToText if is_vl_checkpoint(model)
                    else AutoModelForCausalLM)
            self.model = auto.from_pretrained(
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
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_args else "past_key_values"  # renamed in 5.2x
        compact_ok = self._can_compact(self.model, forward_args)
        if decode == "compact" and not compact_ok:
            raise ValueError(f"HFEngine: decode='compact' needs a text model whose cache layers "
                             f"can drop rows; {type(self.model).__name__} cannot (use 'auto')")
        self.compact = compact_ok if decode == "auto" else decode == "compact"
        # the compact loop's decoding steps without the Hugging Face forward's overhead
        # (Llama / Qwen2 / Qwen3; cepo.sampler.lean_decoder); the prompt forward stays HF's
        self.lean = (LeanWeights(self.model) if self.compact and lean and
                     lean_decoder_unsupported(self.model) is None else None)
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

    @staticmethod
    def _can_compact(model, forward_args) -> bool:
        """True for a text-only model with a ``logits_to_keep`` forward (``forward_args``:
        its signature's parameters) whose DynamicCache holds only full or sliding-window
        attention layers (rows can be dropped)."""
        try:
            from transformers import DynamicCache
            from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
        except ImportError:  # a transformers without per-layer caches: generate does it all
            return False
        config = model.config
        if getattr(config, "vision_config", None) is not None or config.is_encoder_decoder:
            return False
        if "logits_to_keep" not in forward_args:
            return False
        try:
            layers = DynamicCache(config=config).layers
        except Exception:  # a config DynamicCache cannot read: let generate pick the cache
            return False
        return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers)

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
        if self.lean is not None:
            self.lean.refresh()
        error = weight_update_error(unknown, bad_shape)
        if error is not None:
            raise error

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], n: int, params: SamplingParams,
                 seeds: list[int] | None = None,
                 on_prompt_done: PromptDone | None = None,
                 images: list | None = None) -> list[list[Completion]]:
        """``n`` completions per prompt ([P][n]); see ``Sampler.generate``.

        One batched generation over every (prompt, sample) row, in micro-batches of at
        most ``max_batch_size`` rows (left-padded; rows sorted by prompt length so a
        micro-batch holds similar lengths). Row (p, j) samples with the key
        ``mix_seed(seeds[p], j)``; without ``seeds`` the per-prompt seeds come from
        ``params.seed`` and the prompt's position, or, when that is None too, from one
        draw of torch's global RNG (the only use of it: a seeded call leaves it alone).
        Greedy decoding generates each prompt once and copies it n times.
        ``on_prompt_done`` is called as soon as a prompt's rows are all complete: with
        compact decoding, at the decoding step where its last row stops (scoring then
        overlaps the decoding of the rows still running); with ``generate``, after the
        micro-batch that completes it.
        images (vision-language models): one ``cepo.vision.ImageInputs`` (or None) per
        prompt, whose ``<|image_pad|>`` tokens are already expanded in its token ids; each
        row gets its prompt's pixels.
        """
        check_generate_args(prompt_token_ids, n, seeds)
        if images is not None and len(images) != len(prompt_token_ids):
            raise ValueError(f"generate: images must hold one entry per prompt, got "
                             f"{len(images)} for {len(prompt_token_ids)} prompts")
        if not prompt_token_ids:
            return []
        copies = 1 if params.greedy else n
        per_prompt = None
        if not params.greedy:
            per_prompt = prompt_seeds(len(prompt_token_ids), params, seeds)
            if per_prompt is None:
                base = int(torch.randint(0, 2 ** 62, (1,)).item())
                per_prompt = [mix_seed(base, p) for p in range(len(prompt_token_ids))]
        rows = sorted(((p, j) for p in range(len(prompt_token_ids)) for j in range(copies)),
                      key=lambda r: -len(prompt_token_ids[r[0]]))
        results: list[list[Completion | None]] = [[None] * copies for _ in prompt_token_ids]
        missing = [copies] * len(prompt_token_ids)
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            keys = None if per_prompt is None else [mix_seed(per_prompt[p], j) for p, j in chunk]

            def deliver(i: int, comp: Completion, chunk=chunk) -> None:
                """Row i of the micro-batch is complete; a prompt whose rows all are goes
                to ``on_prompt_done`` at once (scoring overlaps the decoding still to come)."""
                p, j = chunk[i]
                comp.prompt_index = p
                results[p][j] = comp
                missing[p] -= 1
                if missing[p] == 0:
                    if copies == 1 and n > 1:
                        results[p] = results[p] + [copy.deepcopy(results[p][0])
                                                   for _ in range(n - 1)]
                    if on_prompt_done is not None:
                        on_prompt_done(p, results[p])

            self._generate_batch([list(prompt_token_ids[p]) for p, _ in chunk], keys, params,
                                 None if images is None else [images[p] for p, _ in chunk],
                                 deliver=deliver, early=on_prompt_done is not None)
        return results

    def _vision_kwargs(self, ids: torch.Tensor, images: list | None) -> dict:
        """pixel_values / image_grid_thw / mm_token_type_ids of a left-padded batch."""
        if images is None or all(im is None for im in images):
            return {}
        present = [im for im in images if im is not None]
        image_id = self.model.config.image_token_id
        return dict(pixel_values=torch.cat([im.pixel_values for im in present]).to(self.device),
                    image_grid_thw=torch.cat([im.grid_thw for im in present]).to(self.device),
                    mm_token_type_ids=(ids == image_id).int().to(self.device))

    def _generate_batch(self, prompts: list[list[int]], row_keys: list[int] | None,
                        params: SamplingParams, images: list | None = None, *,
                        deliver, early: bool = False) -> None:
        """Generate one micro-batch (left-padded), handing each row's ``Completion`` to
        ``deliver(row, completion)`` exactly once: with compact decoding and ``early``,
        at the step where the row stops; otherwise all at the end."""
        from transformers import (GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        processors = LogitsProcessorList()
        if not params.greedy:  # HF's own order: temperature, top-k, top-p
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        delivered: set[int] = set()   # rows already handed to ``deliver`` (early)
        if self.compact and images is None:
            on_stop = None
            if early:
                def on_stop(done_rows, new, logprobs):  # rows whose last token is in
                    for i in done_rows:
                        deliver(i, self._completion(new[i].tolist(), None if logprobs is None
                                                    else logprobs[i]))
                        delivered.add(i)
            new, logprobs = self._decode_compact(ids, mask, row_keys, params, processors,
                                                 on_stop)
        else:
            # generate's own pick is greedy: _RowSampler, last, has already chosen the token
            config = GenerationConfig(
                do_sample=False, max_new_tokens=params.max_new_tokens, min_new_tokens=0,
                repetition_penalty=1.0, num_beams=1, eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id, return_dict_in_generate=True)
            sampler = _RowSampler(row_keys, record=params.return_logprobs)
            processors.append(sampler)
            out = self.model.generate(input_ids=ids.to(self.device),
                                      attention_mask=mask.to(self.device),
                                      generation_config=config, logits_processor=processors,
                                      **self._vision_kwargs(ids, images))
            new = out.sequences[:, width:].cpu()
            logprobs = sampler.result(new.shape[1]) if params.return_logprobs else None
        for i in range(len(prompts)):
            if i not in delivered:
                deliver(i, self._completion(new[i].tolist(),
                                            None if logprobs is None else logprobs[i]))

    def _completion(self, row: list[int], logprobs: torch.Tensor | None) -> Completion:
        """A row's Completion from its generated ids (pad after a stop token) and the
        per-step log-probs [steps] (or None)."""
        stop = set(self.stop_ids)
        cut = next((j for j, t in enumerate(row) if t in stop), None)
        tokens = row if cut is None else row[:cut]
        trained = len(tokens) + (cut is not None)
        return Completion(
            prompt_index=-1, token_ids=tokens, finish_reason="length" if cut is None else "stop",
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            logprobs=logprobs[:trained].tolist() if logprobs is not None else None,
            stop_token_id=None if cut is None else row[cut])

    def _decode_compact(self, ids: torch.Tensor, mask: torch.Tensor, row_keys: list[int] | None,
                        params: SamplingParams, warpers,
                        on_stop=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode a left-padded batch ([B, W] ids and mask), dropping rows as they stop.

        Returns ([B, steps] generated ids, pad after a row's stop token; [B, steps]
        log-probs or None), the layout ``generate`` gives, so one completion builder
        serves both. ``on_stop(rows, new, logprobs)``, when given, is called at each step
        where rows emit a stop token (before the next forward), with those rows' indices and
        the buffers so far. Positions are ``generate``'s (cumsum of the mask - 1), the first
        step reads only the last prompt position's logits (``logits_to_keep=1``), and a row
        that emits a stop token leaves the batch: its cache rows, mask row, position and key
        are dropped before the next forward. Identical adjacent prompt rows (a prompt's n
        samples) share one prompt forward: the prompt is run once and its cache rows and
        last logits are repeated for each sample (``shared_prompt_rows``). The steps after
        the prompt run through ``LeanDecoder`` when the engine has lean weights.
        """
        from transformers import DynamicCache

        batch = ids.shape[0]
        device = self.device
        stop = torch.tensor(self.stop_ids, device=device)
        new = torch.full((batch, params.max_new_tokens), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros((batch, params.max_new_tokens)) if params.return_logprobs else None
        rows = torch.arange(batch)                           # original index of each live row
        keys = row_keys
        first, expand = shared_prompt_rows(ids, mask)   # on the host copies
        mask = mask.to(device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=self.model.config)
        kw = {self._cache_kw: cache, "use_cache": True, "logits_to_keep": 1}
        if first is None:
            out = self.model(input_ids=ids.to(device), attention_mask=mask,
                             position_ids=positions, **kw)
            logits = out.logits[:, -1, :]
        else:
            first, expand = first.to(device), expand.to(device)
            out = self.model(input_ids=ids.to(device)[first], attention_mask=mask[first],
                             position_ids=positions[first], **kw)
            cache.batch_select_indices(expand)
            logits = out.logits[expand, -1, :]
        lean = (None if self.lean is None else
                LeanDecoder(self.lean, cache, mask, params.max_new_tokens))
        positions = positions[:, -1:]
        for step in range(params.max_new_tokens):  # at least one: max_new_tokens >= 1
            scores = logits.float()
            for warp in warpers:
                scores = warp(None, scores)
            tokens, token_logp = draw_tokens(scores, keys, step)
            new[rows, step] = tokens.cpu()
            if logprobs is not None:
                logprobs[rows, step] = token_logp.cpu()
            live = ~torch.isin(tokens, stop)
            if on_stop is not None and not bool(live.all()):
                stopped = rows[(~live).cpu()].tolist()
                on_stop(stopped, new, logprobs)
            if step + 1 == params.max_new_tokens or not bool(live.any()):
                break
            if not bool(live.all()):
                keep = live.nonzero()[:, 0]
                if lean is not None:
                    lean.select(keep)
                else:
                    cache.batch_select_indices(keep)
                    mask = mask[keep]
                rows, positions, tokens = rows[keep.cpu()], positions[keep], tokens[keep]
                if keys is not None:
                    keys = [keys[i] for i in keep.tolist()]
            positions = positions + 1
            if lean is not None:
                logits = lean.forward(tokens, positions)
            else:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
                logits = self.model(input_ids=tokens[:, None], attention_mask=mask,
                                    position_ids=positions, **kw).logits[:, -1, :]
        steps = step + 1
        return new[:, :steps], None if logprobs is None else logprobs[:, :steps]

    def close(self) -> None:
        """Drop the model copy (and the CUDA cache it used)."""
        if getattr(self, "model", None) is not None:
            self.model = None
            self._params = {}
            self.lean = None  # it holds the fused weights
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
