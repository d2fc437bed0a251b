"""Run under torchrun (2 processes, gloo, CPU): cepo.checkpoint with FSDP2 on a tiny Qwen3.

    dist_checkpoint_worker.py PHASES DIR OUT PORT   PHASES: comma-separated, in order;
                                                    PORT: a free port for the resume's group

    train   1 step, save to DIR/ckpt, 1 more step (loss, params)
    resume  in a fresh process group (the previous one destroyed): fresh model and
            optimizer, load the latest checkpoint in DIR/ckpt, 1 step
    export  LoRA model: 1 step, export to DIR/export/{merged,adapter}, reload on rank 0,
            compare logits with the sharded LoRA model's

Rank 0 writes OUT/<phase>.json (losses, logits errors) and OUT/<phase>_*.safetensors
(full parameters / optimizer moments gathered from the shards).
"""

import datetime
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from cepo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cepo.distributed import shutdown
from cepo.export import export_hf

VOCAB = 64


def tiny_lm(seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                                      attn_implementation="eager")
    return transformers.Qwen3ForCausalLM(config)


def with_lora(lm):
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    for name, p in lm.named_parameters():
        if "lora_B" in name:  # non-zero B so that the merge matters
            torch.nn.init.normal_(p, std=0.1)
    return lm


class Root(torch.nn.Module):
    """Like the trainer's policy: the HF model is ``.lm``; the root is the FSDP2 root."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, loss: bool = True):
        out = self.lm(input_ids=ids, labels=ids if loss else None, use_cache=False)
        return out.loss if loss else out.logits


def shard(root: Root) -> Root:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    base = root.lm.get_base_model() if hasattr(root.lm, "get_base_model") else root.lm
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return root


def build(seed: int, lora: bool = False):
    lm = tiny_lm(seed)
    if lora:
        lm = with_lora(lm)
    root = shard(Root(lm))
    opt = torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return root, opt, sched


def batch() -> torch.Tensor:
    """This rank's data, drawn from all three global RNGs (so a resume must restore them)."""
    length = random.randint(8, 12)
    shift = int(np.random.randint(0, VOCAB))
    return (torch.randint(0, VOCAB, (2, length)) + shift) % VOCAB


def train_step(root, opt, sched) -> float:
    loss = root(batch())
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def dump_full(root, opt, path: Path) -> None:
    """Full (gathered) parameters and AdamW moments, written by rank 0."""
    from safetensors.torch import save_file

    model_sd, optim_sd = get_state_dict(root, opt, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        flat = {f"model.{k}": v for k, v in model_sd.items()}
        for fqn, state in optim_sd["state"].items():
            for k in ("exp_avg", "exp_avg_sq", "step"):
                flat[f"optim.{fqn}.{k}"] = state[k].reshape(-1)
        save_file({k: v.contiguous() for k, v in flat.items()}, str(path))


def seed_data_rngs() -> None:
    rank = dist.get_rank()
    torch.manual_seed(1000 + rank)
    random.seed(2000 + rank)
    np.random.seed(3000 + rank)


def slow_rank1_writes():
    """Rank 1 writes its per-rank files 2 s late: rank 0 must wait for them before it
    publishes the checkpoint (a race that CI once hit)."""
    import time

    import safetensors.torch

    original = safetensors.torch.save_file

    def late(*args, **kwargs):
        time.sleep(2.0)
        return original(*args, **kwargs)

    if dist.get_rank() == 1:
        safetensors.torch.save_file = late
    return original


def train(ckpt: Path, out: Path) -> dict:
    import safetensors.torch

    root, opt, sched = build(seed=0)
    seed_data_rngs()
    first = train_step(root, opt, sched)
    original = slow_rank1_writes()
    save_checkpoint(ckpt, 1, model=root, optimizer=opt, scheduler=sched,
                    trainer_state={"step": 1, "lambda": 0.5, "data_position": 4})
    safetensors.torch.save_file = original
    dump_full(root, opt, out / "train_at_save.safetensors")
    second = train_step(root, opt, sched)
    dump_full(root, opt, out / "train_after.safetensors")
    return {"losses": [first, second], "lr": sched.get_last_lr()}


def resume(ckpt: Path, out: Path) -> dict:
    root, opt, sched = build(seed=123)  # other weights: only the load can make them equal
    torch.manual_seed(99)  # other RNG streams too: only the load can restore them
    random.seed(99)
    np.random.seed(99)
    state = load_checkpoint(latest_checkpoint(ckpt), model=root, optimizer=opt, scheduler=sched)
    loss = train_step(root, opt, sched)
    dump_full(root, opt, out / "resume_after.safetensors")
    return {"losses": [loss], "state": state, "lr": sched.get_last_lr()}


def export(export_dir: Path, out: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    root, opt, sched = build(seed=0, lora=True)
    seed_data_rngs()
    train_step(root, opt, sched)  # the exported adapter is a trained, sharded one
    ids = torch.arange(20).reshape(2, 10) % VOCAB
    with torch.no_grad():
        logits = root(ids, loss=False)  # the LoRA model under FSDP2: the reference
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {f"t{i}": i for i in range(VOCAB)}, unk_token="t0")), eos_token="t1")
    merged = export_hf(root, tok, export_dir / "merged")
    adapter = export_hf(root, tok, export_dir / "adapter", merge_lora=False)
    result = {}
    if dist.get_rank() == 0:
        plain = AutoModelForCausalLM.from_pretrained(merged)
        names = [n for n, _ in plain.named_parameters()]
        with torch.no_grad():
            result["merged_err"] = (plain(input_ids=ids).logits - logits).abs().max().item()
            peft_model = PeftModel.from_pretrained(tiny_lm(seed=0), adapter)
            result["adapter_err"] = (peft_model(input_ids=ids).logits - logits).abs().max().item()
            # the merge matters: the base alone is far off
            result["base_err"] = (tiny_lm(seed=0)(input_ids=ids).logits - logits).abs().max().item()
        result.update(files=sorted(p.name for p in merged.iterdir()),
                      adapter_files=sorted(p.name for p in adapter.iterdir()),
                      plain_class=type(plain).__name__,
                      lora_in_names=any("lora" in n for n in names),
                      tied=plain.lm_head.weight is plain.model.embed_tokens.weight)
    return result


def main(phases: str, work: str, out: str, port: str = "0") -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    work, out = Path(work), Path(out)
    for i, phase in enumerate(phases.split(",")):
        if phase == "resume" and i > 0:  # nothing of the saving run's group survives
            rank, world = dist.get_rank(), dist.get_world_size()
            shutdown()  # barrier, destroy, gloo's threads joined (cepo.distributed.shutdown)
            # A new store hosted by rank 0: re-using torchrun's races on the old group's
            # keys, and init_method="tcp://" under torchrun makes every rank a client.
            store = dist.TCPStore("127.0.0.1", int(port), world, is_master=rank == 0,
                                  timeout=datetime.timedelta(seconds=120))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=120))
        fn, target = {"train": (train, "ckpt"), "resume": (resume, "ckpt"),
                      "export": (export, "export")}[phase]
        result = fn(work / target, out)
        result["world"] = dist.get_world_size()
        if dist.get_rank() == 0:
            (out / f"{phase}.json").write_text(json.dumps(result))
        dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:5])
    shutdown()  # after main's models and DTensors are gone: they hold the process group
