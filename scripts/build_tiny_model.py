"""Build the tiny model the embedded default ships: cepo/assets/tiny-arith.

A character-level tokenizer (the `tokenizers` library) with a chat template, and a small
Qwen3 trained from scratch, supervised (loss on the response only), on the train split
of the built-in arithmetic task until its greedy accuracy on held-out problems reaches
a target: good enough that RL has signal (groups of 8 samples often hold both right
and wrong answers), far from solved.

~30% of training prompts carry the correct answer as a hint (``prompt + "\\n\\n" +
answer``, the trainer's teacher context with the default hint template), so the model
learns to use a hint; this is what gives CEPO's correct- and wrong-answer teachers
something to say.

    python scripts/build_tiny_model.py --seed 0 --out cepo/assets/tiny-arith

``--arith_ops N`` builds a model for the longer-problem setting instead (every train, dev
and reported problem has N operations; the trainer's ``--arith_ops N`` asks for the same
problems), e.g. results/arith_long/tiny-arith-5ops.

Everything is seeded; with the same thread count the build is reproducible.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from cepo.answers import extract_boxed
from cepo.arithmetic import make_split
from cepo.model_card import card_figures

PAD, EOS, UNK, USER, ASSISTANT = "<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"
BOXED = "\\boxed{"  # one token: the answer marker
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # printable ASCII: any hint template encodes
# user -> <|user|>content; assistant -> <|assistant|>content<eos>; other roles -> content + "\n".
CHAT_TEMPLATE = ("{% for m in messages %}"
                 "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
                 "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}" + EOS +
                 "{% else %}{{ m['content'] }}\n{% endif %}"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}")
HINT_FRACTION = 0.3
MAX_LEN = 512


def log(msg: str) -> None:
    print(msg, flush=True)


def build_tokenizer(out: Path):
    """Character-level tokenizer (plus one ``\\boxed{`` token), saved for AutoTokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([PAD, EOS, UNK, USER, ASSISTANT, BOXED] + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # every character is a piece (newlines too), except the \boxed{ marker
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   additional_special_tokens=[USER, ASSISTANT],
                                   model_max_length=MAX_LEN, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out, save_jinja_files=False)  # the template lives in tokenizer_config.json
    # Portable class names: older transformers read these keys too; 5.x loads them alike.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if "extra_special_tokens" in cfg:
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return fast


def user_content(row: dict, hint: str | None) -> str:
    """The trainer's teacher convention: ``prompt + "\\n\\n" + hint`` (default: the answer)."""
    return row["prompt"] if hint is None else row["prompt"] + "\n\n" + hint


def encode(tok, content: str, solution: str) -> tuple[list[int], int]:
    """(ids of chat prompt + solution + EOS, index where the response starts)."""
    ctx = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    ctx = list(ctx["input_ids"] if hasattr(ctx, "keys") else ctx)
    resp = tok(solution, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return ctx + resp, len(ctx)


def batches(rows, tok, rng: random.Random, batch_size: int, hint_fraction: float = HINT_FRACTION):
    """One shuffled epoch of padded batches; labels are -100 outside the response; a
    ``hint_fraction`` of the prompts carry the correct answer as the teacher hint."""
    rows = rows[:]
    rng.shuffle(rows)
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        seqs = []
        for r in rows[i:i + batch_size]:
            hint = r["answer"] if rng.random() < hint_fraction else None  # always the CORRECT answer
            seqs.append(encode(tok, user_content(r, hint), r["solution"]))
        width = max(len(ids) for ids, _ in seqs)
        x = torch.full((len(seqs), width), tok.pad_token_id)
        y = torch.full((len(seqs), width), -100)
        m = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, (ids, start) in enumerate(seqs):
            x[j, :len(ids)] = torch.tensor(ids)
            y[j, start:len(ids)] = torch.tensor(ids[start:])  # loss on the response (and EOS) only
            m[j, :len(ids)] = 1
        yield x, y, m


@torch.no_grad()
def generate_answers(model, tok, contents: list[str], *, samples: int = 1, temperature: float = 0.0,
                     max_new_tokens: int | None = None, batch_size: int = 64) -> list[list[str | None]]:
    """Boxed answers of ``samples`` responses per user message (greedy when temperature = 0)."""
    was_training = model.training
    model.eval()
    tok.padding_side = "left"
    out_answers = []
    for i in range(0, len(contents), batch_size):
        chunk = contents[i:i + batch_size]
        prompts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                           tokenize=False) for c in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        if temperature > 0:
            kw = dict(do_sample=True, temperature=temperature, top_k=None, top_p=None)
        else:
            kw = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        budget = max_new_tokens or model.generation_config.max_new_tokens
        out = model.generate(**enc, max_new_tokens=budget, num_return_sequences=samples,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for j in range(len(chunk)):
            out_answers.append([extract_boxed(t) for t in texts[j * samples:(j + 1) * samples]])
    model.train(was_training)
    return out_answers


def greedy_accuracy(model, tok, rows, hinted: bool = False) -> float:
    """Greedy accuracy on ``rows``; with ``hinted``, given the correct answer as the hint."""
    answers = generate_answers(model, tok, [user_content(r, r["answer"] if hinted else None)
                                            for r in rows])
    return sum(a[0] == r["answer"] for a, r in zip(answers, rows)) / len(rows)


def evaluate(model, tok, rows, seed: int) -> dict:
    """Every figure the README reports, on ``rows`` (the reported set: the dev split, named
    "test" when the model was built): cepo.model_card.card_figures."""
    def answers(hints, **kw):
        return generate_answers(model, tok, [user_content(r, h) for r, h in zip(rows, hints)], **kw)

    return card_figures(rows, answers, seed)


README = """# {name}

{purpose}: a {layers}-layer Qwen3 (hidden {hidden}, {params:,} parameters, tied embeddings,
fp32 safetensors, {size_kb} KB in all) with a character-level tokenizer ({vocab} tokens),
trained from scratch by `scripts/build_tiny_model.py` on the train split of the built-in
arithmetic task (`cepo.arithmetic`, {ops_text}). It is deliberately half-trained: supervised training
stops when the held-out greedy accuracy reaches {target:.0%} (on 200 dev problems){hint_stop}, so RL
has room and signal.

Build (seeded, CPU, {threads} threads, {minutes:.1f} minutes wall time, {steps} steps of {batch}):

    python scripts/build_tiny_model.py --seed {seed} --out {out}{build_flags}

## Format

- Prompt: the expression alone, e.g. `(7+5)*3-4`; chat template
  `<|user|>{{content}}<|assistant|>`; the response is the worked solution, one operation
  per line, ending in `\\boxed{{answer}}`, then `<eos>`:

      7+5=12
      12*3=36
      36-4=32
      \\boxed{{32}}

- Teacher hint (CEPO / RLSD): the user content `prompt + "\\n\\n" + answer`. {hint_pct:.0%} of
  the supervised examples carried the correct answer this way, so the model uses hints.
- Special tokens: `<pad>` (id {pad_id}), `<eos>` (id {eos_id}, generation stops there), `<unk>`,
  `<|user|>`, `<|assistant|>`; `\\boxed{{` is a single token; every other printable ASCII
  character and `\\n` is one token.

## Measured (dev split, {n} problems, `make_split("dev", {n}, seed={seed}{ops_arg})`, max {max_new_tokens} new tokens)

| figure | value |
|---|---|
| greedy accuracy | {greedy_accuracy:.1%} |
| greedy responses with a `\\boxed{{}}` answer | {greedy_boxed_rate:.1%} |
| accuracy of one sample at T = 1 | {sample_accuracy_T1:.1%} |
| pass@8 at T = 1 | {pass_at_8_T1:.1%} |
| problems whose 8 samples hold both right and wrong answers | {mixed_groups_of_8_T1:.1%} |
| greedy accuracy with the correct answer as hint | {accuracy_with_correct_hint:.1%} |
| greedy accuracy with a wrong answer as hint | {accuracy_with_wrong_hint:.1%} |
| wrong hint copied into `\\boxed{{}}` | {wrong_hint_copy_rate:.1%} |

The wrong hint is the model's own most frequent wrong sampled answer for the problem (as
the trainer's wrong-answer teacher uses), or answer + 7 where all 8 samples were right.
Figures were measured with {threads} CPU threads; `build_figures.json` holds them too.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="cepo/assets/tiny-arith")
    ap.add_argument("--target", type=float, default=0.40,
                    help="stop supervised training at this dev greedy accuracy")
    ap.add_argument("--max_steps", type=int, default=4000)
    ap.add_argument("--eval_every", type=int, default=10)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--num_train", type=int, default=20000)
    ap.add_argument("--num_test", type=int, default=200)
    ap.add_argument("--arith_ops", type=int, default=None,
                    help="operations per problem (default: 2 or 3, the embedded default's task); "
                         "N builds a model for the trainer's --arith_ops N")
    ap.add_argument("--hint_fraction", type=float, default=HINT_FRACTION,
                    help="share of supervised prompts carrying the correct answer as a hint")
    ap.add_argument("--hint_target", type=float, default=0.0,
                    help="also require this dev greedy accuracy given the correct answer as the "
                         "hint before stopping (a model whose teacher uses the hint)")
    ap.add_argument("--max_new_tokens", type=int, default=None,
                    help="generation budget of the evaluations and the saved generation config "
                         "(default 64 for 2-3 operations, 16 * N + 32 for N)")
    args = ap.parse_args()
    ops = args.arith_ops
    max_new = args.max_new_tokens or (64 if ops is None else 16 * ops + 32)

    import transformers

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("chat_template.jinja", "model.safetensors", "README.md", "build_figures.json"):
        if (out / stale).exists():  # an older build's chat_template.jinja would override ours
            os.remove(out / stale)
    tok = build_tokenizer(out)
    config = transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=args.hidden // 4, max_position_embeddings=MAX_LEN, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = transformers.Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.max_new_tokens = max_new
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny-arith: Qwen3 {args.layers}x{args.hidden}, {n_params:,} parameters, vocab {len(tok)}, "
        f"{args.threads} threads, target dev greedy accuracy {args.target:.0%}")

    train = make_split("train", args.num_train, args.seed, n_ops=ops)
    dev = make_split("dev", 200, args.seed + 1000, n_ops=ops)  # early stopping only; not reported
    # the reported figures: "test" before the dev/test separation, the same problems
    test = make_split("dev", args.num_test, args.seed, n_ops=ops)
    test_prompts = {r["prompt"] for r in test}
    dev = [r for r in dev if r["prompt"] not in test_prompts]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    step, acc, done = 0, 0.0, False
    while not done:
        for x, y, m in batches(train, tok, rng, args.batch_size, args.hint_fraction):
            loss = model(input_ids=x, attention_mask=m, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % args.eval_every == 0 or step >= args.max_steps:
                acc = greedy_accuracy(model, tok, dev) if step >= warmup else 0.0
                hint_acc = (greedy_accuracy(model, tok, dev, hinted=True)  # only once it matters
                            if args.hint_target > 0 and acc >= args.target else None)
                log(f"step {step:5d}  loss {loss.item():.4f}  dev greedy acc {acc:6.1%}"
                    + (f"  with hint {hint_acc:6.1%}" if hint_acc is not None else "")
                    + f"  ({time.time() - t0:.0f}s)")
                if ((acc >= args.target and (hint_acc or 0.0) >= args.hint_target)
                        or step >= args.max_steps):
                    done = True
                    break
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    log(f"saved {out}; evaluating on {len(test)} test problems")
    figures = evaluate(model, tok, test, args.seed)
    figures.update({
        "parameters": n_params, "vocab_size": len(tok), "hidden_size": args.hidden,
        "num_layers": args.layers, "sft_steps": step, "batch_size": args.batch_size,
        "dev_greedy_accuracy_at_stop": acc, "target": args.target, "seed": args.seed,
        "threads": args.threads, "build_seconds": round(time.time() - t0),
        "arith_ops": ops, "max_new_tokens": max_new, "hint_fraction": args.hint_fraction,
        "hint_target": args.hint_target,
    })
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != "README.md")
    figures["artefact_bytes"] = size
    (out / "build_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out / "README.md").write_text(README.format(
        **figures, params=n_params, size_kb=round(size / 1024), vocab=len(tok), hidden=args.hidden,
        layers=args.layers, minutes=figures["build_seconds"] / 60, steps=step, batch=args.batch_size,
        hint_pct=args.hint_fraction, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, n=len(test),
        name=out.name, purpose=("The tiny pretrained model of cepo's embedded default (`torchrun -m "
                                "cepo.train` with no\narguments)" if ops is None else
                                "A tiny model for cepo's longer-problem setting (the trainer's "
                                f"`--arith_ops {ops}`)"),
        hint_stop=("" if not args.hint_target else f" and, given the correct answer as the hint, "
                   f"{args.hint_target:.0%}"),
        out=args.out, build_flags="".join(f" --{k} {v}" for k, v in vars(args).items()
                                       if k not in ("seed", "out") and v != ap.get_default(k)),
        ops_arg="" if ops is None else f", n_ops={ops}",
        ops_text="2 or 3 operations per problem" if ops is None else f"{ops} operations per problem"))
    log(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
