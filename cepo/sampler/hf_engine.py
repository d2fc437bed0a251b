"""The Hugging Face ``generate`` engine: CPU, and wherever vLLM is absent."""

from __future__ import annotations

from typing import Iterable

import torch

from cepo.sampler.base import Completion, Sampler, SamplingParams


class HFEngine(Sampler):
    """Holds its own copy of the model (as vLLM would), in eval mode, on ``device``.

    A separate copy keeps generation independent of FSDP2 sharding: ranks generate
    different numbers of tokens, which a sharded forward (collective per layer) cannot.
    """

    def __init__(self, model, *, tokenizer, device: torch.device | str = "cpu",
                 max_batch_size: int = 64, dtype: torch.dtype | None = None):
        from transformers import AutoModelForCausalLM, PreTrainedModel

        if isinstance(model, PreTrainedModel):
            copy = type(model)(model.config)
            copy.load_state_dict(model.state_dict())
            model = copy
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(model), dtype=dtype or torch.float32, use_safetensors=True,
                local_files_only=True)
        self.model = model.to(device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        # tied weights appear under every name (lm_head.weight and embed_tokens.weight)
        self._params = dict(self.model.named_parameters(remove_duplicate=False))
        self._params.update({k: v for k, v in self.model.named_buffers()
                             if k not in self._params})

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full tensors into the engine's model. Names not given keep their values
        (a partial update); an unknown name raises ValueError."""
        for name, tensor in named_tensors:
            target = self._params.get(name)
            if target is None:
                raise ValueError(f"update_weights: unknown parameter name {name!r}")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(tensor.to(target.device, target.dtype))

    @torch.no_grad()
    def generate(self, prompt_token_ids, n, params: SamplingParams):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        jobs = [(p, ids) for p, ids in enumerate(prompt_token_ids) for _ in range(n)]
        results: list[list[Completion]] = [[] for _ in prompt_token_ids]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        for start in range(0, len(jobs), self.max_batch_size):
            chunk = jobs[start:start + self.max_batch_size]
            for (p, _), comp in zip(chunk, self._generate_batch([ids for _, ids in chunk], params)):
                comp.prompt_index = p
                results[p].append(comp)
        return results

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        greedy = params.temperature <= 0
        kwargs = dict(do_sample=not greedy, max_new_tokens=params.max_new_tokens,
                      pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                      return_dict_in_generate=True, output_logits=params.return_logprobs)
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k if params.top_k > 0 else None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(input_ids=ids.to(self.device),
                                  attention_mask=mask.to(self.device), **kwargs)
        seqs = out.sequences[:, width:].cpu()
        logprobs = None
        if params.return_logprobs:
            logits = torch.stack(out.logits, dim=1).float().cpu()  # [B, steps, V]
            scale = 1.0 if greedy else 1.0 / params.temperature
            lp = torch.log_softmax(logits * scale, dim=-1)
            logprobs = lp.gather(2, seqs[:, :, None])[:, :, 0]
        completions = []
        for i in range(len(prompts)):
            row = seqs[i].tolist()
            if self.eos_id in row:
                cut, reason = row.index(self.eos_id), "stop"
            else:
                cut, reason = len(row), "length"
            tokens = row[:cut]
            completions.append(Completion(
                prompt_index=-1, token_ids=tokens, finish_reason=reason,
                text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                logprobs=logprobs[i, :cut].tolist() if logprobs is not None else None))
        return completions
