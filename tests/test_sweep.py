"""The CEPO sweep's plumbing (the runs themselves are minutes each: not in CI)."""

import json

from cepo import sweep
from cepo.arithmetic import make_split
from cepo.config import parse_config


def test_hard_train_split_is_three_op_and_disjoint_from_eval(tmp_path):
    path = sweep.write_hard_train(tmp_path / "hard.jsonl", num_train=300)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 300
    assert all(r["solution"].count("=") == 3 and r["prompt"] and r["answer"] for r in rows)
    held_out = {r["prompt"] for r in make_split("test", 200, seed=0)}
    assert not held_out & {r["prompt"] for r in rows}


def test_every_variant_parses_as_trainer_options(tmp_path):
    for name, args in {**sweep.VARIANTS, **sweep.OPTIONAL}.items():
        resolved = sweep._resolve(args, tmp_path, base_lr=1e-4)
        assert "--lr_scale" not in resolved and sweep.HARD_TRAIN not in resolved, name
        cfg = parse_config(resolved)  # unknown or invalid options would raise
        if "--lr_scale" in args:
            assert cfg.lr == 1e-4 * float(args[args.index("--lr_scale") + 1])


def test_table_reports_difference_to_grpo():
    result = {"config": {"seeds": [0, 1], "extra_trainer_args": ["--steps", "60"],
                         "wall_seconds": 1},
              "variants": {"grpo": {"mean": 0.5, "std": 0.01, "per_seed": [0.49, 0.51],
                                    "base": 0.4},
                           "cepo": {"mean": 0.53, "std": 0.02, "per_seed": [0.51, 0.55],
                                    "base": 0.4}}}
    table = sweep._table(result)
    assert "| cepo | 0.530 ± 0.020 | 0.510, 0.550 | +0.030 |" in table
    assert "Base model: 0.400" in table
