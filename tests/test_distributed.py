"""The reference under sharded training (`dtrpo.distributed`): a whole frozen copy on one process, and
FSDP2 on two gloo processes training exactly like one process, with policy and reference sharded.

accelerate selects FSDP only on accelerators: on CPU, `fsdp=...` in TrainingArguments stays `MULTI_CPU` and
the Trainer would wrap the model in DDP (accelerate 1.15, `AcceleratorState.__init__`). The trainer switches
such a run to FSDP (`DiffusionTrainer.create_accelerator_and_postprocess`); everything after that
(accelerate's `fsdp2_prepare_model`, `fully_shard` on a gloo CPU mesh, the sharded reference) is the real
code path. Run as a script under `torch.distributed.run`, this file is the worker of that test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtrpo import DTRPOTrainer
from dtrpo.distributed import prepare_reference, reference_copy
from dtrpo.models import init_tiny, make_tiny_model
from dtrpo.teardown import end_process, leave_process_group
from tests.test_reference import config

FSDP2 = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["Qwen3DecoderLayer"], "reshard_after_forward": True}


def shard_shapes(model) -> dict[str, list]:
    """Each parameter's (type, local shape, full shape): a DTensor's local shard is what this rank holds."""
    return {
        n: [type(p).__name__, list(getattr(p, "_local_tensor", p).shape), list(p.shape)]
        for n, p in model.named_parameters()
    }


def worker(model_dir: str, data: str, out: str) -> None:
    """One rank of the FSDP2 run: 2 pairs per rank and step; writes what it saw to rank<i>.json."""
    args = config(out, per_device_train_batch_size=2, ddp_backend="gloo", fsdp="full_shard", fsdp_config=FSDP2)
    trainer = DTRPOTrainer(model_dir, args=args, train_dataset=data)
    trainer.train()
    result = {
        "world": args.world_size,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "epoch": trainer.state.epoch,
        "policy": shard_shapes(trainer.model),
        "reference": shard_shapes(trainer.ref_model),
    }
    Path(out, f"rank{args.process_index}.json").write_text(json.dumps(result))
    leave_process_group()  # as the CLI does


def test_reference_copy_is_whole_frozen_and_apart(tokenizer):
    model = make_tiny_model(tokenizer, block_size=4)
    ref = reference_copy(model.train())
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
        assert p.requires_grad and not q.requires_grad
    assert model.training and not ref.training


def test_prepare_reference_on_one_process_is_the_module_on_the_device(tokenizer):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    ref = prepare_reference(make_tiny_model(tokenizer, block_size=4), accelerator)
    assert type(ref).__name__ == "Qwen3ForCausalLM"  # no DDP wrapper: a reference has no gradients to reduce
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(p.device == accelerator.device for p in ref.parameters())


@pytest.mark.slow
def test_fsdp2_two_gloo_processes_equal_one(tmp_path):
    """Two FSDP2 ranks at 2 pairs each give the losses of one process at 4 (to 1e-5); the data is split
    (two epochs in 4 steps, not one) and every parameter of policy and reference is a DTensor whose
    local shard is a slice of the whole."""
    model = init_tiny(tmp_path / "tiny", block_size=4, hidden_size=32)
    data = tmp_path / "pairs.jsonl"
    from tests.test_trainer import PAIRS, free_port

    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    one = DTRPOTrainer(str(model), args=config(tmp_path / "one"), train_dataset=str(data))
    one.train()
    want = [h["loss"] for h in one.state.log_history if "loss" in h]

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(model), str(data), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for got in ranks:
        assert got["world"] == 2 and got["distributed_type"] == "FSDP"
        assert got["epoch"] == 2.0  # one process alone on 2 pairs per step would be at epoch 1
        assert got["losses"] == pytest.approx(want, abs=1e-5) and len(want) == 4
    for part in ("policy", "reference"):
        for name, (kind, local, full) in ranks[0][part].items():
            other = ranks[1][part][name][1]
            assert kind == "DTensor" and local[0] < full[0], f"{part} {name} is not sharded: {local} of {full}"
            assert local[0] + other[0] == full[0] and local[1:] == other[1:] == full[1:], f"{part} {name}"


if __name__ == "__main__":
    worker(*sys.argv[1:4])
    end_process(0)  # as the CLI does: a gloo rank left to the interpreter's exit can abort (dtrpo.teardown)
