"""cepo.checkpoint: DCP round trips (one process and 2-process FSDP2), atomic saves,
keep_last, no pickle anywhere, and the Hugging Face export with LoRA merged."""

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cepo.checkpoint as ckpt
import dist_checkpoint_worker as worker
from launch import TESTS, torchrun


# ----------------------------------------------------------------------------- one process

def _plain():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def _step(model, opt, sched):
    model(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def _snapshot(model, opt, sched):
    params = [p.detach().clone() for p in model.parameters()]
    moments = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    return params, moments, sched.last_epoch, sched.get_last_lr(), opt.param_groups[0]["lr"]


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for x, y in zip(a[1], b[1]):
        assert x.keys() == y.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
    assert a[2:] == b[2:]


def _draws():
    return torch.rand(4), random.random(), float(np.random.rand())


def test_round_trip_restores_model_optimizer_scheduler_rng_state(tmp_path):
    model, opt, sched = _plain()
    for _ in range(2):
        _step(model, opt, sched)
    trainer_state = {"step": 2, "lambda": 0.3, "data_position": 64, "counters": {"correct": 5}}
    path = ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched,
                                trainer_state=trainer_state)
    assert path == tmp_path / "step_000002" == ckpt.latest_checkpoint(tmp_path)
    saved = _snapshot(model, opt, sched)
    after_save = _draws()

    _step(model, opt, sched)  # perturb everything, RNG streams included
    opt.param_groups[0]["lr"] = 123.0
    _draws()
    state = ckpt.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    assert state == trainer_state
    _assert_same(_snapshot(model, opt, sched), saved)
    after_load = _draws()
    assert torch.equal(after_load[0], after_save[0]) and after_load[1:] == after_save[1:]


def test_one_rank_group_saves_and_loads_without_dcp_collectives(tmp_path, monkeypatch):
    """With a process group of one rank (torchrun --nproc_per_node 1), DCP runs with
    no_dist=True: its distributed save left every later step ~1.8x slower (see
    cepo.checkpoint._no_dist). The checkpoint still round-trips."""
    import torch.distributed as dist

    calls = []
    for name in ("save", "load"):
        real = getattr(ckpt.dcp, name)
        monkeypatch.setattr(ckpt.dcp, name, lambda *a, _real=real, _n=name, **k:
                            calls.append((_n, k.get("no_dist"))) or _real(*a, **k))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, opt, sched = _plain()
        _step(model, opt, sched)
        path = ckpt.save_checkpoint(tmp_path / "ck", 1, model=model, optimizer=opt, scheduler=sched,
                                    trainer_state={"step": 1})
        before = _snapshot(model, opt, sched)
        model2, opt2, sched2 = _plain()
        ckpt.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
        _assert_same(before, _snapshot(model2, opt2, sched2))
    finally:
        dist.destroy_process_group()
    assert calls == [("save", True), ("load", True)]
    assert ckpt._no_dist()  # no process group at all: no_dist too


def test_fresh_optimizer_loads_even_with_gradients_present(tmp_path):
    """A never-stepped optimizer has no state for DCP to load into; torch's own lazy
    init skips it when gradients exist. load_checkpoint must restore the moments anyway."""
    model, opt, sched = _plain()
    _step(model, opt, sched)
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched,
                         trainer_state={"step": 1})
    saved = _snapshot(model, opt, sched)

    fresh, fresh_opt, fresh_sched = _plain()
    fresh(torch.randn(2, 4)).sum().backward()  # gradients before loading
    grads = [p.grad.clone() for p in fresh.parameters()]
    ckpt.load_checkpoint(tmp_path / "step_000001", model=fresh, optimizer=fresh_opt,
                         scheduler=fresh_sched)
    _assert_same(_snapshot(fresh, fresh_opt, fresh_sched), saved)
    for p, g in zip(fresh.parameters(), grads):
        assert torch.equal(p.grad, g)  # left as they were


def test_step_zero_checkpoint_does_not_touch_a_never_stepped_optimizer(tmp_path):
    """torch's get_state_dict initialises a fresh optimizer's state with a step of lr 0
    (AdamW step = 1): saving must undo that, or the run's bias correction would shift."""
    model, opt, sched = _plain()
    ckpt.save_checkpoint(tmp_path, 0, model=model, optimizer=opt, scheduler=sched,
                         trainer_state={"step": 0})
    assert not opt.state
    params = [p.detach().clone() for p in model.parameters()]
    _step(model, opt, sched)  # perturb, then resume from step 0
    ckpt.load_checkpoint(tmp_path / "step_000000", model=model, optimizer=opt, scheduler=sched)
    assert not opt.state and sched.last_epoch == 0 and opt.param_groups[0]["lr"] == 0.1
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)


def test_checkpoint_holds_no_pickle(tmp_path, monkeypatch):
    model, opt, sched = _plain()
    _step(model, opt, sched)
    path = ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched,
                                trainer_state={"step": 1})
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {"COMPLETE", "state.json", "rng_rank00000.safetensors"} <= files
    assert all(f.endswith((".safetensors", ".json")) or f == "COMPLETE" for f in files), files

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ckpt.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)


def test_crash_mid_write_keeps_previous_checkpoint_and_keep_last(tmp_path, monkeypatch):
    model, opt, sched = _plain()
    save = lambda step, **kw: ckpt.save_checkpoint(  # noqa: E731
        tmp_path, step, model=model, optimizer=opt, scheduler=sched,
        trainer_state={"step": step}, **kw)
    first = save(1)

    real_save = ckpt.dcp.save

    def crash(*args, **kwargs):
        real_save(*args, **kwargs)  # the shards are on disk...
        raise RuntimeError("killed")  # ...and the process dies

    monkeypatch.setattr(ckpt.dcp, "save", crash)
    with pytest.raises(RuntimeError, match="killed"):
        save(2)
    monkeypatch.undo()
    stale = tmp_path / "step_000002.tmp"
    assert any(stale.rglob("*.safetensors"))
    assert ckpt.latest_checkpoint(tmp_path) == first

    # a crash after COMPLETE was written inside the .tmp directory, before the rename
    def crash_before_rename(src, dst):
        assert (src / "COMPLETE").exists()
        raise RuntimeError("killed")

    monkeypatch.setattr(ckpt, "_replace_dir", crash_before_rename)
    with pytest.raises(RuntimeError, match="killed"):
        save(2)
    monkeypatch.undo()
    assert (stale / "COMPLETE").exists() and ckpt.latest_checkpoint(tmp_path) == first
    assert ckpt.load_checkpoint(first, model=model, optimizer=opt) == {"step": 1}

    names = lambda: sorted(p.name for p in tmp_path.iterdir())  # noqa: E731
    save(3)  # removes the stale .tmp, keeps 2
    assert names() == ["step_000001", "step_000003"]
    save(4)
    assert names() == ["step_000003", "step_000004"]
    save(5, keep_last=3)
    save(5, keep_last=3)  # the same step again replaces it
    assert names() == ["step_000003", "step_000004", "step_000005"]
    save(6, keep_last=0)  # 0 keeps every checkpoint
    assert len(names()) == 4
    # resumed from step 4 and saving step 5 again: 6 (an abandoned run) must not be latest
    save(5, keep_last=0)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_000005"
    assert "step_000006.abandoned" in names()


def test_clear_errors(tmp_path):
    model, opt, sched = _plain()
    with pytest.raises(TypeError, match="'trainer_state' must be JSON-serialisable"):
        ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt,
                             trainer_state={"step": 1, "bad": object()})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written
    with pytest.raises(ValueError, match="'keep_last'"):
        ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, trainer_state={},
                             keep_last=-1)
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.load_checkpoint(tmp_path / "step_000009", model=model, optimizer=opt)
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, trainer_state={})
    other = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2))
    with pytest.raises(RuntimeError, match="built as in the saving run"):
        ckpt.load_checkpoint(tmp_path / "step_000001", model=other,
                             optimizer=torch.optim.AdamW(other.parameters()))
    with pytest.raises(ValueError, match="no scheduler state"):
        ckpt.load_checkpoint(tmp_path / "step_000001", model=model, optimizer=opt,
                             scheduler=sched)


def test_export_single_process_plain_and_lora(tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.arange(16).reshape(2, 8)
    for name, lm in [("plain", worker.tiny_lm(1)), ("lora", worker.with_lora(worker.tiny_lm(1)))]:
        out = tmp_path / name
        out.mkdir()
        (out / "stale.txt").write_text("an older export: replaced as a whole")
        assert ckpt.export_hf(worker.Root(lm), None, out) == out
        assert not (out / "stale.txt").exists() and not out.with_name(name + ".tmp").exists()
        with torch.no_grad():
            expected = lm(input_ids=ids).logits
            got = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- 2-process FSDP2

def _torchrun(phases: str, work: Path, out: Path) -> None:
    """torchrun, 2 CPU processes, the checkpoint worker (tests/launch.py: no retry)."""
    from cepo.distributed import free_port
    torchrun([TESTS / "dist_checkpoint_worker.py", phases, work, out, free_port()])


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """One torchrun launch (imports dominate its time): train 1 step, save, 1 more step;
    export a LoRA model; then in a fresh process group (new store) build a fresh model
    and optimizer, load, 1 step."""
    work = tmp_path_factory.mktemp("fsdp")
    out = work / "out"
    out.mkdir()
    _torchrun("train,export,resume", work, out)
    return work, out


def _json(out: Path, phase: str) -> dict:
    return json.loads((out / f"{phase}.json").read_text())


def test_fsdp2_resume_continues_exactly(fsdp_runs):
    work, out = fsdp_runs
    train, resume = _json(out, "train"), _json(out, "resume")
    assert train["world"] == resume["world"] == 2
    assert abs(resume["losses"][0] - train["losses"][1]) <= 1e-6
    assert resume["state"] == {"step": 1, "lambda": 0.5, "data_position": 4}
    assert resume["lr"] == train["lr"]
    a, b = load_file(out / "train_after.safetensors"), load_file(out / "resume_after.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("exp_avg_sq") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    step = work / "ckpt" / "step_000001"
    assert sorted(p.name for p in (step / "dcp").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors"]  # each rank wrote its own shards
    assert (step / "rng_rank00001.safetensors").exists()


def test_two_rank_checkpoint_loads_in_one_process(fsdp_runs):
    """Resharding: the 2-rank FSDP2 checkpoint into a plain module, no process group;
    the RNG streams cannot be restored per rank and are re-seeded, with a warning."""
    work, out = fsdp_runs
    root, opt, sched = worker.Root(worker.tiny_lm(seed=7)), None, None
    opt = torch.optim.AdamW(root.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    with pytest.warns(UserWarning, match="re-seeded"):
        state = ckpt.load_checkpoint(work / "ckpt" / "step_000001", model=root, optimizer=opt,
                                     scheduler=sched)
    assert state["step"] == 1 and sched.last_epoch == 1
    saved = load_file(out / "train_at_save.safetensors")
    for name, p in root.named_parameters():
        torch.testing.assert_close(p.detach(), saved[f"model.{name}"], rtol=0, atol=0)
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][k].reshape(-1), saved[f"optim.{name}.{k}"],
                                       rtol=0, atol=0)


def test_fsdp2_export_merges_lora(fsdp_runs):
    _, out = fsdp_runs
    r = _json(out, "export")
    assert r["world"] == 2
    assert r["merged_err"] < 1e-5 and r["adapter_err"] < 1e-5
    assert r["base_err"] > 1e-2  # the adapter changes the logits: the merge mattered
    assert r["plain_class"] == "Qwen3ForCausalLM" and not r["lora_in_names"] and r["tied"]
    assert {"config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json"} <= set(r["files"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(r["adapter_files"])
