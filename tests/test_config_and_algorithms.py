"""Configuration parsing and the algorithm's small pieces (advantages, lambda)."""

import math
from pathlib import Path

import pytest
import torch

from cepo.algorithms import group_advantages, lambda_at
from cepo.config import TrainConfig, build_parser, parse_config
from cepo.metrics import MetricsLogger, plot_training_curves, read_metrics


def test_defaults_and_overrides():
    cfg = parse_config([])
    assert cfg.algo == "cepo" and cfg.lam0 == 0.5 and cfg.clip_high == 0.28
    cfg = parse_config(["--algo", "grpo", "--lr", "1e-6", "--std_normalize", "false"])
    assert cfg.algo == "grpo" and cfg.lr == 1e-6 and cfg.std_normalize is False


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in text, name
    assert "default: cepo" in text


def test_unknown_option_is_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--lerning_rate", "1"])
    assert "lerning_rate" in capsys.readouterr().err


def test_yaml_config_with_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo: rlsd\ngroup_size: 4\nlr: 0.001\n")
    cfg = parse_config(["--config", str(path), "--lr", "0.01"])
    assert cfg.algo == "rlsd" and cfg.group_size == 4 and cfg.lr == 0.01


def test_flags_override_a_config_file_wherever_it_stands(tmp_path):
    """`--algo grpo --config x.yaml` trains GRPO even though x.yaml says cepo: a file's
    values are defaults (cepo.compare puts its per-run flags before the user's options)."""
    first = tmp_path / "a.yaml"
    first.write_text("algo: cepo\ngroup_size: 4\nlr: 0.001\nsteps: 7\n")
    second = tmp_path / "b.yaml"
    second.write_text("lr: 0.002\n")
    cfg = parse_config(["--algo", "grpo", "--seed", "11", "--config", str(first), "--steps", "3"])
    assert (cfg.algo, cfg.seed, cfg.steps, cfg.group_size, cfg.lr) == ("grpo", 11, 3, 4, 0.001)
    cfg = parse_config(["--lr", "0.5", f"--config={first}", "--config", str(second)])
    assert (cfg.algo, cfg.lr, cfg.steps) == ("cepo", 0.5, 7)
    cfg = parse_config(["--config", str(first), "--config", str(second)])
    assert cfg.lr == 0.002  # files apply in their order


def test_example_gpu_config_parses():
    path = Path(__file__).parents[1] / "cepo" / "configs" / "qwen2.5-math-1.5b-gpu.yaml"
    parser = build_parser()
    ns = parser.parse_args(["--config", str(path)])
    assert ns.model == "/models/Qwen2.5-Math-1.5B" and ns.prompts_per_step == 32


@pytest.mark.parametrize("argv,field", [
    (["--group_size", "1"], "group_size"),
    (["--lam0", "1.5"], "lam0"),
    (["--hint_template", "no placeholder"], "hint_template"),
    (["--model", "/nonexistent/model"], "model"),
    (["--token_budget", "10"], "token_budget"),
])
def test_invalid_values_name_the_field(argv, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        parse_config(argv)


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = group_advantages(rewards)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert (adv[1] == 0).all()  # all equal: no signal, exactly zero
    assert adv[2, 3] > 0 and (adv[2, :3] < 0).all()
    dr = group_advantages(rewards, std_normalize=False)
    torch.testing.assert_close(dr[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3, 1))


def test_lambda_schedules():
    kw = dict(lam0=0.5, t_warm=10)
    assert lambda_at(0, algo="cepo", schedule="linear", **kw) == 0.5
    assert lambda_at(5, algo="cepo", schedule="linear", **kw) == pytest.approx(0.25)
    assert lambda_at(10, algo="cepo", schedule="linear", **kw) == 0.0
    assert lambda_at(5, algo="rlsd", schedule="cosine", **kw) == pytest.approx(0.25)
    assert lambda_at(2, algo="cepo", schedule="cosine", **kw) == pytest.approx(
        0.25 * (1 + math.cos(math.pi * 0.2)))
    assert lambda_at(50, algo="cepo", schedule="constant", **kw) == 0.5
    assert lambda_at(0, algo="grpo", schedule="constant", **kw) == 0.0


def test_metrics_log_resume_and_plot(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 5):
        logger.log(step, {"reward_mean": step / 10, "accuracy": torch.tensor(0.5), "lambda": 0.1})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    MetricsLogger(tmp_path, enabled=True, resume_step=2).close()  # checkpoint after step 2
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    png = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert png.stat().st_size > 1000


def test_tensorboard_and_wandb_options(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    logger.log(1, {"reward_mean": 0.5})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="wandb"):
            MetricsLogger(tmp_path, enabled=True, wandb_project="p")


def test_logprob_check_aligns_tokens_and_skips_unmeasured():
    """Sampler vs trainer log-probs: tokens the sampler did not report and NaN trainer
    entries (rollouts outside the first mini-batch) are skipped; mean and max reduce."""
    import math

    from cepo.rollout import TrainItem
    from cepo.step_metrics import StepMetrics
    from cepo.train import record_logprob_check

    items = [TrainItem([1], None, None, [5, 6, 2], 1.0, True, [-0.5, -1.0]),  # 2 not reported
             TrainItem([1], None, None, [7], -1.0, False, [-2.0])]
    trainer = torch.tensor([-0.5, -1.25, -3.0, float("nan")])
    m = StepMetrics()
    record_logprob_check(items, trainer, m)
    out = m.reduce()
    assert math.isclose(out["logprob_diff_mean"], 0.125) and math.isclose(out["logprob_diff_max"], 0.25)
    for trainer_lp in (None, trainer):
        m = StepMetrics()
        m.declare("logprob_diff_mean", "logprob_diff_max")
        if trainer_lp is not None:
            items[1].sampler_logprobs = None  # the sampler was not asked
        record_logprob_check(items, trainer_lp, m)
        assert m.reduce() == {"logprob_diff_mean": None, "logprob_diff_max": None}
