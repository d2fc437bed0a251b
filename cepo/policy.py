"""The trainable policy: a Hugging Face causal LM (optionally LoRA) sharded with FSDP2,
whose LM head is applied by the fused kernels of ``cepo_kernels``.

The root module is ``FusedHeadPolicy``: its forward runs the decoder body on a packed,
padding-free row, gathers the hidden states that predict response tokens, and either
returns them (teacher / policy scoring) or applies the fused PPO loss. The loss lives
inside the root forward so that FSDP2's hooks manage the LM head weight (tied or not)
like any other parameter: unsharded for the forward, gradient reduce-scattered after
the backward. Full-vocabulary logits are never formed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import cepo_kernels as ck
from cepo import model as hf_model_utils
from cepo.packing import PackedBatch


class FusedHeadPolicy(nn.Module):
    """Root module: HF causal LM body + fused head. ``self.lm`` may be a peft model."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    @property
    def base(self) -> nn.Module:
        """The plain Hugging Face causal LM (below any peft wrapper)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def head_weight(self) -> torch.Tensor:
        return hf_model_utils.lm_head_weight(self.base)

    @property
    def is_vl(self) -> bool:
        """True for a vision-language policy (Qwen3-VL / Qwen2.5-VL)."""
        from cepo.vision import is_vl_model
        return is_vl_model(self.base)

    def forward(self, batch: PackedBatch | None, index: torch.Tensor | None,
                targets: torch.Tensor | None = None, ppo: dict | None = None,
                distill: dict | None = None, *, images: list | None = None,
                encoded: dict | None = None, encode: list | None = None):
        """hidden [M, H] at ``index`` (rows predicting response tokens), or, with ``ppo``
        (keyword arguments of fused_linear_ppo_loss besides hidden/weight/targets),
        (loss, PPOStats) of those tokens. With ``distill`` (OPSD / SDPO: ``h_teacher`` [M, H],
        ``coef`` and the other keywords of fused_linear_self_distill_loss) the same hidden
        states also feed the self-distillation loss: (coef * distill_loss + pg_coef *
        ppo_loss, ...) as a ``SelfDistillOutput``, ``ppo`` then optional and carrying
        its weight as ``coef``.

        Vision-language policies (cepo.vision): ``images`` holds each packed sequence's
        ``ImageInputs`` (None: text only); ``encoded`` their embeddings computed earlier
        in the pass, or None to run the vision tower here on the micro-batch's distinct
        images (a trainable tower). ``encode=[ImageInputs, ...]`` instead returns
        ``cepo.vision.encode_images`` of them (inside the root forward, so FSDP2 gathers
        the tower's parameters)."""
        if encode is not None:
            from cepo.vision import encode_images
            return encode_images(self.base, encode)
        if self.is_vl:
            hidden = self._vl_hidden(batch, images, encoded)
        else:
            hidden = hf_model_utils.body_hidden_states(hf_model_utils.decoder_body(self.base),
                                                       batch)
        if not torch.isfinite(hidden).all():
            raise FloatingPointError(
                "non-finite hidden states from the decoder body: the model diverged or its "
                "weights are corrupt; lower lr, check the checkpoint, or use float32")
        h = hidden[index]
        if distill is not None:
            return self_distill_and_ppo(h, self.head_weight(), targets, ppo, distill)
        if ppo is None:
            return h
        return ck.fused_linear_ppo_loss(h, self.head_weight(), targets, **ppo)

    def _vl_hidden(self, batch, images, encoded):
        from cepo.vision import encode_images, packed_hidden_states

        images = list(images) if images is not None else [None] * batch.num_sequences
        anchor = None
        if encoded is None:  # every micro-batch runs the tower once (dummy image if none)
            encoded = encode_images(self.base, [im for im in images if im is not None])
            if "__dummy__" in encoded and torch.is_grad_enabled():
                anchor = sum(e.sum() + sum(d.sum() for d in ds)
                             for e, ds in encoded["__dummy__"])
        # anchor: zero, but every tower parameter gets its (zero) gradient, in the order a
        # real image's backward would give (packed_hidden_states)
        return packed_hidden_states(self.base, batch, images, encoded, anchor=anchor)


class SelfDistillOutput(NamedTuple):
    """What the root forward returns for OPSD / SDPO."""

    loss: torch.Tensor          # coef * distill_loss (+ pg_coef * ppo_loss), 0-dim
    ppo_stats: object | None    # PPOStats of the PPO term, None without one
    distill_stats: object       # the self-distillation op's statistics
    distill_loss: torch.Tensor  # coef * distill_loss, detached


def self_distill_and_ppo(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ppo: dict | None, distill: dict) -> SelfDistillOutput:
    """coef * self-distillation loss (+ pg_coef * PPO loss) on ONE student forward: both
    fused ops take the same hidden states [M, H], and autograd adds their gradients."""
    distill = dict(distill)
    coef, h_teacher = distill.pop("coef"), distill.pop("h_teacher")
    distill_loss, distill_stats = ck.fused_linear_self_distill_loss(h, h_teacher, weight,
                                                                    targets, **distill)
    loss = coef * distill_loss
    weighted = loss.detach()
    ppo_stats = None
    if ppo is not None:
        ppo = dict(ppo)
        pg_coef = ppo.pop("coef")
        pg_loss, ppo_stats = ck.fused_linear_ppo_loss(h, weight, targets, **ppo)
        loss = loss + pg_coef * pg_loss
    return SelfDistillOutput(loss, ppo_stats, distill_stats, weighted)


def decoder_layers(base: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a Hugging Face causal LM (each gets its own FSDP2 unit)."""
    body = hf_model_utils.decoder_body(base)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"model: cannot find decoder layers on {type(body).__name__}")
    return list(layers)


def shard(policy: FusedHeadPolicy, device: torch.device, *, bf16: bool, cpu_offload: bool):
    """FSDP2: fully_shard each decoder block, then the root (embeddings, norm, head).

    bf16 parameters with fp32 gradient reduction when ``bf16`` (the CUDA default); fp32
    otherwise. The root does not cast its forward inputs: the ``ppo=`` dict carries fp32
    old_logprobs / token_advantages / ref_logprobs that the fused loss must see unrounded
    (bf16 would put ~0.4% errors into the ratio exp(lp - old) and swamp the k3 KL); the
    root's own compute still runs in bf16 (its parameters are cast), and every decoder
    block casts its inputs as usual. Works for a world of one too, so one code path
    serves every launch.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if cpu_offload and device.type != "cuda":
        raise ValueError("config: 'cpu_offload' moves GPU parameters, gradients and optimizer "
                         "state to CPU memory; it needs device cuda (training on CPU already "
                         "keeps everything there)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = dict(mesh=mesh)
    root_kwargs = dict(mesh=mesh)
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                        reduce_dtype=torch.float32,
                                                        cast_forward_inputs=False)
    if cpu_offload:
        kwargs["offload_policy"] = root_kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(policy.base):
        fully_shard(layer, **kwargs)
    if policy.is_vl:  # the vision blocks too; patch embedding and mergers stay in the root
        from cepo.vision import vision_tower
        for block in vision_tower(policy.base).blocks:
            fully_shard(block, **kwargs)
    fully_shard(policy, **root_kwargs)
    return policy


def apply_lora(lm: nn.Module, rank: int, alpha: int, target_modules: list[str]) -> nn.Module:
    """Wrap with a peft LoRA adapter (dropout 0: RL log-probs must be deterministic). A
    vision-language model gets adapters in its language model only."""
    from peft import LoraConfig, get_peft_model

    from cepo.vision import is_vl_model, language_lora_targets

    targets = (language_lora_targets(list(target_modules)) if is_vl_model(lm)
               else list(target_modules))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(lm, config)
