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


@dataclass
class TrainConfig:
    """GRPO / RLSD / CEPO training of a Hugging Face causal LM."""

    # --- algorithm -------------------------------------------------------------------
    algo: Literal["grpo", "rlsd", "cepo"] = "cepo"
    """grpo: lambda = 0; rlsd: D = lp_pos - lp_policy; cepo: D = lp_pos - lp_neg."""
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
    max_bad_steps: int = 3
    """Stop the run after this many consecutive steps whose loss or gradient norm is NaN/inf
    (each such step skips the optimizer step and is counted in nonfinite_update)."""

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
    """Modules that receive LoRA adapters."""

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
        if not 0.0 < self.vllm_gpu_memory_utilization < 1.0:
            bad("vllm_gpu_memory_utilization", "must be in (0, 1)")
        if self.max_bad_steps < 1:
            bad("max_bad_steps", "must be >= 1")
        if self.max_prompt_tokens < 0 or self.samples_every < 0 or self.samples_per_step < 0:
            name = ("max_prompt_tokens" if self.max_prompt_tokens < 0 else
                    "samples_every" if self.samples_every < 0 else "samples_per_step")
            bad(name, "must be >= 0")
        if self.temperature <= 0:
            bad("temperature", "must be > 0 for RL sampling")
        if self.arith_ops is not None and not 1 <= self.arith_ops <= 12:
            bad("arith_ops", "must be between 1 and 12 (or unset for the 2-3 operation task)")
        if self.model != TINY_MODEL and not os.path.isdir(self.model):
            bad("model", f"is not a local directory: {self.model!r} (models are never downloaded; "
                         "pass the path of a Hugging Face checkpoint)")

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


def _given(argv: list[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in argv)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse argv (None: sys.argv) into a validated TrainConfig.

    Without ``--model`` and ``--config`` the embedded default's own settings
    (``cepo/configs/tiny-arith.yaml``) come first, so flags still override them."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not _given(argv, "--model") and not _given(argv, "--config"):
        argv = ["--config", TINY_CONFIG] + argv
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns = parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
    values = {k: v for k, v in vars(ns).items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
