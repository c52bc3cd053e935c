"""`dtrpo demo --quick`, as a user runs it: a fresh process, the whole loop on the tiny model."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick(tmp_path):
    """The README's first command, as a user runs it (in a fresh process), in its --quick form."""
    cmd = [sys.executable, "-m", "dtrpo.cli", "demo", "--quick", "--output_dir", str(tmp_path / "demo")]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SFT + dTRPO" in out.stdout
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["pairs"]["pairs"] > 0 and report["history"]
    for name in (
        "model",
        "sft",
        "dtrpo",
        "sft_data.jsonl",
        "pairs.jsonl",
        "eval_sft.json",
        "eval_dtrpo.json",
        "curves.png",
    ):
        assert (tmp_path / "demo" / name).exists(), name
