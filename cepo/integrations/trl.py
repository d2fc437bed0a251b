"""TRL's GRPOTrainer on cepo's fused kernels, with CEPO as an option.

    from cepo.integrations.trl import CEPOGRPOTrainer

    trainer = CEPOGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                              train_dataset=...,              # rows {"prompt", "answer"}
                              cepo_lambda0=0.5, cepo_t_warm=25)   # 0.0: GRPO on the kernels

Three overrides, everything else is TRL's (generation, vLLM modes, rewards, advantages,
logging, checkpoints):

- ``_get_per_token_logps_and_entropies``: the decoder body for hidden states, then
  ``cepo_kernels.fused_logprobs`` through the LM head (old / reference log-probs).
- ``_compute_loss``: ``cepo_kernels.fused_linear_ppo_loss`` (PPO clip with TRL's
  epsilon / epsilon_high, its loss_type aggregation, the k3 KL with beta (bias-corrected
  or not), vLLM importance-sampling ratios), so no [tokens x vocab] logits are materialised.
- ``_generate_and_score_completions`` (with ``cepo_lambda0 > 0``): after TRL has scored
  the batch, the correct- and wrong-answer teacher contexts are built from its prompts,
  completions, rewards and the dataset's answer column, and the sequence advantages
  become CEPO token advantages (``contrastive_evidence``), lambda from ``lambda_at`` on the
  optimizer step.

Loss types: grpo, bnpo, dr_grpo, dapo (TRL's default). Settings the fused loss does not
reproduce raise ValueError at construction, naming the field: other loss types, sequence-
level importance sampling, ``delta``, ``off_policy_mask_threshold``,
``top_entropy_quantile < 1``, an entropy bonus, MoE router aux loss, and vision-language
inputs. The KL term (beta > 0) goes through the PPO kernel's fused k3 term where TRL's KL
is exactly that (bnpo / dr_grpo / dapo without ``use_bias_correction_kl``), else through
``fused_logprobs`` (one more pass through the head; TRL's default bias-corrected KL).
"""

from __future__ import annotations

import random
import warnings
from typing import Callable

import torch

try:
    import trl
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError('cepo.integrations.trl needs TRL: pip install "cepo[trl]"') from e

import cepo_kernels as ck
from cepo.contexts import ANSWER_ONLY_TEMPLATE
from cepo.integrations.cepo_batch import (CEPOOptions, completion_text, hinted_trl_prompt,
                                          token_advantages, wrong_answers_per_rollout)
from cepo.integrations.head import (completion_rows, completion_targets,
                                    install_head_hook, no_autocast, run_head)

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
TESTED_TRL = "1.16."
"""The adapter overrides GRPOTrainer's private methods; it is tested against this series."""

if not trl.__version__.startswith(TESTED_TRL):
    warnings.warn(f"cepo.integrations.trl is tested with TRL {TESTED_TRL}x, found "
                  f"{trl.__version__}: it overrides private GRPOTrainer methods, so check "
                  f"tests/test_trl_integration.py passes", stacklevel=2)
VISION_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
               "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
               "mm_token_type_ids", "image_position_ids")


class CEPOGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with cepo's fused LM-head kernels and optional CEPO.

    Extra keyword arguments (all others go to GRPOTrainer unchanged):
      cepo_lambda0: lambda at step 0 (0 = plain GRPO on the fused kernels; paper: 0.5);
      cepo_t_warm, cepo_schedule: lambda decays to 0 over t_warm optimizer steps
        (linear | cosine | constant);
      cepo_eps_w: token weights clipped to 1 +- eps_w (0.2);
      cepo_algo: "cepo" (wrong-answer teacher, RLSD fallback) or "rlsd";
      cepo_hint_template: how the hint follows the user message (default: the answer alone);
      cepo_answer_column: the dataset column holding the gold answer ("answer");
      cepo_wrong_answer_strategy: worst | most_frequent | random;
      cepo_correct_threshold: total reward at or above which a rollout is correct (1.0);
      cepo_answer_extraction: how answers are read (boxed | last_number | math_verify, as
        cepo.answers.extract_answer; default boxed: the last \\boxed{});
      cepo_answer_extractor: a callable (completion text -> final answer) instead;
      kernels_backend: force a cepo_kernels backend ("triton" | "torch" | "reference").
    """

    def __init__(self, *args, cepo_lambda0: float = 0.0, cepo_t_warm: int = 25,
                 cepo_schedule: str = "linear", cepo_eps_w: float = 0.2, cepo_algo: str = "cepo",
                 cepo_hint_template: str = ANSWER_ONLY_TEMPLATE, cepo_answer_column: str = "answer",
                 cepo_wrong_answer_strategy: str = "worst", cepo_correct_threshold: float = 1.0,
                 cepo_answer_extraction: str = "boxed",
                 cepo_answer_extractor: Callable[[str], str | None] | None = None,
                 kernels_backend: str | None = None, **kwargs):
        self.cepo = CEPOOptions(
            lambda0=cepo_lambda0, t_warm=cepo_t_warm, schedule=cepo_schedule, eps_w=cepo_eps_w,
            algo=cepo_algo, hint_template=cepo_hint_template, answer_column=cepo_answer_column,
            wrong_answer_strategy=cepo_wrong_answer_strategy,
            correct_threshold=cepo_correct_threshold, answer_extraction=cepo_answer_extraction,
            answer_extractor=cepo_answer_extractor)
        if kernels_backend is not None and kernels_backend not in ck.BACKENDS:
            raise ValueError(f"kernels_backend must be one of {ck.BACKENDS} or None, "
                             f"got {kernels_backend!r}")
        self.kernels_backend = kernels_backend
        self._cepo_scored = None
        super().__init__(*args, **kwargs)
        self._check_supported()

    # ---- configuration ---------------------------------------------------------------

    def _check_supported(self) -> None:
        """Raise ValueError for TRL settings the fused loss does not reproduce."""
        args = self.args
        fix = "; use trl.GRPOTrainer for it"
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: CEPOGRPOTrainer supports "
                             f"{SUPPORTED_LOSS_TYPES}{fix}")
        if self.importance_sampling_level != "token":
            raise ValueError(f"importance_sampling_level={self.importance_sampling_level!r}: "
                             f"only 'token' is fused{fix}")
        checks = [("delta", getattr(args, "delta", None) is not None),
                  ("off_policy_mask_threshold", self.off_policy_mask_threshold is not None),
                  ("top_entropy_quantile", self.top_entropy_quantile < 1.0),
                  ("entropy_coef / use_adaptive_entropy", self._entropy_bonus_enabled),
                  ("router_aux_loss_coef (MoE aux loss)", self.aux_loss_enabled)]
        for name, unsupported in checks:
            if unsupported:
                raise ValueError(f"{name}: not supported by cepo's fused PPO loss{fix}")
        if self.cepo.enabled and getattr(self, "environment_factories", None) is not None:
            raise ValueError("cepo_lambda0 > 0 with environment_factory: CEPO's teacher contexts "
                             "are built from single-turn prompts; set cepo_lambda0=0 (fused "
                             "GRPO) or use trl.GRPOTrainer")
        if getattr(self, "_is_vlm", False):
            raise ValueError(f"vision-language models are not supported by the TRL adapter{fix}")
        install_head_hook(self.model)  # raises ValueError for heads the kernels cannot reproduce
        if self.ref_model is not None:
            install_head_hook(self.ref_model)

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    @staticmethod
    def _reject_vision(kwargs) -> None:
        present = [k for k in VISION_KEYS if kwargs.get(k) is not None]
        if present:
            raise ValueError(f"CEPOGRPOTrainer: vision inputs {present} are not supported by "
                             f"the fused path; use trl.GRPOTrainer")

    # ---- log-probs -------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False,
                                           compute_aux_loss=False, **vision):
        """TRL's (log-probs [B, T], entropies [B, T] or None, None), through fused_logprobs
        inside the model's forward (install_head_hook)."""
        self._reject_vision(vision)
        self._install_head_hook(model)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start:start + batch_size]
            attn = attention_mask[start:start + batch_size]
            targets = completion_targets(ids[:, -logits_to_keep:], attn[:, -logits_to_keep:])

            def head_fn(hidden, head):
                h, weight = completion_rows(hidden, head, logits_to_keep)
                with no_autocast(h.device):
                    return ck.fused_logprobs(h, weight, targets.reshape(-1),
                                             temperature=self.temperature,
                                             return_entropy=compute_entropy,
                                             backend=self.kernels_backend)

            with self.accelerator.autocast():
                out = run_head(model, ids, attn, head_fn)
            logps.append(out.logprobs.view(ids.size(0), logits_to_keep))
            if compute_entropy:
                entropies.append(out.entropy.view(ids.size(0), logits_to_keep))
        return (torch.cat(logps, 0), torch.cat(entropies, 0) if compute_entropy else None, None)

    def _install_head_hook(self, model) -> None:
        install_head_hook(self.accelerator.unwrap_model(model))

    # ---- loss ------------------------------------------------------------------------

    def _loss_normalizer(self, inputs, mask: torch.Tensor, mode: str) -> float:
        """The scalar TRL divides the masked token-loss sum by, for the fused loss_types
        (grpo's per-sequence 1 / |o_i| is folded into the advantages instead)."""
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        batch = mask.size(0)
        if self.loss_type == "grpo":
            return float(batch * accum)
        if self.loss_type == "bnpo":
            return float(mask.sum().clamp(min=1.0)) * accum
        if self.loss_type == "dr_grpo":
            return float(batch * self.max_completion_length * accum)
        norm = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            norm = norm * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return float(norm)

    def _compute_loss(self, model, inputs):
        """TRL's policy loss (and its metrics) with fused_linear_ppo_loss: no [B*T, V] logits."""
        self._reject_vision(inputs)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        batch, length = completion_ids.shape
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mode = self._mode()

        advantages = inputs["advantages"].float()
        if advantages.dim() == 1:
            advantages = advantages[:, None]
        advantages = advantages.expand(batch, length)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL scales the per-token loss by this ratio (>= 0); the clipped surrogate is
            # positively homogeneous in A, so scaling A is the same thing
            advantages = advantages * inputs["importance_sampling_ratio"].float()
        if self.loss_type == "grpo":
            advantages = advantages / mask.sum(-1, keepdim=True).clamp(min=1.0)
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        # the kernel's own k3 term has one weight for every token and no importance ratio:
        # TRL's KL goes through it when that is what TRL computes, else through fused_logprobs
        fused_kl = ref is not None and self.loss_type != "grpo" and not self._bias_corrected_kl
        normalizer = self._loss_normalizer(inputs, mask, mode)
        targets = completion_targets(completion_ids, completion_mask).reshape(-1)

        def head_fn(hidden, head):
            h, weight = completion_rows(hidden, head, length)
            with no_autocast(h.device):
                loss, stats = ck.fused_linear_ppo_loss(
                    h, weight, targets, None if old is None else old.float().reshape(-1),
                    advantages.contiguous().reshape(-1), mask.bool().reshape(-1),
                    clip_low=self.epsilon_low, clip_high=self.epsilon_high,
                    temperature=self.temperature, normalizer=normalizer,
                    ref_logprobs=ref.float().reshape(-1) if fused_kl else None,
                    kl_coef=float(self.beta) if fused_kl else 0.0, return_entropy=True,
                    backend=self.kernels_backend)
                if ref is not None and not fused_kl:
                    loss = loss + self._kl_loss(h, weight, targets, old, ref, mask, normalizer)
            return loss, stats

        self._install_head_hook(model)
        with self.accelerator.autocast():
            loss, stats = run_head(model, input_ids, attention_mask, head_fn)
        self._log_loss_metrics(mode, stats, inputs, mask, old, ref)
        return loss

    @property
    def _bias_corrected_kl(self) -> bool:
        return bool(getattr(self.args, "use_bias_correction_kl", False))

    def _kl_loss(self, hidden, weight, targets, old, ref, mask, normalizer) -> torch.Tensor:
        """beta * TRL's per-token k3 KL (times the importance ratio with
        use_bias_correction_kl), aggregated like the policy term: differentiable log-probs
        from fused_logprobs (one more pass through the head, still no [N, V] logits)."""
        logps = ck.fused_logprobs(hidden, weight, targets, temperature=self.temperature,
                                  backend=self.kernels_backend).logprobs.view(mask.shape)
        diff = ref.float() - logps
        kl = torch.exp(diff) - diff - 1
        if self._bias_corrected_kl:
            kl = kl * torch.exp(logps - (logps.detach() if old is None else old.float()))
        mask = mask.float()
        if self.loss_type == "grpo":
            mask = mask / mask.sum(-1, keepdim=True).clamp(min=1.0)
        return self.beta * (kl * mask).sum() / normalizer

    def _log_loss_metrics(self, mode, stats, inputs, mask, old, ref) -> None:
        """The metrics TRL logs for these loss types, from the kernel's detached log-probs."""
        mask = mask.float()
        logps = stats.logprobs.view(mask.shape)

        def global_mean(local_sum, local_count):
            totals = self.accelerator.reduce(torch.stack([local_sum.float(), local_count.float()]),
                                             reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_mean(x):
            return global_mean((x * mask).sum(), mask.sum())

        ratio = torch.exp(logps - (logps if old is None else old.float()))
        if ref is not None:
            diff = ref.float() - logps
            kl = torch.exp(diff) - diff - 1
            self._metrics[mode]["kl"].append(masked_mean(kl * ratio if self._bias_corrected_kl else kl))
        self._metrics[mode]["entropy"].append(
            global_mean(stats.entropy * stats.num_tokens, torch.as_tensor(stats.num_tokens)))
        adv = inputs["advantages"]
        adv = adv[:, None] if adv.dim() == 1 else adv
        low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).float()
        self._metrics[mode]["clip_ratio/low_mean"].append(masked_mean(low))
        self._metrics[mode]["clip_ratio/high_mean"].append(masked_mean(high))
        self._metrics[mode]["clip_ratio/region_mean"].append(masked_mean(torch.maximum(low, high)))
        per_seq = lambda x: (x * mask).sum(-1) / mask.sum(-1)  # noqa: E731 (NaN for empty rows, as TRL)
        self._metrics[mode]["clip_ratio/low_min"].append(
            torch.nan_to_num(self.accelerator.gather(per_seq(low)), nan=float("inf")).min().item())
        self._metrics[mode]["clip_ratio/high_max"].append(
            torch.nan_to_num(self.accelerator.gather(per_seq(high)), nan=float("-inf")).max().item())

    # ---- CEPO ------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards, kept (with the batch they score) for the CEPO teacher contexts."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions,
                                                      completion_ids_list)
        self._cepo_scored = (inputs, prompts, completions, rewards_per_func)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        """TRL's batch; with CEPO on (training, lambda > 0) its advantages become [B, T]."""
        self._cepo_scored = None
        output = super()._generate_and_score_completions(inputs)
        if self.cepo.enabled and self._mode() == "train" and self._cepo_scored is not None:
            lam = self.cepo.lam(self.state.global_step)
            self._metrics["train"]["cepo/lambda"].append(lam)
            if lam > 0.0:
                output["advantages"] = self._cepo_token_advantages(output, lam)
        self._cepo_scored = None
        return output

    def _cepo_teacher_contexts(self, output):
        """Per local rollout: (policy, correct-teacher, wrong-teacher or None) prompt ids."""
        from accelerate.utils import gather_object

        inputs, prompts, completions, rewards_per_func = self._cepo_scored
        column = self.cepo.answer_column
        if any(column not in x for x in inputs):
            raise ValueError(f"cepo_answer_column={column!r}: the dataset rows need this column "
                             f"(the gold answer the correct-answer teacher is shown); rows have "
                             f"{sorted(inputs[0])}")
        weights = self.reward_weights.to(rewards_per_func.device)[None]
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = float("nan")
        texts = gather_object([completion_text(c) for c in completions])
        golds = gather_object([x[column] for x in inputs])
        rng = random.Random(f"{self.args.seed}-{self.state.global_step}")
        wrong = wrong_answers_per_rollout(texts, rewards.tolist(), golds, self.num_generations,
                                          options=self.cepo, rng=rng)
        start = self.accelerator.process_index * len(prompts)
        wrong = wrong[start:start + len(prompts)]
        if self.cepo.algo == "rlsd":
            wrong = [None] * len(prompts)
        local_golds = golds[start:start + len(prompts)]
        template = self.cepo.hint_template
        policy = [ids[m.bool()].tolist() for ids, m in zip(output["prompt_ids"], output["prompt_mask"])]
        pos = self._tokenize_prompts([hinted_trl_prompt(p, str(g), template)
                                      for p, g in zip(prompts, local_golds)])[0]
        has_neg = [i for i, w in enumerate(wrong) if w is not None]
        neg: list[list[int] | None] = [None] * len(prompts)
        if has_neg:
            ids = self._tokenize_prompts([hinted_trl_prompt(prompts[i], wrong[i], template)
                                          for i in has_neg])[0]
            for i, row in zip(has_neg, ids):
                neg[i] = list(row)
        return policy, [list(p) for p in pos], neg

    def _cepo_token_advantages(self, output, lam: float) -> torch.Tensor:
        """CEPO token advantages [B, T] for TRL's scored batch (its advantages are A)."""
        policy, pos, neg = self._cepo_teacher_contexts(output)
        self._install_head_hook(self.model)
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(getattr(self.processing_class, "tokenizer", None), "pad_token_id", None)

        def run(ids, attn, fn):
            with self.accelerator.autocast():
                return run_head(self.model, ids, attn, fn)

        adv, metrics = token_advantages(
            run, policy_contexts=policy, pos_contexts=pos, neg_contexts=neg,
            completion_ids=output["completion_ids"], completion_mask=output["completion_mask"],
            advantages=output["advantages"], lam=lam, eps_w=self.cepo.eps_w,
            temperature=self.temperature, pad_id=pad_id if pad_id is not None else 0,
            batch_size=self.args.per_device_train_batch_size, backend=self.kernels_backend)
        for name, value in metrics.items():
            self._metrics["train"][name].append(value)
        return adv
