"""scripts/sampler_speed.py: the arms' forwards on the tiny model and a family checkpoint's shape, and the
1.7B shape it builds for the GPU check (against Qwen3-1.7B's published parameter counts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "sampler_speed.py"


def run(tmp_path, *flags) -> dict:
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(SCRIPT), "--prompts", "4", "--repeats", "1", "--threads", "1", "--output", str(out),
           *flags]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| one_per_step |" in done.stdout
    return json.loads(out.read_text())


def test_tiny_model_arms_take_one_forward_per_step(tmp_path):
    result = run(tmp_path, "--shape", "tiny:32x1", "--prompt_length", "8", "--new_tokens", "16", "--profile")
    arms = result["arms"]
    assert set(arms) == {"autoregressive", "one_per_step", "one_per_step_no_cache", "two_per_step"}
    assert arms["autoregressive"]["ratio_to_autoregressive"] == 1.0
    assert arms["autoregressive"]["nfe_per_batch"] == arms["one_per_step"]["nfe_per_batch"] == 16
    assert arms["two_per_step"]["nfe_per_batch"] == 8 and arms["two_per_step"]["tokens_per_forward"] == 2.0
    assert all(row["positions"] == 4 * 16 for row in arms.values())  # EOS ignored: every arm decodes it all
    shares = [row["share"] for row in result["profile"]["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9


def test_a_family_config_runs_on_its_own_grid(tmp_path):
    from tests.families.test_loading import write_sdar

    write_sdar(tmp_path / "sdar")
    result = run(tmp_path, "--shape", f"config:{tmp_path / 'sdar' / 'config.json'}", "--block_size", "4",
                 "--prompt_length", "6", "--new_tokens", "8")  # fmt: skip
    assert result["attention"] == "block_causal"
    # prompts of 6 end inside a block of 4 (absolute grid): its 2 free slots, then blocks up to the one holding the
    # 8th new token (position 13): 2 + 4 + 4 steps and positions, one token per step
    one = result["arms"]["one_per_step"]
    assert one["nfe_per_batch"] == 10 and one["positions"] == 4 * 10


def test_the_gpu_shape_is_qwen3_1_7b(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from sampler_speed import model_for
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    with torch.device("meta"):
        model, adapter, _ = model_for("qwen3-1.7b", 4, torch.bfloat16, tmp_path)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    # Qwen3-1.7B's model card: 1.7B parameters, 1.4B of them outside the (tied) embedding
    assert total == pytest.approx(1.7e9, rel=0.03) and total - embedding == pytest.approx(1.4e9, rel=0.03)
    assert adapter.attention == "block_causal" and adapter.block_size == 4 and not adapter.shifted
