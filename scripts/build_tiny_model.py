"""Build the tiny model the embedded default ships: cepo/assets/tiny-arith.

A character-level tokenizer (the `tokenizers` library) with a chat template, and a small
Qwen3 trained from scratch, supervised, on the built-in arithmetic task until its
held-out greedy accuracy reaches a target (default 30%): good enough that RL has signal
(groups of 8 samples often hold both right and wrong answers), far from solved.
~30% of training prompts carry the correct answer as a hint (``prompt + "\\n\\n" +
answer``, the trainer's teacher format), so the model learns to use hints; this is what
gives the correct- and wrong-answer teachers something to say.

    python scripts/build_tiny_model.py --seed 0 --out cepo/assets/tiny-arith
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from cepo.answers import extract_boxed
from cepo.arithmetic import make_split

CHARS = list("0123456789+-*()=\n{}")
SPECIALS = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "\\boxed{"]
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
                 "{% else %}{{ m['content'] }}<eos>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer(out: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def encode(tok, prompt: str, solution: str) -> tuple[list[int], int]:
    ctx = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ctx = list(ctx["input_ids"])
    resp = tok(solution, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return ctx + resp, len(ctx)


def batches(rows, tok, hint_frac, rng, batch_size):
    rows = rows[:]
    rng.shuffle(rows)
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        seqs, starts = [], []
        for r in rows[i:i + batch_size]:
            prompt = r["prompt"] + ("\n\n" + r["answer"] if rng.random() < hint_frac else "")
            ids, start = encode(tok, prompt, r["solution"])
            seqs.append(ids)
            starts.append(start)
        width = max(map(len, seqs))
        x = torch.full((len(seqs), width), tok.pad_token_id)
        y = torch.full((len(seqs), width), -100)
        for j, (ids, s) in enumerate(zip(seqs, starts)):
            x[j, :len(ids)] = torch.tensor(ids)
            y[j, s:len(ids)] = torch.tensor(ids[s:])  # loss on the response only
        yield x, y


@torch.no_grad()
def accuracy(model, tok, rows, *, hint=None, samples=1, temperature=0.0, max_new=48):
    """Fraction of rows solved (pass@samples when sampling), and the hint-copy rate."""
    model.eval()
    tok.padding_side = "left"
    solved = copied = 0
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        prompts = []
        for r in chunk:
            h = None if hint is None else (r["answer"] if hint == "correct" else str(int(r["answer"]) + 7))
            prompts.append(tok.apply_chat_template(
                [{"role": "user", "content": r["prompt"] + ("" if h is None else "\n\n" + h)}],
                add_generation_prompt=True, tokenize=False))
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(do_sample=True, temperature=temperature, top_k=None, top_p=None) \
            if temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = model.generate(**enc, max_new_tokens=max_new, num_return_sequences=samples,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        for j, r in enumerate(chunk):
            answers = [extract_boxed(t) for t in texts[j * samples:(j + 1) * samples]]
            solved += any(a == r["answer"] for a in answers)
            if hint == "wrong":
                copied += any(a == str(int(r["answer"]) + 7) for a in answers)
    model.train()
    return solved / len(rows), copied / len(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="cepo/assets/tiny-arith")
    ap.add_argument("--target", type=float, default=0.30, help="stop at this held-out greedy accuracy")
    ap.add_argument("--max_steps", type=int, default=6000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    config = transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=args.hidden // 4, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = transformers.Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    train = make_split("train", 20000, args.seed)
    dev = make_split("test", 200, args.seed + 1000)  # model selection only; not the eval seed's
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    t0, step, acc = time.time(), 0, 0.0
    while step < args.max_steps and acc < args.target:
        for x, y in batches(train, tok, 0.3, rng, 64):
            loss = model(input_ids=x, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 50 == 0 and step >= 200:
                acc, _ = accuracy(model, tok, dev)
                print(f"step {step} loss {loss.item():.3f} dev greedy acc {acc:.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
                if acc >= args.target or step >= args.max_steps:
                    break
    model.save_pretrained(out, safe_serialization=True)
    test = make_split("test", 200, args.seed)
    greedy, _ = accuracy(model, tok, test)
    pass8, _ = accuracy(model, tok, test, samples=8, temperature=1.0)
    hinted, _ = accuracy(model, tok, test, hint="correct")
    _, copy_rate = accuracy(model, tok, test, hint="wrong")
    n_params = sum(p.numel() for p in model.parameters())
    figures = {"greedy_accuracy": greedy, "pass_at_8_T1": pass8, "accuracy_with_correct_hint": hinted,
               "wrong_hint_copy_rate": copy_rate, "parameters": n_params, "sft_steps": step,
               "build_seconds": round(time.time() - t0), "seed": args.seed, "eval": "200 test problems, seed 0"}
    (out / "build_figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
