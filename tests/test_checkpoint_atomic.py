"""Checkpoints in one process: round trip, atomicity under a crash, keep_last."""

import random

import pytest
import torch

import cepo.checkpoint as ckpt


def _state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched):
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = _state()
    for _ in range(2):
        _train(model, opt, sched)
    ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched,
                         trainer_state={"step": 2, "lambda": 0.4})
    after_save = (torch.rand(3), random.random())
    params = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    _train(model, opt, sched)  # perturb everything

    fresh, fresh_opt, fresh_sched = _state()  # never stepped
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), model=fresh,
                                 optimizer=fresh_opt, scheduler=fresh_sched)
    assert state == {"step": 2, "lambda": 0.4}
    for a, b in zip(fresh.parameters(), params):
        torch.testing.assert_close(a, b)
    for p, m in zip(fresh.parameters(), moments):
        torch.testing.assert_close(fresh_opt.state[p]["exp_avg"], m)
    assert fresh_sched.last_epoch == 2
    # RNG: the draws after loading equal the draws after saving
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), model=fresh, optimizer=fresh_opt)
    assert torch.equal(torch.rand(3), after_save[0]) and random.random() == after_save[1]


def test_crash_mid_write_keeps_previous_and_cleans_up(tmp_path, monkeypatch):
    model, opt, sched = _state()
    first = ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, trainer_state={"step": 1})
    real_save = ckpt.dcp.save

    def crash(*args, **kwargs):
        real_save(*args, **kwargs)  # files are on disk...
        raise RuntimeError("killed")  # ...and the process dies before completing

    monkeypatch.setattr(ckpt.dcp, "save", crash)
    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, trainer_state={"step": 2})
    assert (tmp_path / "step_000002.tmp").exists()
    assert ckpt.latest_checkpoint(tmp_path) == first
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=opt, trainer_state={"step": 3})
    assert not (tmp_path / "step_000002.tmp").exists()
    ckpt.save_checkpoint(tmp_path, 4, model=model, optimizer=opt, trainer_state={"step": 4},
                         keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004"]
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.load_checkpoint(tmp_path / "nope", model=model, optimizer=opt)
