"""LoRA through PEFT on a model loaded by `families.load_model`.

After loading, every family sits in a native Llama/Qwen class, so PEFT's standard module names apply.
A target list written with a family's original names (LLaDA: `attn_out`, `ff_proj`, `ff_out`, ...) is
translated to the native names; a name that matches no Linear or Embedding layer is refused. Experts that
transformers stores fused as 3D parameters (LLaDA2 in Glm4Moe: `experts.gate_up_proj`, `experts.down_proj`) are
no Linear layers: the gate/up/down targets reach them through PEFT's `target_parameters`. The
reference model of a LoRA policy is the same model with its adapters disabled
(`with model.disable_adapter():`), which reproduces the base logits exactly: no second copy in memory.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from dtrpo.models import ModelAdapter

logger = logging.getLogger(__name__)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_targets(model: torch.nn.Module, adapter: ModelAdapter, target_modules: list[str] | None) -> list[str]:
    """Native module names for PEFT: the defaults, or `target_modules` translated from the family's names."""
    names = list(DEFAULT_TARGETS if target_modules is None else target_modules)
    from dtrpo.families import FAMILIES

    family = FAMILIES.get(adapter.family)
    rename = family.lora_names if family else {}
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    layers = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)}
    fused = fused_experts(model)
    out = []
    for name in names:
        native = rename.get(name, name)
        if native in fused and native not in layers:
            continue  # a fused expert parameter only: `expert_parameters` targets it
        if native not in layers:
            raise ValueError(
                f"LoRA target {name!r} names no Linear or Embedding layer of this {adapter.family} model; "
                f"choose among {sorted(layers | rename.keys() | fused)}"
            )
        out.append(native)
    return sorted(set(out))


def fused_experts(model: torch.nn.Module) -> set[str]:
    """Names of the 3D expert parameters of `experts` modules (transformers' fused mixture-of-experts layout)."""
    return {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in n}


# the fused expert parameter each projection target reaches
EXPERT_TARGETS = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "gate_up_proj": "gate_up_proj"}
EXPERT_TARGETS |= {"down_proj": "down_proj"}


def expert_parameters(model: torch.nn.Module, adapter: ModelAdapter, target_modules: list[str] | None) -> list[str]:
    """PEFT `target_parameters` for fused experts: `experts.gate_up_proj` when gate_proj or up_proj is targeted,
    `experts.down_proj` for down_proj (all three by default), so LoRA reaches the routed experts too."""
    from dtrpo.families import FAMILIES

    family = FAMILIES.get(adapter.family)
    rename = family.lora_names if family else {}
    fused = fused_experts(model)
    names = [rename.get(n, n) for n in (DEFAULT_TARGETS if target_modules is None else target_modules)]
    return sorted({f"experts.{EXPERT_TARGETS[n]}" for n in names if EXPERT_TARGETS.get(n) in fused})


def apply_lora(
    model: PreTrainedModel,
    adapter: ModelAdapter,
    r: int = 16,
    alpha: int = 32,
    target_modules: list[str] | None = None,
    dropout: float = 0.0,
) -> PeftModel:
    """Wrap `model` with LoRA adapters (rank r, scale alpha / r) on the target modules; only they train."""
    if r <= 0:
        raise ValueError(f"LoRA rank r must be positive, got {r}")
    modules, parameters = (
        lora_targets(model, adapter, target_modules),
        expert_parameters(model, adapter, target_modules),
    )
    if parameters and dropout:  # PEFT's LoRA on a parameter (ParamWrapper) has no dropout
        if not modules:
            raise ValueError(f"--lora_dropout {dropout}: LoRA on fused experts only takes no dropout; pass 0")
        logger.warning(
            "LoRA dropout %s: PEFT cannot drop out on fused expert parameters, so %s are left out; pass "
            "--lora_dropout 0 (or --disable_dropout) to adapt the routed experts too",
            dropout,
            parameters,
        )
        parameters = []
    if fused_experts(model):  # PEFT also matches a short name such as down_proj to an expert parameter: name
        modules = _full_names(model, modules)  # the layers in full so that only `parameters` reach the experts
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        target_parameters=parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _full_names(model: torch.nn.Module, short: list[str]) -> list[str]:
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and n.rsplit(".", 1)[-1] in short]


def merge_lora(model: torch.nn.Module) -> PreTrainedModel:
    """Fold the LoRA weights into the base layers and return the plain model (for export)."""
    if not isinstance(model, PeftModel):
        return model
    return model.merge_and_unload()


@dataclass
class PeftArgs:
    """LoRA as TRL's scripts name it; the trainer applies it (`peft_config`)."""

    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters instead of every weight; the reference is the base model with adapters "
            "disabled, checkpoints hold the adapters, the output folder the merged model."
        },
    )
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (default 16)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (0 under --disable_dropout)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "LoRA target modules (native or the family's own names); default: every "
            "attention and MLP projection."
        },
    )

    def peft_config(self):
        """A `peft.LoraConfig`, or None without --use_peft. `--lora_r N` alone (dtrpo's old way) turns LoRA on."""
        if self.lora_r is not None and not self.use_peft:
            if self.lora_r == 0:
                return None
            print("warning: --lora_r without --use_peft is deprecated; pass --use_peft true", file=sys.stderr)
            self.use_peft = True
        if not self.use_peft:
            return None
        return LoraConfig(
            r=self.lora_r or 16,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules or DEFAULT_TARGETS),
            bias="none",
            task_type="CAUSAL_LM",
        )
