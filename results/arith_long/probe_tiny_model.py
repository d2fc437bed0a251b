"""Can the shipped tiny model (trained on 2-3 operation problems) write longer solutions?

Greedy and sampled (T = 1, 8 per problem) generation on 100 dev problems per operation
count; figures: accuracy, pass@8, share of responses with a boxed answer, share that
write one line per operation, response length, and the share of decisive tokens
(cepo.credit.decisive_mask) in the reference solutions. Writes probe.json next to itself.

    OMP_NUM_THREADS=1 python results/arith_long/probe_tiny_model.py
"""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cepo.answers import extract_boxed
from cepo.arithmetic import make_split
from cepo.config import TINY_MODEL
from cepo.credit import decisive_mask, token_texts

torch.set_num_threads(1)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(TINY_MODEL, local_files_only=True)
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, local_files_only=True).eval()
N, K, MAX_NEW = 100, 8, 160


def generate(prompts, sample: bool):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=K) \
        if sample else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=MAX_NEW, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **kw)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


figures = {}
for n_ops in (None, 4, 5, 6, 8):
    rows = make_split("dev", N, 0, n_ops=n_ops)
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                       add_generation_prompt=True, tokenize=False) for r in rows]
    greedy = generate(prompts, sample=False)
    sampled = generate(prompts, sample=True)
    ops = [r["solution"].count("=") for r in rows]
    right = [extract_boxed(t) == r["answer"] for t, r in zip(greedy, rows)]
    s_right = [[extract_boxed(sampled[i * K + j]) == r["answer"] for j in range(K)]
               for i, r in enumerate(rows)]
    ref_masks = [decisive_mask(token_texts(tok, tok(r["solution"] + tok.eos_token,
                                                    add_special_tokens=False)["input_ids"]))
                 for r in rows]
    figures["2-3" if n_ops is None else str(n_ops)] = {
        "problems": N,
        "greedy_accuracy": sum(right) / N,
        "greedy_boxed_rate": sum(extract_boxed(t) is not None for t in greedy) / N,
        "greedy_one_line_per_operation": sum(t.count("=") == k for t, k in zip(greedy, ops)) / N,
        "greedy_lines_mean": sum(t.count("=") for t in greedy) / N,
        "sample_accuracy_T1": sum(map(sum, s_right)) / (N * K),
        "pass_at_8_T1": sum(any(x) for x in s_right) / N,
        "samples_one_line_per_operation": sum(
            sampled[i * K + j].count("=") == ops[i] for i in range(N) for j in range(K)) / (N * K),
        "greedy_response_tokens_mean": sum(len(tok(t, add_special_tokens=False)["input_ids"])
                                           for t in greedy) / N,
        "reference_tokens_mean": sum(len(m) for m in ref_masks) / N,
        "reference_decisive_share": sum(map(sum, ref_masks)) / sum(map(len, ref_masks)),
        "example": {"prompt": rows[0]["prompt"], "reference": rows[0]["solution"],
                    "greedy": greedy[0]},
    }
    print(n_ops, {k: v for k, v in figures["2-3" if n_ops is None else str(n_ops)].items()
                  if k != "example"}, flush=True)
(Path(__file__).parent / "probe.json").write_text(json.dumps(figures, indent=2) + "\n")
