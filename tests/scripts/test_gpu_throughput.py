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


def test_llada2_mini_shape_counts_the_active_experts_only(tmp_path):
    """The llada2-mini shape on the meta device: 16,255,549,440 parameters plus the norms (20 layers x
    (2 x 2048 + 2 x 128) + 2048 = 89,088); FLOPs count per token the attention (209,715,200), the dense first
    layer (31,457,280), per MoE layer 8 routed + 1 shared expert (9 x 3 x 2048 x 512) and the router (256 x 2048)
    (19 x 28,835,840 = 547,880,960) and the head (321,912,832): 1,111,055,360 with the norms."""
    import importlib.util

    import torch
    from transformers import Glm4MoeForCausalLM

    from dtrpo.families import FAMILIES, native_config

    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json.loads(Path(module.shape_config("llada2-mini", tmp_path, 32)).read_text())
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(native_config(config, FAMILIES["llada2"]))
    assert sum(p.numel() for p in model.parameters()) == 16_255_549_440 + 89_088
    assert module.flop_params(model) == 1_111_055_360
