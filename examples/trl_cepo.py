"""CEPO with TRL: the shipped tiny model on the built-in arithmetic task, on CPU.

    pip install "cepo[trl]"
    python examples/trl_cepo.py --steps 4                  # CEPO (lambda0 0.5)
    python examples/trl_cepo.py --steps 4 --lambda0 0      # GRPO on cepo's fused kernels

Switching an existing TRL script to cepo is the trainer class and two arguments:
``GRPOTrainer(...)`` -> ``CEPOGRPOTrainer(..., cepo_lambda0=0.5, cepo_t_warm=25)``; the
dataset needs an "answer" column (the gold answer the correct-answer teacher sees).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

TINY_MODEL = Path(__file__).resolve().parents[1] / "cepo" / "assets" / "tiny-arith"


def boxed_equals_reward(completions, answer, **_) -> list[float]:
    """1.0 where the last \\boxed{} of the completion equals the gold answer, else 0.0."""
    from cepo.answers import extract_boxed
    from cepo.contexts import normalise_answer
    from cepo.integrations.cepo_batch import completion_text

    out = []
    for completion, gold in zip(completions, answer):
        got = extract_boxed(completion_text(completion))
        out.append(float(got is not None and normalise_answer(got) == normalise_answer(str(gold))))
    return out


def make_dataset(num_prompts: int, seed: int):
    """The built-in task as a TRL dataset: chat prompts plus the gold "answer" column."""
    from datasets import Dataset

    from cepo.arithmetic import make_split

    rows = make_split("train", num_prompts, seed)
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "answer": r["answer"]} for r in rows])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lambda0", type=float, default=0.5, help="0: GRPO on the fused kernels")
    parser.add_argument("--t-warm", type=int, default=25)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=48)
    parser.add_argument("--loss-type", default="dapo", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1,
                        help="TRL samples for all of them at once (steps_per_generation)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(TINY_MODEL))
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from cepo.integrations.trl import CEPOGRPOTrainer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="trl_cepo_")
    batch = args.prompts_per_step * args.num_generations // args.gradient_accumulation_steps
    config = GRPOConfig(
        output_dir=output_dir, max_steps=args.steps, learning_rate=args.lr, seed=args.seed,
        per_device_train_batch_size=batch, num_generations=args.num_generations,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_completion_length=args.max_completion_length, loss_type=args.loss_type,
        beta=0.0, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, dataloader_num_workers=0, disable_tqdm=True)
    trainer = CEPOGRPOTrainer(
        model=model, processing_class=tokenizer, reward_funcs=boxed_equals_reward, args=config,
        train_dataset=make_dataset(args.steps * args.prompts_per_step, args.seed),
        cepo_lambda0=args.lambda0, cepo_t_warm=args.t_warm)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        keys = ("step", "loss", "reward", "entropy", "clip_ratio/region_mean", "cepo/lambda",
                "cepo/frac_with_wrong_answer", "cepo/weight_clip_frac")
        print(json.dumps({k: entry[k] for k in keys if k in entry}))
    return {"steps": trainer.state.global_step, "logs": logs}


if __name__ == "__main__":
    main()
