"""The parts of a run, built from its config: tokenizer, data, policy, reference, sampler,
optimizer. Each builder takes the config and returns one thing; ``cepo.train`` wires them."""

from __future__ import annotations

import logging
import math

import torch

from cepo.config import BUILTIN_TASK, TINY_MODEL, TrainConfig
from cepo.data import Example, load_examples
from cepo.policy import FusedHeadPolicy, apply_lora, shard
from cepo.weight_sync import iter_weight_buckets

log = logging.getLogger("cepo")


def load_tokenizer(cfg: TrainConfig):
    """The model's tokenizer (local files only), with a pad token (EOS when it has none).
    ``local_files_only`` / ``is_local`` are loading details: they are not written into an exported
    tokenizer_config.json."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    for loading_detail in ("local_files_only", "is_local"):
        tokenizer.init_kwargs.pop(loading_detail, None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _builtin(split: str, n: int, seed: int, n_ops: int | None = None) -> list[Example]:
    from cepo.arithmetic import make_split
    return [Example(r["prompt"], r["answer"], f"arithmetic-{split}[{i}]", r["solution"])
            for i, r in enumerate(make_split(split, n, seed, n_ops))]


VISION_TASK = "builtin:vision_arithmetic"
"""The built-in arithmetic task in image form (cepo.vision_arith.BUILTIN_TASK)."""


def load_datasets(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples: the built-in task's splits (held out: ``cfg.eval_split``),
    or user files / datasets."""
    from cepo.vision import is_vl_checkpoint

    images = (dict(image_field=cfg.image_field, max_pixels=cfg.max_pixels)
              if is_vl_checkpoint(cfg.model) else {})

    def load(path):
        return load_examples(path, prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
                             on_bad_row=cfg.on_bad_row, solution_field=cfg.solution_field,
                             **images)

    def held_out():
        return _builtin(cfg.eval_split, cfg.num_eval, cfg.eval_seed, cfg.arith_ops)

    if cfg.train_data == VISION_TASK:  # the arithmetic task in image form (tiny-vl.yaml)
        from cepo.vision_arith import examples as vision_examples

        train = vision_examples("train", cfg.num_train, cfg.seed)
        if cfg.eval_data in (None, VISION_TASK):
            return train, vision_examples(cfg.eval_split, cfg.num_eval, cfg.eval_seed)
        return train, load(cfg.eval_data)[: cfg.num_eval]
    if cfg.train_data == BUILTIN_TASK:
        train = _builtin("train", cfg.num_train, cfg.seed, cfg.arith_ops)
        evals = (load(cfg.eval_data)[: cfg.num_eval]
                 if cfg.eval_data and cfg.eval_data != BUILTIN_TASK else held_out())
        return train, evals
    train = load(cfg.train_data)
    if cfg.eval_data == BUILTIN_TASK:  # your training data, the built-in held-out set
        return train, held_out()
    return train, load(cfg.eval_data)[: cfg.num_eval] if cfg.eval_data else []


def drop_long_prompts(examples: list[Example], render, max_tokens: int,
                      what: str, prepare=None) -> list[Example]:
    """The examples whose rendered prompt has at most ``max_tokens`` tokens (0: all),
    with a warning counting those dropped; an error if none is left. ``prepare``
    (vision-language models: ``ImagePreparer.prepare``) expands the image placeholders
    first, so image tokens count."""
    if max_tokens <= 0 or not examples:
        return examples
    kept = [ex for ex in examples
            if len(render((prepare(ex) if prepare else ex).prompt)) <= max_tokens]
    if len(kept) < len(examples):
        log.warning("data: dropped %d of %d %s prompts longer than max_prompt_tokens=%d "
                    "(rendered with the chat template)", len(examples) - len(kept),
                    len(examples), what, max_tokens)
    if not kept:
        raise ValueError(f"config: 'max_prompt_tokens'={max_tokens} drops every {what} prompt; "
                         "raise it (or 0 for no limit)")
    return kept


def warn_about_settings(cfg: TrainConfig) -> None:
    """Say so when a real checkpoint is trained with settings that suit only the tiny model."""
    from pathlib import Path

    if cfg.model == TINY_MODEL or Path(cfg.model).resolve().parent == Path(TINY_MODEL).parent:
        return  # a shipped tiny model (cepo/assets: tiny-arith, tiny-vl)
    if cfg.lr > 5e-5 and cfg.lora_rank == 0:
        log.warning("lr %.3g with full fine-tuning moves every weight of a pretrained model "
                    "by about lr per update; the paper trains at 5e-6 (CEPO) / 1e-6 (GRPO). "
                    "Lower --lr, or train LoRA (--lora_rank 16 --lora_alpha 32)", cfg.lr)
    if cfg.lora_rank == 0:
        log.info("full fine-tuning of %s; LoRA (--lora_rank 16 --lora_alpha 32, as the paper's "
                 "runs) needs far less memory", cfg.model)


def compute_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the run computes in bf16 (parameters bf16, fp32 reduction): CUDA with dtype
    auto or bfloat16; fp32 everywhere else."""
    return device.type == "cuda" and cfg.dtype in ("auto", "bfloat16")


def attention_for(cfg: TrainConfig, device: torch.device) -> str:
    """The attention implementation: the configured one (checked against the compute
    dtype: flash-attn refuses fp32) or the default for this device and dtype."""
    from cepo.model import check_attn_implementation, default_attn_implementation

    dtype = torch.bfloat16 if compute_bf16(cfg, device) else torch.float32
    attn = cfg.attn_implementation or default_attn_implementation(device, dtype)
    check_attn_implementation(attn, dtype)
    return attn


def build_policy(cfg: TrainConfig, device: torch.device) -> FusedHeadPolicy:
    """The trainable policy (optionally LoRA), sharded with FSDP2."""
    from cepo.model import load_causal_lm

    bf16 = compute_bf16(cfg, device)
    attn = attention_for(cfg, device)
    lm = load_causal_lm(cfg.model, dtype=torch.float32, attn_implementation=attn)
    from cepo.vision import is_vl_model, vision_tower
    if is_vl_model(lm) and not cfg.train_vision:
        vision_tower(lm).requires_grad_(False)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank > 0:
        lm = apply_lora(lm, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
    lm.to(device)
    policy = FusedHeadPolicy(lm)
    shard(policy, device, bf16=bf16, cpu_offload=cfg.cpu_offload)
    return policy


def build_reference(cfg: TrainConfig, device: torch.device) -> FusedHeadPolicy:
    """A frozen copy of the initial policy for the k3 KL (only when kl_coef > 0)."""
    from cepo.model import load_causal_lm

    attn = attention_for(cfg, device)
    ref = FusedHeadPolicy(load_causal_lm(cfg.model, dtype=torch.float32, attn_implementation=attn))
    ref.requires_grad_(False)
    ref.to(device)
    shard(ref, device, bf16=compute_bf16(cfg, device), cpu_offload=cfg.cpu_offload)
    return ref


def build_image_preparer(cfg: TrainConfig, tokenizer):
    """The image processor of a vision-language checkpoint (None for a text model), with
    the tokenizer checked to spell the model's vision tokens."""
    from cepo.vision import ImagePreparer, check_vision_tokens, is_vl_checkpoint

    if not is_vl_checkpoint(cfg.model):
        return None
    from transformers import AutoConfig

    check_vision_tokens(tokenizer, AutoConfig.from_pretrained(cfg.model, local_files_only=True))
    return ImagePreparer(cfg.model, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels)


def build_sampler(cfg: TrainConfig, tokenizer, info):
    """The generation engine: vLLM when asked / available on CUDA, else Hugging Face."""
    import importlib.util

    from cepo.sampler import HFEngine
    from cepo.sampler.vllm_engine import VLLMEngine, choose_engine

    name, warning = choose_engine(cfg.engine, info.device.type,
                                  importlib.util.find_spec("vllm") is not None)
    if warning and info.is_main:
        log.warning(warning)
    if name == "vllm":
        return VLLMEngine(cfg.model, tokenizer=tokenizer, seed=cfg.seed, rank=info.rank,
                          gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                          dtype=torch.bfloat16 if compute_bf16(cfg, info.device) else torch.float32)
    return HFEngine(cfg.model, tokenizer=tokenizer, device=info.device,
                    max_batch_size=cfg.generation_batch_size, lean=cfg.lean_decode)


def build_optimizer(cfg: TrainConfig, policy):
    """AdamW over the trainable parameters and its schedule: linear warm-up, then cosine
    decay to ``min_lr_ratio`` of the peak at the last step."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def sync_sampler(policy, sampler) -> None:
    """Stream the current (LoRA-merged) weights into the sampler, one bucket at a time."""
    for bucket in iter_weight_buckets(policy.lm):
        sampler.update_weights(bucket)
