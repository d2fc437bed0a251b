"""The embedded default's accuracy gain (slow: minutes on 2 cores; excluded from CI).

Run: python -m pytest tests/test_demo_slow.py -m slow -s
"""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_default_run_improves_held_out_accuracy(tmp_path):
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                    "-m", "cepo.train", "--output_dir", str(tmp_path), "--progress", "false"],
                   check=True, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    print(summary)
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.05
    assert summary["wall_seconds"] < 600
