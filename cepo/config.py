"""Training configuration: one dataclass, YAML files and command-line overrides via jsonargparse.

``python -m cepo.train --help`` lists every option with its text and default;
``--config run.yaml`` loads a YAML file (see cepo/configs/), and any flag after it
overrides the file. Unknown options are rejected with the option's name.

The defaults below are the paper's settings for a real (billion-parameter) model: lr
5e-6, 32 prompts x 8 rollouts, 50 steps. The embedded default (no ``--model``) is
different: the shipped tiny model learns at lr 1e-4 with its own settings, kept in
``cepo/configs/tiny-arith.yaml`` and applied only when ``--model`` is not given and no
``--config`` is.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

BUILTIN_TASK = "builtin:arithmetic"
TINY_MODEL = str(Path(__file__).parent / "assets" / "tiny-arith")
CONFIG_DIR = Path(__file__).parent / "configs"
TINY_CONFIG = str(CONFIG_DIR / "tiny-arith.yaml")
ALGOS = ("grpo", "rlsd", "cepo", "opsd", "sdpo")
DIVERGENCES = ("jsd", "forward_kl", "reverse_kl")


@dataclass
class TrainConfig:
    """GRPO / RLSD / CEPO / OPSD / SDPO training of a Hugging Face causal LM."""

    # --- algorithm -------------------------------------------------------------------
    algo: Literal["grpo", "rlsd", "cepo", "opsd", "sdpo"] = "cepo"
    """grpo: lambda = 0; rlsd: D = lp_pos - lp_policy; cepo: D = lp_pos - lp_neg; opsd / sdpo:
    self-distillation from the policy given the reference solution (opsd) or a successful
    rollout of the same group (sdpo); see docs/algorithm.md."""
    lam0: float = 0.5
    """Initial lambda: weight of the token-level evidence in the token advantage."""
    lam_schedule: Literal["linear", "constant", "cosine"] = "linear"
    """How lambda decays from lam0 to 0 over t_warm steps."""
    t_warm: int = 25
    """Steps over which lambda decays to 0 (linear / cosine)."""
    eps_w: float = 0.2
    """Token weights are clipped to [1 - eps_w, 1 + eps_w]."""
    clip_low: float = 0.2
    """PPO ratio clip below: 1 - clip_low."""
    clip_high: float = 0.28
    """PPO ratio clip above: 1 + clip_high (clip-higher)."""
    std_normalize: bool = True
    """Divide group advantages by the group std (False: Dr.GRPO)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL to the frozen initial policy (0: no reference model)."""
    wrong_answer_strategy: Literal["worst", "most_frequent", "random"] = "worst"
    """Which rejected rollout of a group supplies the wrong-answer hint."""
    hint_template: str = "{answer}"
    """Teacher hint appended to the prompt ({answer} is replaced); see cepo.contexts."""
    clip_dual: Optional[float] = None
    """PPO dual-clip: the loss of a negative-advantage token is at most clip_dual * |A| (ratio
    capped at clip_dual); None: off. EasyR1 and verl use 3.0; must be > 1."""
    loss_agg: Literal["token", "seq"] = "token"
    """How per-token losses are averaged: token = mean over all trained tokens of the batch;
    seq = mean over trained sequences of each sequence's token mean."""
    distill_divergence: Literal["jsd", "forward_kl", "reverse_kl"] = "jsd"
    """opsd / sdpo: divergence between teacher and student next-token distributions; jsd is
    the generalised Jensen-Shannon divergence with distill_beta (both papers' default)."""
    distill_beta: float = 0.5
    """opsd / sdpo: JSD interpolation in [0, 1]; 0 = forward KL(teacher || student),
    1 = reverse KL(student || teacher), as in both papers (used by divergence jsd only)."""
    distill_coef: float = 1.0
    """opsd / sdpo: weight of the self-distillation loss."""
    distill_pg_coef: float = 0.0
    """opsd / sdpo: weight of the PPO/GRPO term (group advantages) added to the distillation
    loss on the same forward pass; 0 (default) = pure distillation, as both papers train."""
    opsd_template: str = ("{prompt}\n\nHere is a reference solution to this problem:\n{solution}"
                          "\n\nNow solve the problem yourself, step by step, reaching the same "
                          "final answer.")
    """opsd: the teacher's user message; {solution} is the dataset's solution_field when the
    row has one, else its answer; {answer} (instead of {solution}) is always the answer."""
    sdpo_template: str = ("{prompt}\nCorrect solution:\n\n{demonstration}\n\n"
                          "Correctly solve the original question.")
    """sdpo: the teacher's user message (the SDPO reference's reprompt layout); {demonstration}
    is a successful rollout of the same group."""
    sdpo_failed_only: bool = False
    """sdpo: distil only the failed rollouts (false: also a success that has another success
    in its group to learn from, as the SDPO reference code does)."""
    max_bad_steps: int = 3
    """Stop the run after this many consecutive steps whose loss or gradient norm is NaN/inf
    (each such step skips the optimizer step and is counted in nonfinite_update)."""
    hint_source: Literal["answer", "cot_prefix", "cot_suffix"] = "answer"
    """What the teachers' hints are: answer = the gold answer / the wrong rollout's extracted
    answer; cot_prefix / cot_suffix = the first / last hint_tokens generated tokens of the
    group's best correct rollout (teacher +; the gold answer when none is correct) and of its
    wrong-answer rollout (teacher -). See docs/algorithm.md step 2."""
    hint_tokens: int = 200
    """Tokens of a rollout used as a chain-of-thought hint (hint_source cot_prefix / cot_suffix)."""
    teacher: Literal["policy", "initial", "lagged"] = "policy"
    """Weights that score the teacher contexts: policy = the current policy; initial = the
    frozen initial model (LoRA: adapters disabled, no copy); lagged = a copy of the policy
    refreshed every teacher_sync_every steps (saved with the checkpoints)."""
    teacher_sync_every: int = 10
    """teacher lagged: copy the policy into the teacher at the start of every step whose
    0-based index is a multiple of this."""

    # --- model -----------------------------------------------------------------------
    model: str = TINY_MODEL
    """Local path of a Hugging Face causal LM (Qwen2/2.5/3, Llama, Mistral)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Parameter dtype for compute: auto = bf16 params with fp32 reduction on CUDA, fp32 on CPU."""
    attn_implementation: Optional[str] = None
    """Attention kernel (flash_attention_2 / sdpa / eager); default: flash-attn if installed on CUDA, else sdpa."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward (activation checkpointing)."""
    cpu_offload: bool = False
    """FSDP2 CPU offload of parameters, gradients and optimizer state."""
    lora_rank: int = 0
    """LoRA rank via peft (0: full fine-tuning). Reference runs use 16."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"])
    """Modules that receive LoRA adapters (vision-language models: in the language model only)."""
    train_vision: bool = False
    """Vision-language models (Qwen3-VL / Qwen2.5-VL): also train the vision tower (full
    fine-tuning only); false keeps it frozen, as the paper's runs do."""

    # --- data ------------------------------------------------------------------------
    train_data: str = BUILTIN_TASK
    """builtin:arithmetic, a .jsonl / .parquet file, a saved datasets dir, or a HF dataset name."""
    eval_data: Optional[str] = None
    """Held-out data (same formats, or builtin:arithmetic for the built-in test split);
    default: the built-in task's test split when training on it, else none."""
    prompt_field: str = "prompt"
    """Field holding the prompt."""
    answer_field: str = "answer"
    """Field holding the ground-truth answer."""
    solution_field: str = "solution"
    """Field holding a worked reference solution, read when present (opsd's privileged
    information; the built-in task has one)."""
    on_bad_row: Literal["skip", "error"] = "skip"
    """Rows without a prompt or answer: skip them (reported) or stop with an error."""
    num_train: int = 2000
    """Problems generated for the built-in task's train split."""
    num_eval: int = 200
    """Held-out problems evaluated (built-in test split size, or the first N of eval_data)."""
    eval_seed: int = 0
    """Seed of the built-in held-out split: fixed, so runs with different seeds share one eval set."""
    eval_split: Literal["dev", "test"] = "dev"
    """Which built-in held-out split is evaluated (when training on the built-in task without
    --eval_data, or with --eval_data builtin:arithmetic): dev, for choosing settings (the
    embedded default and the sweep report on it; it is the set called "test" before the
    dev/test separation, so earlier results are dev figures), or test, which no setting was
    chosen on (cepo.compare reports on it). See cepo.arithmetic."""
    arith_ops: Optional[int] = None
    """Operations per built-in problem (train and held-out): none = 2 or 3, the task the
    shipped tiny model was trained on; 4-12 = the longer-problem setting (the shipped model
    stops after 3 lines: it needs a model that writes longer solutions, and max_new_tokens
    of about 12 per operation)."""
    system_prompt: Optional[str] = None
    """A system message put before every prompt (chat template) or above it (plain text)."""
    chat_template: bool = True
    """Render prompts with the tokenizer's chat template (false: plain text + newline)."""
    max_prompt_tokens: int = 0
    """Drop prompts longer than this many tokens once rendered (0: keep all); the count
    dropped is reported."""
    image_field: str = "images"
    """Vision-language models: the field holding each row's images (paths relative to the
    data file, raw bytes or datasets.Image values); the prompt has one <image> per image."""
    max_pixels: int = 1048576
    """Vision-language models: the image processor's pixel budget (its resize upper bound);
    an image with more pixels is a bad row (see on_bad_row)."""
    min_pixels: Optional[int] = None
    """Vision-language models: the image processor's lower resize bound (default: the
    checkpoint's preprocessor_config.json)."""

    # --- rollouts --------------------------------------------------------------------
    prompts_per_step: int = 32
    """Prompts per step (global, over all ranks)."""
    group_size: int = 8
    """Rollouts per prompt (G)."""
    max_new_tokens: int = 1024
    """Longest response."""
    temperature: float = 1.0
    """Sampling temperature (also used for the log-probs of the loss)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    engine: Literal["auto", "hf", "vllm"] = "auto"
    """Sampler engine: vllm when installed and on CUDA, else Hugging Face generate."""
    generation_batch_size: int = 64
    """Sequences per generate call (Hugging Face engine)."""
    lean_decode: bool = True
    """Hugging Face engine: run the decoding steps of Llama / Qwen2 / Qwen3 text models
    through cepo.sampler.lean_decoder (the model's weights, ~25 operations a layer, a
    preallocated KV cache) instead of the model's forward; other models always use their
    forward. False: the model's own forward at every step (slower, same tokens)."""
    vllm_gpu_memory_utilization: float = 0.35
    """The share of GPU memory vLLM takes while awake (weights + KV cache). Leave room for
    the policy shard, gradients and AdamW state (about 16 bytes per parameter divided by
    the world size): lower it for bigger models, raise it for LoRA."""
    logprob_check: bool = True
    """Ask the sampler for its token log-probs and log their difference from the trainer's
    (logprob_diff_mean / _max, trained tokens, weights before the update) every step: a
    guard against silent weight-sync bugs. Measured with the HF engine in fp32: ~1e-7 on
    the tiny model, ~2e-5 on SmolLM2-135M (batched, padded generation vs packed scoring);
    expect ~1e-2 with vLLM in bf16; top_p < 1 adds a real difference (the sampler
    renormalises)."""
    logprob_diff_warn: float = 0.1
    """Warn when logprob_diff_mean exceeds this."""

    # --- verifier --------------------------------------------------------------------
    verifier_timeout: float = 5.0
    """Hard per-item timeout of math-verify (seconds); a timeout scores 0."""
    verifier_workers: int = 2
    """Verifier worker processes."""
    answer_extraction: Literal["boxed", "last_number", "math_verify"] = "boxed"
    """How the final answer is taken from a response: boxed = the last \\boxed{} (none:
    unparseable, reward 0); last_number = the last number in the text; math_verify =
    math-verify over the whole text (gameable: any expression in the text can match)."""
    format_reward: float = 0.0
    """Reward added for a complete \\boxed{} answer."""
    reward_fn: Optional[str] = None
    """A user reward function module:function(response, answer) -> float replacing math-verify."""

    # --- optimisation ----------------------------------------------------------------
    steps: int = 50
    """Training steps (one rollout batch each)."""
    lr: float = 5e-6
    """Peak learning rate (AdamW). Paper: 5e-6 (CEPO), 1e-6 (GRPO) for 2B-4B models."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 5
    """Linear learning-rate warm-up steps, then cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch (>1 needs old log-probs: one extra no-grad pass)."""
    token_budget: int = 8192
    """Tokens per packed micro-batch (per rank)."""

    # --- run -------------------------------------------------------------------------
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    output_dir: Optional[str] = None
    """Where metrics, checkpoints, export and plots go (default runs/<timestamp>)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in output_dir."""
    eval_every: int = 10
    """Held-out evaluation every N steps (0: only before and after)."""
    samples_every: int = 10
    """Write samples_per_step rollouts of every N-th step to samples.jsonl (0: never); the
    evaluation responses always go to eval_samples.jsonl."""
    samples_per_step: int = 8
    """Rollouts written per sampled step (the first ones of the step, all ranks gathered)."""
    eval_samples: int = 0
    """Also report mean accuracy over this many samples per problem at the training temperature (0: greedy only)."""
    dump_evidence: bool = False
    """Write every trained rollout's tokens, delta and token weights to evidence.jsonl (credit maps)."""
    checkpoint_every: int = 10
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept."""
    export: bool = True
    """Export the final model in Hugging Face layout (safetensors)."""
    tensorboard: bool = False
    """Also log to TensorBoard (output_dir/tensorboard)."""
    wandb_project: Optional[str] = None
    """Also log to Weights & Biases under this project."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available."""
    kernel_backend: Literal["auto", "triton", "torch"] = "auto"
    """cepo_kernels implementation (auto: Triton on CUDA, chunked PyTorch on CPU)."""
    progress: bool = True
    """Show a progress bar."""
    cpu_threads: int = 0
    """Intra-op CPU threads per process (0: OMP_NUM_THREADS if set, else this process's
    available cores divided by the processes on this node)."""

    def validate(self) -> None:
        """Raise ValueError naming the field for values that cannot work."""
        def bad(name, why):
            raise ValueError(f"config: '{name}' {why}")
        if self.group_size < 2:
            bad("group_size", "must be >= 2 (group advantages need at least two rollouts)")
        if self.prompts_per_step < 1:
            bad("prompts_per_step", "must be >= 1")
        if not 0.0 <= self.lam0 <= 1.0:
            bad("lam0", "must be in [0, 1]")
        if not 0.0 <= self.eps_w < 1.0:
            bad("eps_w", "must be in [0, 1)")
        if self.t_warm < 0 or self.steps < 0:
            bad("t_warm" if self.t_warm < 0 else "steps", "must be >= 0")
        if self.mini_batches < 1:
            bad("mini_batches", "must be >= 1")
        if self.token_budget < self.max_new_tokens + 1:
            bad("token_budget", "must exceed max_new_tokens (a sequence must fit)")
        if "{answer}" not in self.hint_template:
            bad("hint_template", "must contain '{answer}'")
        self._validate_distill(bad)
        if not 0.0 < self.vllm_gpu_memory_utilization < 1.0:
            bad("vllm_gpu_memory_utilization", "must be in (0, 1)")
        if self.max_bad_steps < 1:
            bad("max_bad_steps", "must be >= 1")
        if self.hint_source not in ("answer", "cot_prefix", "cot_suffix"):
            bad("hint_source", f"must be answer, cot_prefix or cot_suffix, got {self.hint_source!r}")
        if not isinstance(self.hint_tokens, int) or self.hint_tokens < 1:
            bad("hint_tokens", f"must be an integer >= 1, got {self.hint_tokens!r}")
        if self.teacher not in ("policy", "initial", "lagged"):
            bad("teacher", f"must be policy, initial or lagged, got {self.teacher!r}")
        if not isinstance(self.teacher_sync_every, int) or self.teacher_sync_every < 1:
            bad("teacher_sync_every", f"must be an integer >= 1, got {self.teacher_sync_every!r}")
        if self.algo in ("opsd", "sdpo") and self.teacher != "policy":
            bad("teacher", f"{self.teacher!r} is for rlsd / cepo; opsd and sdpo distil from the "
                           "current policy (their fused loss puts teacher and student through the "
                           "same LM head): leave teacher at policy")
        if (self.algo in ("opsd", "sdpo") or self.teacher != "policy") and os.path.isdir(self.model):
            from cepo.vision import is_vl_checkpoint

            if is_vl_checkpoint(self.model):
                option = "algo" if self.algo in ("opsd", "sdpo") else "teacher"
                bad(option, f"{getattr(self, option)!r} is not supported with a vision-language "
                            "model yet (its teacher contexts would need the images): use "
                            "grpo / rlsd / cepo with teacher policy")
        if self.algo in ("opsd", "sdpo", "grpo") and self.hint_source != "answer":
            bad("hint_source", f"{self.hint_source!r} is for rlsd / cepo (the teachers' hints); "
                               f"{self.algo} has no such hint: leave hint_source at answer")
        if self.max_prompt_tokens < 0 or self.samples_every < 0 or self.samples_per_step < 0:
            name = ("max_prompt_tokens" if self.max_prompt_tokens < 0 else
                    "samples_every" if self.samples_every < 0 else "samples_per_step")
            bad(name, "must be >= 0")
        if self.max_pixels < 1 or (self.min_pixels is not None
                                   and not 0 < self.min_pixels <= self.max_pixels):
            bad("max_pixels" if self.max_pixels < 1 else "min_pixels",
                "must satisfy 0 < min_pixels <= max_pixels")
        if self.train_vision and self.lora_rank > 0:
            bad("train_vision", "needs full fine-tuning (lora_rank 0): LoRA adapts the "
                "language model only")
        if self.temperature <= 0:
            bad("temperature", "must be > 0 for RL sampling")
        if self.arith_ops is not None and not 1 <= self.arith_ops <= 12:
            bad("arith_ops", "must be between 1 and 12 (or unset for the 2-3 operation task)")
        if self.model != TINY_MODEL and not os.path.isdir(self.model):
            bad("model", f"is not a local directory: {self.model!r} (models are never downloaded; "
                         "pass the path of a Hugging Face checkpoint)")

    def _validate_distill(self, bad) -> None:
        """The PPO-loss and self-distillation options (opsd / sdpo)."""
        if self.algo not in ALGOS:
            bad("algo", f"must be one of {ALGOS}, got {self.algo!r}")
        if self.clip_dual is not None and not self.clip_dual > 1.0:
            bad("clip_dual", f"must be > 1 (or None: off), got {self.clip_dual}")
        if self.loss_agg not in ("token", "seq"):
            bad("loss_agg", f"must be 'token' or 'seq', got {self.loss_agg!r}")
        if self.distill_divergence not in DIVERGENCES:
            bad("distill_divergence", f"must be one of {DIVERGENCES}, got "
                                      f"{self.distill_divergence!r}")
        if not 0.0 <= self.distill_beta <= 1.0:
            bad("distill_beta", f"must be in [0, 1], got {self.distill_beta}")
        if self.distill_coef < 0 or self.distill_pg_coef < 0:
            name = "distill_coef" if self.distill_coef < 0 else "distill_pg_coef"
            bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.algo in ("opsd", "sdpo") and self.distill_coef == 0 and self.distill_pg_coef == 0:
            bad("distill_coef", "and distill_pg_coef are both 0: nothing would be trained")
        for name, fields, needed in (
                ("opsd_template", ("prompt", "solution", "answer"), ("{solution}", "{answer}")),
                ("sdpo_template", ("prompt", "demonstration"), ("{demonstration}",))):
            template = getattr(self, name)
            try:
                template.format(**{f: "" for f in fields})
            except (KeyError, IndexError, ValueError) as e:
                bad(name, f"must be a str.format template with only the fields {fields} "
                          f"(write literal braces as {{{{ }}}}): {e!r}")
            if "{prompt}" not in template or not any(f in template for f in needed):
                bad(name, f"must contain {{prompt}} and {' or '.join(needed)}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_parser():
    """The jsonargparse parser for TrainConfig (``--config`` for YAML files); each option's
    help is its attribute docstring in TrainConfig."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="torchrun -m cepo.train", description=TrainConfig.__doc__,
                            exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of options")
    parser.add_class_arguments(TrainConfig, nested_key=None, fail_untyped=True)
    return parser


def option_given(argv: list[str], option: str) -> bool:
    """True when ``argv`` sets ``option`` (``--x value`` or ``--x=value``)."""
    return any(a == option or a.startswith(option + "=") for a in argv)


def _config_files_first(argv: list[str]) -> list[str]:
    """argv with every ``--config FILE`` / ``--config=FILE`` moved to the front (their
    order kept): a file's values are defaults that the flags override, wherever written."""
    files, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            files += argv[i:i + 2]
            i += 2
            continue
        (files if argv[i].startswith("--config=") else rest).append(argv[i])
        i += 1
    return files + rest


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse argv (None: sys.argv) into a validated TrainConfig.

    A ``--config`` file is applied first wherever it stands on the command line, so every
    flag overrides it (``--algo grpo --config x.yaml`` trains GRPO even when x.yaml says
    ``algo: cepo``); several files apply in their order. Without ``--model`` and
    ``--config`` the embedded default's own settings (``cepo/configs/tiny-arith.yaml``)
    come first in the same way."""
    import sys

    argv = _config_files_first(list(sys.argv[1:] if argv is None else argv))
    if not option_given(argv, "--model") and not option_given(argv, "--config"):
        argv = ["--config", TINY_CONFIG] + argv
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns = parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
    values = {k: v for k, v in vars(ns).items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
