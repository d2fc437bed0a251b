"""Two ranks (torchrun, gloo) each build a VLLMEngine on the stand-in: construction is
collective (every rank builds, with the same model and settings), and with per-prompt
seeds a prompt's samples are the same whichever rank draws it and whatever else that
rank's call holds: the rollouts of a step do not depend on the number of processes.

Run as a script by the test (``python -m torch.distributed.run ... this_file``)."""

import json
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
CONTENTS = ("1+2", "(3*4)-5", "9", "12*(3+4)-56/8", "0")
SEEDS = [31, 32, 33, 34, 35]


def _launch(model_dir, out, mode):
    from launch import torchrun, worker_env

    torchrun([__file__, str(model_dir), str(out), mode], nproc=2,
             env=worker_env(VLLM_ENABLE_V1_MULTIPROCESSING="1"))
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_lm import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("qwen3_ranks"), arch="qwen3", seed=6)


def test_two_ranks_sample_what_one_rank_samples(model_dir, tmp_path):
    ranks = _launch(model_dir, tmp_path / "out", "same")
    everything = ranks[0]["all"]
    assert ranks[1]["all"] == everything  # engines seeded by rank: per-prompt seeds decide
    for r, result in enumerate(ranks):
        mine = list(range(r, len(CONTENTS), 2))
        assert result["mine"] == [everything[p] for p in mine]
    assert len({tuple(t) for group in everything for t in group}) > 3  # really sampled


def test_construction_is_collective(model_dir, tmp_path):
    """A rank that builds a different engine (another dtype) fails on every rank."""
    ranks = _launch(model_dir, tmp_path / "out", "mismatch")
    assert all("ranks built different engines" in r["error"] for r in ranks)


def main(model_dir: str, out: str, mode: str) -> None:
    import torch.distributed as dist
    from transformers import AutoTokenizer

    sys.path.insert(0, str(TESTS))
    import fake_vllm
    from cepo.contexts import render_prompt
    from cepo.sampler import SamplingParams

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    sys.modules["vllm"] = fake_vllm
    from cepo.sampler.vllm_engine import VLLMEngine

    tok = AutoTokenizer.from_pretrained(model_dir)
    result = {}
    dtype = "float16" if mode == "mismatch" and rank == 1 else "float32"
    try:
        engine = VLLMEngine(model_dir, tokenizer=tok, seed=0, rank=rank, dtype=dtype)
    except AssertionError as e:
        result["error"] = str(e)
    else:
        prompts = [render_prompt(tok, c) for c in CONTENTS]
        params = SamplingParams(max_new_tokens=5)
        mine = list(range(rank, len(prompts), 2))
        tokens = lambda out: [[c.token_ids for c in g] for g in out]  # noqa: E731
        result["mine"] = tokens(engine.generate([prompts[p] for p in mine], 3, params,
                                                seeds=[SEEDS[p] for p in mine]))
        result["all"] = tokens(engine.generate(prompts, 3, params, seeds=SEEDS))
        engine.close()
    Path(f"{out}.{rank}").write_text(json.dumps(result))


if __name__ == "__main__":
    from cepo.distributed import shutdown

    main(*sys.argv[1:4])
    shutdown()
