"""scripts/gpu_throughput.py runs on CPU with the tiny model and writes a sane JSON result."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "gpu_throughput.py"


def test_two_cpu_steps_write_positive_throughput_and_mfu(tmp_path):
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "2", "--prompt", "16", "--response", "16",
           "--block_size", "8", "--output", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tokens_per_s"] > 0 and result["columns_per_s"] > 0
    assert 0 < result["mfu"] <= 1
    # the reference runs the same columns as the policy (a live reference: 4 passes per pair)
    assert result["policy_columns_per_step"] == result["reference_columns_per_step"] > 16 + 2 * 16


def test_a_family_config_builds_its_shape_with_random_weights(tmp_path):
    from tests.families.test_loading import LLADA_CONFIG

    (tmp_path / "config.json").write_text(json.dumps(LLADA_CONFIG))
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, str(SCRIPT), "--config", str(tmp_path / "config.json"), "--device", "cpu", "--steps", "2",
           "--prompt", "16", "--response", "16", "--block_size", "8", "--output", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["params_for_flops"] > 0 and 0 < result["mfu"] <= 1
