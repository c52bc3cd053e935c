"""scripts/memory_table.py: the arithmetic of one row checked against a hand computation, and both outputs."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "memory_table.py"


def load():
    spec = importlib.util.spec_from_file_location("memory_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_table"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_llada_full_fsdp2_row_by_hand():
    """LLaDA-8B, full fine-tuning, FSDP2 / ZeRO-3, 8 GPUs, prompt 256, response 512, block 32, one pair per
    GPU, gradient checkpointing:

    weights   2 x 8e9 / 8 = 2.0e9, plus the gathered units: the largest is the LM head,
              126464 x 4096 = 517,996,544 params (a layer: 4 x 4096^2 + 3 x 4096 x 12288 = 218,103,808),
              x 2 bytes x 2 (in use, prefetched) = 2,071,986,176             -> 4,071,986,176
    grads     2 x 8e9 / 8 = 2.0e9;  Adam 12 x 8e9 / 8 = 12.0e9;  reference 2 x 8e9 / 8 = 2.0e9
    row       S = 256 + 2 x (2 x 512 - 32) = 2240 columns
    layer in  32 layers x 2 bytes x 4096 x 2240                             =   587,202,560
    one layer 2 x (6 x 4096 + 2 x 4096 + 4 x 12288) x 2240 = 2 x 81920 x 2240 =   367,001,600
    logits    2 x 512 reads x 126464 x (2 + 4) bytes                         =   776,994,816
    activations 1,731,198,976;  total 4,071,986,176 + 16.0e9 + 1,731,198,976 = 21,803,185,152 bytes
    """
    m = load()
    row = next(
        r
        for r in m.table(m.Run())
        if r["model"] == "LLaDA-8B" and r["method"] == "full" and r["strategy"] == "FSDP2 / ZeRO-3"
    )
    assert row["weights"] == pytest.approx(4.071986176)
    assert (row["grads"], row["adam"], row["reference"]) == pytest.approx((2.0, 12.0, 2.0))
    assert row["act mb1 ckpt"] == pytest.approx(1.731198976)
    assert row["total mb1 ckpt"] == pytest.approx(21.803185152)
    assert row["total mb2 ckpt, precomputed ref"] == pytest.approx(row["total mb2 ckpt"] - 2.0)


def test_lora_has_no_reference_and_ddp_shards_nothing():
    m = load()
    rows = m.table(m.Run())
    assert all(r["reference"] == 0 for r in rows if r["method"].startswith("LoRA"))
    ddp = next(r for r in rows if r["strategy"] == "DDP" and r["method"] == "full" and r["model"] == "LLaDA-8B")
    assert (ddp["weights"], ddp["grads"], ddp["adam"], ddp["reference"]) == pytest.approx((16.0, 16.0, 96.0, 16.0))
    # LoRA r=16 on LLaDA-8B: per layer 16 x (2 x 8192 + 2 x 8192 + 3 x 16384) = 1,310,720; x 32 layers
    assert m.lora_params(m.MODELS[0], 16) == 41_943_040


def test_markdown_and_json_outputs():
    run = [sys.executable, str(SCRIPT)]
    table = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert table.startswith("| model |") and "S = 2240 columns" in table
    rows = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, check=True).stdout)
    assert len(rows) == 24 and len(table.strip().splitlines()) == 2 + 24 + 2


def test_llada2_mini_parameters_by_hand():
    """LLaDA2-mini's config (dFactory llada2_mini/config.json): embeddings and head 2 x 157184 x 2048 =
    643,825,664; attention 20 x (2 x 2048^2 + 2 x 2048 x 512) = 209,715,200; the dense first layer
    3 x 2048 x 5120 = 31,457,280; 19 MoE layers x (3 x 2048 x 512 x (256 + 1) + 256 x 2048) = 15,370,551,296:
    16,255,549,440 (the published "16B"). LoRA r=16 on a MoE layer: attention 16 x (2 x 4096 + 2 x 2560) =
    212,992, shared 16 x 3 x 2560 = 122,880, routed 256 x 16 x (3072 + 2560) = 23,068,672."""
    m = load()
    mini = next(s for s in m.MODELS if s.name.startswith("LLaDA2-mini"))
    assert mini.params == 16_255_549_440
    dense_layer = 212_992 + 16 * 3 * (2048 + 5120)
    assert m.lora_params(mini, 16) == dense_layer + 19 * (212_992 + 122_880 + 23_068_672)
