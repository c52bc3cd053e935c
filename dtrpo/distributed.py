"""The frozen reference model under data-parallel, FSDP and DeepSpeed training, prepared as TRL's
`DPOTrainer` prepares its reference (`trl.models.utils.prepare_deepspeed` / `prepare_fsdp`):

- DeepSpeed: an inference engine built from the accelerator's DeepSpeed config without its optimizer,
  scheduler and optimizer offload; ZeRO-3 shards the reference like the policy, any other stage is
  forced to 0 (a whole bf16 copy on every rank, which ZeRO-1/2 keep of the policy too).
- FSDP: sharded like the policy (FSDP2: `fully_shard` per layer of the plugin's auto-wrap policy and
  on the root; FSDP1: `FullyShardedDataParallel` with the plugin's options), in eval mode, with no
  optimizer state.
- Otherwise (one device, DDP): on the device, with accelerate's mixed precision (no DDP wrapper: it
  has no gradients to reduce).
"""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


def partitioned(model: torch.nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 partitioned the parameters at load (`zero.Init`: every rank holds a slice)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def reference_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode copy of the *unwrapped* policy with whole parameters, taken before training.

    The trainer calls it in `__init__`, before `Trainer.train` runs `accelerator.prepare`, so for DDP
    and FSDP the policy is still an ordinary module and a deep copy is right. Under ZeRO-3 a model
    loaded with `from_pretrained` while the DeepSpeed config is live is already partitioned by
    `zero.Init` (each parameter an empty placeholder plus this rank's slice): a deep copy would copy the
    placeholders. There the parameters are gathered (`deepspeed.zero.GatheredParameters`, whole on every
    rank for the length of the copy: one bf16 model, 16 GB for 8B, before the optimizer exists), the
    module is copied, and each copied parameter is replaced by a plain tensor so that `prepare_reference`
    partitions the copy afresh.
    """
    if not partitioned(model):
        return copy.deepcopy(model).eval().requires_grad_(False)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        ref = copy.deepcopy(model)
        for module in ref.modules():
            for name, p in module._parameters.items():
                if p is not None:  # a plain parameter, without the partitioning attributes the copy carried
                    module._parameters[name] = torch.nn.Parameter(p.data.clone(), requires_grad=False)
    return ref.eval().requires_grad_(False)


def _deepspeed_reference(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if zero.get("stage") == 3 and hidden is not None:  # TRL's bucket sizes for a model that only runs forward
        zero["reduce_bucket_size"] = hidden * hidden
        zero["stage3_param_persistence_threshold"] = 10 * hidden
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
    # no optimizer is given: the training-only blocks would make DeepSpeed build one (or a scheduler without one)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero.pop("offload_optimizer", None)
    if zero.get("stage") != 3:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval() switches the module to eval mode and returns None
    return engine


def _fsdp2_reference(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """`fully_shard` on each layer the plugin's auto-wrap policy names, then on the root, as accelerate
    shards the policy, except that every group reshards after its forward: accelerate keeps the policy's
    final norm and LM head gathered from forward to backward, and a reference has no backward, so they
    would stay whole (vocab x hidden, 1 GB in bf16 for LLaDA-8B) for the whole run. Frozen parameters
    keep their dtype (accelerate upcasts only trainable ones to fp32)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy, get_module_children_bottom_up
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    plugin.set_auto_wrap_policy(model)
    wrap = fsdp2_prepare_auto_wrap_policy(plugin, model)
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs = {
        "reshard_after_forward": True,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }
    for module in get_module_children_bottom_up(model)[:-1]:
        if wrap is not None and wrap(module):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model.eval()


def _fsdp_reference(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 2:
        return _fsdp2_reference(model, accelerator)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin.set_auto_wrap_policy(model)
    wrapped = FSDP(
        model,
        sharding_strategy=plugin.sharding_strategy,
        cpu_offload=plugin.cpu_offload,
        auto_wrap_policy=plugin.auto_wrap_policy,
        mixed_precision=plugin.mixed_precision_policy,
        sync_module_states=plugin.sync_module_states,
        use_orig_params=plugin.use_orig_params,
        device_id=accelerator.device,
    )
    return wrapped.eval()


def prepare_reference(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """`model` (frozen, whole) made ready to run beside the policy under the accelerator's set-up: a
    DeepSpeed inference engine (ZeRO-3 sharded, else stage 0), an FSDP-sharded module, or the module on
    the device with the configured mixed precision. Call it once, before training."""
    model = model.eval().requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _deepspeed_reference(model, accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        return _fsdp_reference(model, accelerator)
    return accelerator.prepare_model(model.to(accelerator.device), evaluation_mode=True)


def merged_lora(model: torch.nn.Module, accelerator: Accelerator, load_base) -> torch.nn.Module | None:
    """The trained LoRA policy with its adapters folded in, whole, on the main process (None on the others), for
    the final save; every process calls it. One process, DDP, ZeRO-2: the policy itself is whole. ZeRO-3: a
    gathered copy (`reference_copy`, a collective). FSDP2: the full state dict (gathered on the main process)
    loaded into a whole model of the same structure, the base from `load_base()` with the same LoRA config."""
    from dtrpo.lora import merge_lora

    if partitioned(model):
        whole = reference_copy(model)
    elif any(hasattr(p, "full_tensor") for p in model.parameters()):
        state = accelerator.get_state_dict(model)
        if not accelerator.is_main_process:
            return None
        from peft import get_peft_model

        whole = get_peft_model(load_base(), copy.deepcopy(model.peft_config["default"]))
        whole.load_state_dict(state)
    else:
        whole = model
    return merge_lora(whole) if accelerator.is_main_process else None
