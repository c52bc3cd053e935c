"""The typed spec of a model family: every fact that differs between families, as a named field.

Each family's file (`llada.py`, `dream.py`, `sdar.py`, `fast_dllm_v2.py`, `llada2.py`) fills one `Family`; the
loaders in `loading.py` read only these fields and never test a family's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from transformers import (
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FULL_ATTENTION_BLOCK_SIZE = 32
NATIVE_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "glm4_moe": (Glm4MoeConfig, Glm4MoeForCausalLM),
}
META_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "_name_or_path")
QWEN_CORE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "tie_word_embeddings",
)
QWEN_OPTIONAL_KEYS = (
    "head_dim",
    "max_position_embeddings",
    "attention_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def qwen_native_config(config: dict, family: Family, attn_implementation: str):
    """A Qwen-format config.json is the native class's own keys: passed through (less the metadata)."""
    cls = NATIVE_CLASSES[family.native][0]
    # rope_scaling: null is the legacy spelling of "no scaling", deprecated in transformers 5
    kwargs = {k: v for k, v in config.items() if k not in META_KEYS and (k, v) != ("rope_scaling", None)}
    return cls(**kwargs, attn_implementation=attn_implementation)


def qwen_family_config(out: dict, model_config, family: Family) -> None:
    """Update a Qwen-format config.json in place with the native config's structural keys."""
    for key in QWEN_CORE_KEYS + QWEN_OPTIONAL_KEYS:
        if key in QWEN_CORE_KEYS or key in out or (key == "head_dim" and family.native == "qwen3"):
            out[key] = getattr(model_config, key)


@dataclass(frozen=True)
class DecodingDefaults:
    """How a family's own public sampler decodes, in dtrpo's sampler settings: what `generate`, `eval`,
    `pairs`, `iterate` and `lm-eval` use for every sampler flag not given (`dtrpo.decoding.resolve`). The
    block size is not here: it is the checkpoint's (`block_size_key`), or FULL_ATTENTION_BLOCK_SIZE."""

    steps_per_block: int | None = None  # None: the block size, one token a step
    remasking: Literal["low_confidence", "random", "margin", "entropy"] = "low_confidence"
    threshold: float | None = None  # reveal every position above it (at least one a step); None: fixed steps
    sub_block_size: int | None = None  # sub-blocks left to right inside a block (needs a threshold)
    fix_first_token: bool = False  # a block's first token fixed before its first forward (shifted models)
    source: str = ""  # where the values were read: the public file and its defaults


@dataclass(frozen=True)
class Family:
    """What differs between families: on-disk names and keys, mask token, logit shift, attention, grid, and
    how its own sampler decodes (`decoding`)."""

    name: str
    model_type: str  # as config.json writes it
    native: Literal["llama", "qwen2", "qwen3", "glm4_moe"]  # key of NATIVE_CLASSES
    architectures: tuple[str, ...]
    auto_map: dict = field(hash=False)
    mask_token: str  # the documented mask token string and id (in the full-size vocabulary)
    mask_token_id: int
    config_has_mask_id: bool  # config.json carries `mask_token_id`
    shifted: bool  # position i-1 predicts token i
    attention: Literal["full", "block_causal"]
    prompt_attention: Literal["full", "causal", "block_causal"]  # block_causal: the absolute block grid
    block_size_key: str | None  # config key of the block size; None: FULL_ATTENTION_BLOCK_SIZE
    documented_block_size: int | None  # used (with a warning) when the config has no block size; None: refuse
    # (family name, native name) templates, `{i}` = layer index; empty: native names on disk
    names: tuple[tuple[str, str], ...] = ()
    # config.json -> the native class's config, and the native config's keys written back into config.json
    to_native_config: Callable = qwen_native_config
    update_family_config: Callable = qwen_family_config
    lora_names: dict = field(default_factory=dict, hash=False)  # the family's module names -> native names
    aliases: tuple[str, ...] = ()  # other config.json model_types of the same family (another on-disk layout)
    # tensors that do not map one to one (LLaDA2's fused qkv and experts): (tensors, config.json dict, native
    # config) -> tensors under the other side's names; None: renamed by `names`
    to_native_tensors: Callable | None = None
    to_family_tensors: Callable | None = None
    decoding: DecodingDefaults = field(default_factory=DecodingDefaults)  # its public sampler's settings

    @property
    def default_mode(self) -> str:
        return "packed" if self.attention == "block_causal" else "exact"
