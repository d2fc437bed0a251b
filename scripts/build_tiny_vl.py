"""Build the tiny multimodal model: cepo/assets/tiny-vl (a Qwen3-VL-shaped policy).

The built-in arithmetic task in image form (``cepo.vision_arith``: the expression drawn
with PIL's bitmap font, the prompt ``"<image>Compute the value of the expression in the
image."``) and a tiny ``Qwen3VLForConditionalGeneration`` (vision tower + text model, from
its config, random init) trained from scratch, supervised (loss on the response only), on
the worked solutions of the train split until its greedy accuracy on held-out problems
reaches a target: useful for RL (groups of 8 samples often hold both right and wrong
answers), far from solved.

Vocabulary: the character tokenizer of cepo/assets/tiny-arith (same ids) plus Qwen's
vision tokens ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>`` and
``<|video_pad|>``. The processor is ``Qwen3VLProcessor`` with the PIL image processor
(no torchvision needed) and no video processor. As for tiny-arith, ~30% of training
prompts carry the correct answer as a hint (``prompt + "\\n\\n" + answer``, the trainer's
teacher context with the default hint template).

    python scripts/build_tiny_vl.py --seed 0 --out cepo/assets/tiny-vl

``--init_text tiny-arith`` starts the text model from cepo/assets/tiny-arith's weights
instead (same ids and shapes) and mostly has to learn to read: fewer steps, and the
model keeps tiny-arith's use of hints. ``--max_cpu_minutes`` caps the training time.
Everything is seeded; with the same thread count the build is reproducible.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

from cepo.answers import extract_boxed
from cepo.model_card import card_figures
from cepo.vision_arith import IMAGE_PLACEHOLDER, make_split

TINY_ARITH = Path(__file__).resolve().parent.parent / "cepo" / "assets" / "tiny-arith"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = ("<|vision_start|>", "<|vision_end|>",
                                                   "<|image_pad|>", "<|video_pad|>")
IMAGE_SPAN = VISION_START + IMAGE_PAD + VISION_END  # the processor expands IMAGE_PAD per patch group
USER, ASSISTANT, EOS = "<|user|>", "<|assistant|>", "<eos>"
# tiny-arith's template, with list contents too (the processor's chat format):
# {"type": "image"} -> <|vision_start|><|image_pad|><|vision_end|>, {"type": "text"} -> its text.
CONTENT = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}"
           "{% for c in m['content'] %}"
           "{% if c['type'] == 'image' %}" + IMAGE_SPAN +
           "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
           "{% endfor %}{% endif %}")
CHAT_TEMPLATE = ("{% for m in messages %}"
                 "{% if m['role'] == 'user' %}" + USER + CONTENT +
                 "{% elif m['role'] == 'assistant' %}" + ASSISTANT + CONTENT + EOS +
                 "{% else %}" + CONTENT + "\n{% endif %}"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}")
HINT_FRACTION = 0.3
MAX_LEN = 512
MIN_PIXELS, MAX_PIXELS = 32 * 32, 32 * 32 * 16  # expression images are 32 x 32n, n <= 11


def log(msg: str) -> None:
    print(msg, flush=True)


class Processor:
    """Qwen3-VL's processor for this model without a video processor: transformers'
    ``Qwen3VLProcessor`` insists on one, and Qwen's video processor needs torchvision, which
    the CPU stack lacks. Text with ``<|image_pad|>`` (one per image, in order) becomes the
    ids with that token repeated once per merged patch group, as Qwen3VLProcessor does."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def __call__(self, text: list[str], images: list, padding: bool = False) -> dict:
        """Token ids (lists; with ``padding``, left-padded [B, T] tensors and an attention
        mask), ``mm_token_type_ids`` (1 at image tokens), ``pixel_values`` [P, 1536] and
        ``image_grid_thw`` [n_images, 3]."""
        vision = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        counts = iter((vision["image_grid_thw"].prod(-1) // merge).tolist())
        ids = []
        for t in text:
            pieces = t.split(IMAGE_PAD)
            row = self.tokenizer(pieces[0], add_special_tokens=False).input_ids
            for piece in pieces[1:]:
                row += [self.image_token_id] * next(counts)
                row += self.tokenizer(piece, add_special_tokens=False).input_ids
            ids.append(row)
        if next(counts, None) is not None:
            raise ValueError("more images than <|image_pad|> tokens in the text")
        types = [[int(i == self.image_token_id) for i in row] for row in ids]
        out = {"input_ids": ids, "mm_token_type_ids": types, "pixel_values": vision["pixel_values"],
               "image_grid_thw": vision["image_grid_thw"]}
        if padding:  # left padding (generation)
            width = max(len(r) for r in ids)
            pad = self.tokenizer.pad_token_id
            out["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
            out["input_ids"] = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
            out["mm_token_type_ids"] = torch.tensor([[0] * (width - len(r)) + r for r in types])
        return out


def build_processor(out: Path) -> Processor:
    """tiny-arith's tokenizer plus the vision tokens and the VL chat template, and the PIL
    image processor; saved for AutoTokenizer / AutoImageProcessor (AutoProcessor too where
    torchvision is installed)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(TINY_ARITH, local_files_only=True)
    n_before = len(tok)
    tok.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT, VISION_START, VISION_END,
                                                          IMAGE_PAD, VIDEO_PAD]})
    assert len(tok) == n_before + 4, "tiny-arith ids must be kept; only the vision tokens are new"
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out, save_jinja_files=False)  # the template lives in tokenizer_config.json
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("local_files_only", None)
    cfg.pop("is_local", None)
    if "extra_special_tokens" in cfg:
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5], size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    image_processor.save_pretrained(out)
    pre_path = out / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text())
    pre["processor_class"] = "Qwen3VLProcessor"
    pre_path.write_text(json.dumps(pre, indent=2) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    return Processor(tok, image_processor)


def build_model(tok, args):
    """A tiny Qwen3-VL: 2-block vision tower (one deepstack layer) + a tiny-arith-sized text model."""
    import transformers

    head_dim = args.hidden // 4
    half = head_dim // 2  # rotary frequencies, split (t, h, w) in Qwen3-VL's 24:20:20 ratio
    section = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    text = dict(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                head_dim=head_dim, max_position_embeddings=MAX_LEN, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": section, "mrope_interleaved": True},
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    vision = dict(depth=args.vision_layers, hidden_size=args.vision_hidden,
                  intermediate_size=4 * args.vision_hidden,
                  num_heads=2, in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=args.hidden, num_position_embeddings=256, deepstack_visual_indexes=[0])
    config = transformers.Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids(IMAGE_PAD),
        video_token_id=tok.convert_tokens_to_ids(VIDEO_PAD),
        vision_start_token_id=tok.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tok.convert_tokens_to_ids(VISION_END), tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = transformers.Qwen3VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.max_new_tokens = 64
    return model


def init_text_from_tiny_arith(model) -> None:
    """Copy tiny-arith's weights into the text model (same shapes, same token ids; the four
    vision tokens keep their random rows). Qwen3-VL's interleaved 3-D rotary positions equal
    Qwen3's 1-D ones on text, so the copied model reads text prompts as tiny-arith does."""
    from safetensors.torch import load_file

    text = model.model.language_model
    own = text.state_dict()
    weights = load_file(str(TINY_ARITH / "model.safetensors"))
    with torch.no_grad():
        for name, value in weights.items():
            target = own[name.removeprefix("model.")]
            target[:value.shape[0]].copy_(value)  # embed_tokens: the first 102 rows


def user_content(row: dict, hint: str | None) -> str:
    """The user message text with the image span in place of ``<image>``; the trainer's
    teacher convention ``prompt + "\\n\\n" + hint`` when a hint is given."""
    text = row["prompt"] if hint is None else row["prompt"] + "\n\n" + hint
    return text.replace(IMAGE_PLACEHOLDER, IMAGE_SPAN)


def chat_prompt(tok, content: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False)


def batches(rows, processor, rng: random.Random, batch_size: int):
    """One shuffled epoch of right-padded batches; labels are -100 outside the response."""
    tok = processor.tokenizer
    rows = rows[:]
    rng.shuffle(rows)
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        chunk = rows[i:i + batch_size]
        prompts = [chat_prompt(tok, user_content(r, r["answer"] if rng.random() < HINT_FRACTION else None))
                   for r in chunk]
        enc = processor(text=prompts, images=[r["images"][0] for r in chunk])
        seqs = []
        for ids, types, r in zip(enc["input_ids"], enc["mm_token_type_ids"], chunk):
            resp = tok(r["solution"], add_special_tokens=False).input_ids + [tok.eos_token_id]
            seqs.append((list(ids) + resp, list(types) + [0] * len(resp), len(ids)))
        width = max(len(ids) for ids, _, _ in seqs)
        x = torch.full((len(seqs), width), tok.pad_token_id)
        t = torch.zeros((len(seqs), width), dtype=torch.long)
        y = torch.full((len(seqs), width), -100)
        m = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, (ids, types, start) in enumerate(seqs):
            x[j, :len(ids)] = torch.tensor(ids)
            t[j, :len(ids)] = torch.tensor(types)
            y[j, start:len(ids)] = torch.tensor(ids[start:])  # loss on the response (and EOS) only
            m[j, :len(ids)] = 1
        yield dict(input_ids=x, attention_mask=m, mm_token_type_ids=t, labels=y,
                   pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])


@torch.no_grad()
def generate_answers(model, processor, rows, hints=None, *, samples: int = 1, temperature: float = 0.0,
                     max_new_tokens: int = 64, batch_size: int = 64) -> list[list[str | None]]:
    """Boxed answers of ``samples`` responses per row (greedy when temperature = 0)."""
    tok = processor.tokenizer
    was_training = model.training
    model.eval()
    hints = hints or [None] * len(rows)
    out_answers = []
    for i in range(0, len(rows), batch_size):
        chunk, chunk_hints = rows[i:i + batch_size], hints[i:i + batch_size]
        prompts = [chat_prompt(tok, user_content(r, h)) for r, h in zip(chunk, chunk_hints)]
        enc = processor(text=prompts, images=[r["images"][0] for r in chunk], padding=True)
        if temperature > 0:
            kw = dict(do_sample=True, temperature=temperature, top_k=None, top_p=None)
        else:
            kw = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for j in range(len(chunk)):
            out_answers.append([extract_boxed(t) for t in texts[j * samples:(j + 1) * samples]])
    model.train(was_training)
    return out_answers


def greedy_accuracy(model, processor, rows) -> float:
    answers = generate_answers(model, processor, rows)
    return sum(a[0] == r["answer"] for a, r in zip(answers, rows)) / len(rows)


def evaluate(model, processor, rows, seed: int) -> dict:
    """Every figure the README reports, on ``rows`` (the held-out set):
    cepo.model_card.card_figures."""
    def answers(hints, **kw):
        return generate_answers(model, processor, rows, hints, **kw)

    return card_figures(rows, answers, seed, sample_batch_size=16)


README = """# tiny-vl

The tiny multimodal policy of `cepo/configs/tiny-vl.yaml`: a Qwen3-VL-shaped model
(`Qwen3VLForConditionalGeneration`, {params:,} parameters, fp32 safetensors, {size_kb} KB in
all): a {vision_layers}-block vision tower (hidden {vision_hidden}, patch 16, spatial merge 2,
one deepstack layer) and a {layers}-layer text model (hidden {hidden}, tied embeddings, 3-D
multimodal rotary positions) with tiny-arith's character tokenizer plus Qwen's vision tokens
({vocab} tokens). Trained from scratch by `scripts/build_tiny_vl.py` on the train split of the
built-in arithmetic task rendered into images (`cepo.vision_arith`). It is deliberately
half-trained: supervised training stops at the first evaluation (every 50 steps) whose
greedy accuracy on {n_dev} held-out dev problems reaches {target:.0%} (here
{dev_greedy_accuracy_at_stop:.0%}), so RL has room and signal.

Build (seeded, CPU, {threads} threads, {steps} steps of {batch}, {minutes:.1f} minutes wall time and
{cpu_minutes:.1f} minutes of CPU time on a shared, busy machine; evaluation not counted):

    python scripts/build_tiny_vl.py --seed {seed} --out cepo/assets/tiny-vl

Load it with `AutoModelForImageTextToText`, `AutoTokenizer` and `AutoImageProcessor`
(`Qwen2VLImageProcessorPil`: no torchvision needed). `AutoProcessor` builds transformers'
`Qwen3VLProcessor`, which also needs a video processor and so torchvision.

## Format

- Image: the expression drawn in PIL's default bitmap font, one character per 32 x 32 cell
  (one merged vision token per character), black on white; 32 x 32n pixels for n characters.
- Prompt: `<image>Compute the value of the expression in the image.`; the `<image>`
  placeholder becomes `<|vision_start|>` + one `<|image_pad|>` per character +
  `<|vision_end|>` (as `cepo.vision` and Qwen3VLProcessor expand it); chat template
  `<|user|>{{content}}<|assistant|>`; the response is the worked solution, one operation
  per line, ending in `\\boxed{{answer}}`, then `<eos>` (as tiny-arith).
- Teacher hint (CEPO / RLSD): the user text `prompt + "\\n\\n" + answer`. {hint_pct:.0%} of
  the supervised examples carried the correct answer this way; the figures below show
  how much the model uses a hint.

## Measured (dev split, {n} problems, `cepo.vision_arith.make_split("dev", {n}, seed={seed})`, max 64 new tokens; the split was called "test" before the dev/test separation)

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
Figures were measured with {threads} CPU threads on a shared machine; `build_figures.json`
holds them and the accuracy-vs-time curve of the build.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="cepo/assets/tiny-vl")
    ap.add_argument("--target", type=float, default=0.40,
                    help="stop supervised training at this dev greedy accuracy")
    ap.add_argument("--max_steps", type=int, default=4000)
    ap.add_argument("--max_cpu_minutes", type=float, default=0.0,
                    help="stop training after this much CPU time of the process (0: no limit)")
    ap.add_argument("--eval_every", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision_hidden", type=int, default=64)
    ap.add_argument("--vision_layers", type=int, default=2)
    ap.add_argument("--init_text", choices=("scratch", "tiny-arith"), default="scratch",
                    help="text model initialisation: random, or cepo/assets/tiny-arith's weights")
    ap.add_argument("--num_train", type=int, default=20000)
    ap.add_argument("--num_dev", type=int, default=100)
    ap.add_argument("--num_test", type=int, default=200)
    args = ap.parse_args()

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    if out.exists():  # a clean folder: no stale file of an older build may override ours
        shutil.rmtree(out)
    out.mkdir(parents=True)
    processor = build_processor(out)
    tok = processor.tokenizer
    model = build_model(tok, args)
    if args.init_text == "tiny-arith":
        init_text_from_tiny_arith(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny-vl: text model from {args.init_text}; Qwen3-VL vision {args.vision_layers}x"
        f"{args.vision_hidden}, text {args.layers}x{args.hidden}, "
        f"{n_params:,} parameters, vocab {len(tok)}, {args.threads} threads, "
        f"target dev greedy accuracy {args.target:.0%}")

    train = make_split("train", args.num_train, args.seed)
    test = make_split("dev", args.num_test, args.seed)  # the held-out figure: the dev split
    test_exprs = {r["expression"] for r in test}
    dev = [r for r in make_split("dev", args.num_dev + args.num_test, args.seed + 1000)
           if r["expression"] not in test_exprs][:args.num_dev]  # early stopping only
    log(f"data: {len(train)} train, {len(dev)} dev, {len(test)} test rows ({time.time() - t0:.0f}s)")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    model.train()
    step, acc, done, curve = 0, 0.0, False, []
    while not done:
        for batch in batches(train, processor, rng, args.batch_size):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            out_of_time = args.max_cpu_minutes > 0 and time.process_time() > 60 * args.max_cpu_minutes
            if step % args.eval_every == 0 or step >= args.max_steps or out_of_time:
                acc = greedy_accuracy(model, processor, dev) if step >= args.warmup else None
                elapsed = time.time() - t0
                cpu = time.process_time()  # CPU seconds of this process: steadier than wall time
                curve.append({"step": step, "seconds": round(elapsed), "cpu_seconds": round(cpu),
                              "loss": round(loss.item(), 4), "dev_greedy_accuracy": acc})
                shown = "   -  " if acc is None else f"{acc:6.1%}"  # not measured before warmup ends
                log(f"step {step:5d}  loss {loss.item():.4f}  dev greedy acc {shown}  "
                    f"({elapsed:.0f}s wall, {cpu:.0f}s CPU)")
                if (acc or 0.0) >= args.target or step >= args.max_steps or out_of_time:
                    done = True
                    break
    train_seconds, train_cpu = time.time() - t0, time.process_time()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    log(f"saved {out} after {train_seconds:.0f}s; evaluating on {len(test)} test problems")
    figures = evaluate(model, processor, test, args.seed)
    figures.update({
        "parameters": n_params, "vocab_size": len(tok), "hidden_size": args.hidden,
        "num_layers": args.layers, "vision_hidden_size": args.vision_hidden,
        "vision_layers": args.vision_layers, "sft_steps": step, "batch_size": args.batch_size,
        "dev_problems": len(dev), "dev_greedy_accuracy_at_stop": acc, "target": args.target,
        "seed": args.seed, "threads": args.threads, "build_seconds": round(train_seconds),
        "build_cpu_seconds": round(train_cpu),
        "evaluation_seconds": round(time.time() - t0 - train_seconds), "curve": curve,
    })
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != "README.md")
    figures["artefact_bytes"] = size
    (out / "build_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out / "README.md").write_text(README.format(
        **figures, params=n_params, size_kb=round(size / 1024), vocab=len(tok), hidden=args.hidden,
        layers=args.layers, vision_hidden=args.vision_hidden,
        minutes=figures["build_seconds"] / 60, cpu_minutes=figures["build_cpu_seconds"] / 60,
        steps=step, batch=args.batch_size, n_dev=len(dev),
        hint_pct=HINT_FRACTION, n=len(test)))
    log(json.dumps({k: v for k, v in figures.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
