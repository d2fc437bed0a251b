"""bench/test_trainer.py's report writer: a run of some trainer benchmarks (``-k``) rewrites
their sections and keeps the others' figures from the previous trainer.json, each section
stamped with when and at which commit it was measured."""

import json

from bench import test_trainer


class FakeBench:
    def __init__(self, out_dir, commit):
        self.out_dir, self.commit = str(out_dir), commit

    def meta(self):
        return {"device": "CPU: test", "date": "2026-12-01T23:00:00+00:00",
                "git_commit": self.commit, "git_dirty": False, "command": "pytest -k sampler",
                "load_average_start": [0.1, 0.1, 0.1], "timing_method": "x"}


def test_partial_run_keeps_the_other_sections(tmp_path, monkeypatch):
    previous = {"meta": {"device": "CPU: test", "date": "2026-11-30T10:00:00+00:00",
                         "git_commit": "a" * 40, "command": "pytest -k shared"},
                "shared_context": {"model": "random Qwen3", "rows": [
                    {"grad": False, "groups": 4, "group_size": 8, "context_len": 16,
                     "response_len": 24, "plain_tokens": 1294, "shared_tokens": 846,
                     "plain_s": 0.075, "shared_s": 0.051, "speedup": 1.47}]}}
    (tmp_path / "trainer.json").write_text(json.dumps(previous))
    case = {"model": "tiny", "prompts": 16, "n": 8, "max_new_tokens": 64, "speedup": 1.37,
            "same_tokens": True, "calls": 5,
            "rows": [{"decoder": "lean", "median_s": 0.276, "min_s": 0.229, "tokens": 3398,
                      "tokens_per_s": 12322.0},
                     {"decoder": "model forward", "median_s": 0.378, "min_s": 0.282,
                      "tokens": 3398, "tokens_per_s": 8980.0}]}
    monkeypatch.setattr(test_trainer, "_RESULTS", {"sampler_decode": {"cases": [case]}})
    test_trainer._write(FakeBench(tmp_path, "b" * 40))
    written = json.loads((tmp_path / "trainer.json").read_text())
    assert written["meta"]["git_commit"] == "b" * 40
    assert written["shared_context"]["measured"]["git_commit"] == "a" * 40
    assert written["shared_context"]["rows"] == previous["shared_context"]["rows"]
    assert written["sampler_decode"]["measured"]["git_commit"] == "b" * 40
    md = (tmp_path / "trainer.md").read_text()
    assert "## Shared-context packing" in md and "commit aaaaaaaaaa" in md
    assert "## Sampler: lean decoding steps" in md and "commit bbbbbbbbbb" in md
    assert "| lean | 0.276 |" in md and "1.37x | True |" in md
