"""The accelerate configs in configs/: each parses, and `accelerate launch` turns it into the environment
the Trainer reads (DDP, FSDP2 with transformer-layer wrap and sharded state dicts, ZeRO-2, ZeRO-3),
without needing DeepSpeed or a GPU."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIGS = Path(__file__).parents[1] / "configs"
WANT = {
    "ddp.yaml": {"ACCELERATE_MIXED_PRECISION": "bf16"},
    "fsdp2.yaml": {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_RESHARD_AFTER_FORWARD": "true",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
        "ACCELERATE_MIXED_PRECISION": "bf16",
    },
    "zero2.yaml": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "zero3.yaml": {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
        "ACCELERATE_MIXED_PRECISION": "bf16",
    },
}


def launch_env(name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file configs/<name> -m dtrpo.cli train` gives each rank
    (what accelerate's `launch_command` computes before it starts the processes)."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "dtrpo.cli", "train"])
    args, defaults, _ = _validate_launch_command(args)
    if not args.use_deepspeed:
        return prepare_multi_gpu_env(args)
    args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
    return prepare_deepspeed_cmd_env(args)[1]


def test_every_config_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(WANT)


@pytest.mark.parametrize("name", sorted(WANT))
def test_config_loads_and_launches(name):
    config = load_config_from_file(str(CONFIGS / name))  # refuses unknown keys
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    assert (CONFIGS / name).read_text().startswith("#")  # the header says when to use it
    env = launch_env(name)
    assert {k: env.get(k) for k in WANT[name]} == WANT[name]
    if name == "ddp.yaml":
        assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env
