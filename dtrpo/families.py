"""Loading a model folder: detect its family from config.json and hand back (model, tokenizer, adapter).

Every family is loaded into the transformers-native class of the same architecture, by translating
its config.json and renaming its parameters; no remote code ever runs (config.json is read as JSON,
tokenizers load with `trust_remote_code=False`). The model is then driven with explicit 4D masks and
position ids by its `ModelAdapter`.

| family         | config `model_type` | native class | mask token            | logits    | attention     |
|----------------|---------------------|--------------|-----------------------|-----------|---------------|
| `llada`        | `llada`             | Llama        | `<|mdm_mask|>` 126336 | unshifted | full          |
| `dream`        | `Dream`             | Qwen2        | `<|mask|>` 151666     | shifted   | full          |
| `sdar`         | `sdar` (TraDo too)  | Qwen3        | `<|MASK|>` 151669     | unshifted | block-causal  |
| `fast_dllm_v2` | `Fast_dLLM_Qwen`    | Qwen2        | `|<MASK>|` 151665     | shifted   | block-causal  |
| `native`       | llama/qwen2/qwen3   | itself       | config/tokenizer      | config    | config        |

DiffuCoder ships Dream's format (`model_type: Dream`) and loads as `dream`.

Choices for the full-attention families (LLaDA, Dream), which have no block size of their own:
- block size 32 (`FULL_ATTENTION_BLOCK_SIZE`): it only decides how a response is cut into re-masking
  blocks, i.e. the decoding schedule the estimator follows; the model attends to the whole canvas
  whatever it is. 32 is the block length of LLaDA's published semi-autoregressive decoding.
- default mode `exact` (one forward per block state, full attention, later blocks fully masked): it is
  exact for every model, so the log-ratio estimate stays unbiased for the model as it is decoded.
  `remasked` (one pass) is cheaper but biased for full-attention models by an amount that must be
  measured, never assumed, so it is an opt-in (`--mode remasked`), not the default.

Prompt attention and block grid: LLaDA and Dream attend fully, and their blocks (a decoding schedule
only) start at the response. SDAR and Fast-dLLM v2 count blocks from absolute position 0 and attend
block-causally over the prompt too, the prompt's last partial block shared with the first response
tokens (`prompt_attention="block_causal"`, the absolute grid of `masking`): dtrpo scores and samples
them on that grid, so every state it scores is one their own samplers produce.

Block size: SDAR/TraDo read `block_size` from config.json and some published SDAR configs carry none;
such a checkpoint is refused unless `block_size` is passed (it is never guessed). Fast-dLLM v2
documents one block size (32, `bd_size`): a config without it loads with 32 and a warning. The value
used is written into the adapter, the native config and `dtrpo_config.json`.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from dtrpo.models import ModelAdapter, adapter_from_config, load_tokenizer, read_config_json

logger = logging.getLogger(__name__)
FULL_ATTENTION_BLOCK_SIZE = 32
NATIVE_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
META_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "_name_or_path")


@dataclass(frozen=True)
class Family:
    """What differs between families: on-disk names, mask token, logit shift, attention."""

    name: str
    model_type: str  # as config.json writes it
    native: str  # key of NATIVE_CLASSES
    architectures: tuple[str, ...]
    auto_map: dict = field(hash=False)
    mask_token: str  # the documented mask token string and id (in the full-size vocabulary)
    mask_token_id: int
    config_has_mask_id: bool  # config.json carries `mask_token_id`
    shifted: bool
    attention: str
    prompt_attention: str
    block_size_key: str | None  # config key of the block size; None: FULL_ATTENTION_BLOCK_SIZE
    documented_block_size: int | None  # used (with a warning) when the config has no block size; None: refuse
    # (family name, native name) templates, `{i}` = layer index; empty: native names on disk
    names: tuple[tuple[str, str], ...] = ()

    @property
    def default_mode(self) -> str:
        return "packed" if self.attention == "block_causal" else "exact"


LLADA_NAMES = (
    ("model.transformer.wte.weight", "model.embed_tokens.weight"),
    ("model.transformer.blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("model.transformer.blocks.{i}.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("model.transformer.blocks.{i}.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("model.transformer.blocks.{i}.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("model.transformer.blocks.{i}.attn_out.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("model.transformer.blocks.{i}.ff_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("model.transformer.blocks.{i}.ff_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),  # ff_proj is the gate
    ("model.transformer.blocks.{i}.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("model.transformer.blocks.{i}.ff_out.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("model.transformer.ln_f.weight", "model.norm.weight"),
    ("model.transformer.ff_out.weight", "lm_head.weight"),  # the untied output head
)

FAMILIES = {
    "llada": Family(
        "llada",
        "llada",
        "llama",
        ("LLaDAModelLM",),
        {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "<|mdm_mask|>",
        126336,
        True,
        False,
        "full",
        "full",
        None,
        None,
        LLADA_NAMES,
    ),
    "dream": Family(
        "dream",
        "Dream",
        "qwen2",
        ("DreamModel",),
        {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "<|mask|>",
        151666,
        True,
        True,
        "full",
        "full",
        None,
        None,
    ),
    "sdar": Family(
        "sdar",
        "sdar",
        "qwen3",
        ("SDARForCausalLM",),
        {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        "<|MASK|>",
        151669,
        False,
        False,
        "block_causal",
        "block_causal",
        "block_size",
        None,  # SDAR/TraDo configs that carry it say 4, but SDAR-4B-Chat carries none: never guessed
    ),
    "fast_dllm_v2": Family(
        "fast_dllm_v2",
        "Fast_dLLM_Qwen",
        "qwen2",
        ("Fast_dLLM_QwenForCausalLM",),
        {
            "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
            "AutoModel": "modeling.Fast_dLLM_QwenModel",
            "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
        },
        "|<MASK>|",
        151665,
        False,
        True,
        "block_causal",
        "block_causal",
        "bd_size",
        32,  # Fast-dLLM v2's one documented block size
    ),
}

# LLaDA's OLMo-style config keys and the Llama keys they become (one table, read both ways)
LLADA_KEYS = {
    "d_model": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "n_layers": "num_hidden_layers",
    "mlp_hidden_size": "intermediate_size",
    "embedding_size": "vocab_size",
    "max_sequence_length": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "weight_tying": "tie_word_embeddings",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "bos_token_id": "bos_token_id",
}
# options of LLaDA's code that a Llama does not have: (key, value the Llama equivalence needs)
LLADA_REQUIRED = (
    ("block_type", "llama"),
    ("activation_type", "silu"),
    ("layer_norm_type", "rms"),
    ("include_bias", False),
    ("include_qkv_bias", False),
    ("attention_layer_norm", False),
    ("alibi", False),
    ("rope", True),
    ("scale_logits", False),
    ("input_emb_norm", False),
    ("clip_qkv", None),
    ("layer_norm_with_affine", True),
    ("multi_query_attention", None),
)
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


# ----------------------------------------------------------------------------- detection


def detect_family(config: dict, path: str | Path = "") -> str:
    """The family of a checkpoint from its config.json contents."""
    model_type = str(config.get("model_type", "")).lower()
    for fam in FAMILIES.values():
        if model_type == fam.model_type.lower():
            return fam.name
    if model_type in NATIVE_CLASSES and "block_size" in config and "mask_token_id" in config:
        return "native"  # the tiny model, or a family exported with format="native"
    if "bd_size" in config and model_type in ("qwen2", ""):
        return "fast_dllm_v2"  # Fast-dLLM v2 folders converted by hand keep Qwen2's model_type
    raise ValueError(
        f"{path}/config.json: unknown model family (model_type={config.get('model_type')!r}); "
        f"known families: {sorted(LOADERS)}; pass --family to choose one"
    )


# ----------------------------------------------------------------------------- names and configs


def _name_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def rename(names: list[str], family: Family, to_native: bool) -> dict[str, str]:
    """{old name: new name} between the family's on-disk names and the native ones."""
    if not family.names:
        return {n: n for n in names}
    pairs = [(b, a) if not to_native else (a, b) for a, b in family.names]
    out = {}
    for name in names:
        for src, dst in pairs:
            m = _name_regex(src).match(name)
            if m:
                out[name] = dst.replace("{i}", m.group("i")) if "{i}" in dst else dst
                break
        else:
            side = f"a {family.name} parameter" if to_native else "a parameter this loader knows"
            raise ValueError(f"tensor {name!r} is not {side}; cannot rename it for the {family.name} format")
    return out


def native_config(config: dict, family: Family, attn_implementation: str = "sdpa"):
    """The transformers config of the native class equivalent to a family's config.json."""
    cls = NATIVE_CLASSES[family.native][0]
    if family.name != "llada":
        # rope_scaling: null is the legacy spelling of "no scaling", deprecated in transformers 5
        kwargs = {k: v for k, v in config.items() if k not in META_KEYS and (k, v) != ("rope_scaling", None)}
        return cls(**kwargs, attn_implementation=attn_implementation)
    for key, want in LLADA_REQUIRED:  # LLaDA's code has options a Llama lacks: refuse them by name
        if config.get(key, want) != want:
            raise ValueError(
                f"LLaDA config {key}={config[key]!r} has no Llama equivalent (needs {want!r}); not supported"
            )
    kw = {native: config[key] for key, native in LLADA_KEYS.items() if config.get(key) is not None}
    kw.setdefault("vocab_size", config.get("vocab_size"))  # embedding_size absent: the vocabulary itself
    kw.setdefault("num_key_value_heads", config["n_heads"])
    kw.setdefault("intermediate_size", config.get("mlp_ratio", 4) * config["d_model"])
    kw.setdefault("tie_word_embeddings", False)
    kw.setdefault("bos_token_id", None)
    return cls(
        **kw,
        rope_theta=config.get("rope_theta", 10000.0),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        head_dim=config["d_model"] // config["n_heads"],
        attn_implementation=attn_implementation,
    )


def family_config(model_config, family: Family, adapter: ModelAdapter) -> dict:
    """config.json in the family's own format: the source config.json (kept on the model config at load
    time) with its structural keys updated from the native config."""
    source = getattr(model_config, "dtrpo_source_config", None)
    out = dict(
        source
        or {
            "model_type": family.model_type,
            "architectures": list(family.architectures),
            "auto_map": dict(family.auto_map),
        }
    )
    rope_theta = (getattr(model_config, "rope_parameters", None) or {}).get("rope_theta")
    if family.name == "llada":
        for key, native in LLADA_KEYS.items():
            if key in out or native in (
                "hidden_size",
                "num_attention_heads",
                "num_hidden_layers",
                "vocab_size",
                "tie_word_embeddings",
            ):
                out[key] = getattr(model_config, native)
        out["n_kv_heads"] = model_config.num_key_value_heads
        out["mlp_hidden_size"] = model_config.intermediate_size
        if out.get("vocab_size", out["embedding_size"] + 1) > out["embedding_size"]:
            out["vocab_size"] = out["embedding_size"]  # the tokenizer vocabulary never exceeds the embedding rows
    else:
        for key in QWEN_CORE_KEYS + QWEN_OPTIONAL_KEYS:
            if key in QWEN_CORE_KEYS or key in out or (key == "head_dim" and family.native == "qwen3"):
                out[key] = getattr(model_config, key)
    if rope_theta is not None:
        out["rope_theta"] = rope_theta
    if family.config_has_mask_id or "mask_token_id" in out:
        out["mask_token_id"] = adapter.mask_token_id
    if family.block_size_key:
        out[family.block_size_key] = adapter.block_size
    if "torch_dtype" in out:
        out["torch_dtype"] = str(model_config.dtype).removeprefix("torch.")
    return out


# ----------------------------------------------------------------------------- weights


def safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file is not whole (its size differs from what its header describes), or None:
    a truncated file is refused with its name before anything reads it."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            return f"{file.name} is truncated ({size} bytes, no complete header)"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
            return f"{file.name} has an unreadable header"
    if 8 + n + end != size:
        return f"{file.name} is truncated ({size} bytes, its header describes {8 + n + end})"
    return None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder: model.safetensors, a sharded index, or pytorch_model.bin."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        if (path / "pytorch_model.bin").is_file():
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        raise FileNotFoundError(
            f"{path}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
        )
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def build_native(config, tensors: dict[str, torch.Tensor], dtype: torch.dtype, where: Path) -> PreTrainedModel:
    """The native model with exactly these tensors (names and shapes checked), built without a random init."""
    cls = NATIVE_CLASSES[config.model_type][1]
    with torch.device("meta"):
        model = cls(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(
                f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the config implies {tuple(shape)}"
            )
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    rotary = model.model.rotary_emb  # its inv_freq buffer is not saved: rebuild it off the meta device
    model.model.rotary_emb = type(rotary)(config=model.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{where}: tensors left uninitialised after loading: {left[:5]}")
    model.config.dtype = dtype
    return model.eval()


# ----------------------------------------------------------------------------- tokenizer and mask


def load_family_tokenizer(path: Path, family: Family | None = None) -> PreTrainedTokenizerBase:
    """The folder's tokenizer without remote code, and without AutoTokenizer where it can be avoided:
    AutoTokenizer may read config.json through AutoConfig, and refuses Dream's tokenizer_config, which
    names a remote class (`DreamTokenizer`). tokenizer.json (or Qwen2's vocab.json + merges.txt) fully
    describes these tokenizers, so it is loaded directly."""
    if family is None:
        return load_tokenizer(path)  # native folders: no auto_map, AutoTokenizer is safe
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    if family.native.startswith("qwen") and (path / "vocab.json").is_file():
        from transformers import Qwen2Tokenizer

        return Qwen2Tokenizer.from_pretrained(path)
    return load_tokenizer(path)


def find_mask_token(config: dict, tokenizer: PreTrainedTokenizerBase, family: Family, vocab_size: int) -> int:
    """The mask id: config.json `mask_token_id`, else the tokenizer's mask token, else the family's
    documented mask token (by string, then by id if that id holds a mask-like token)."""
    mask_id, source = config.get("mask_token_id"), "config.json mask_token_id"
    if mask_id is None and tokenizer.mask_token_id is not None:
        mask_id, source = tokenizer.mask_token_id, "the tokenizer's mask_token"
    if mask_id is None and family.mask_token in tokenizer.get_vocab():
        mask_id, source = tokenizer.get_vocab()[family.mask_token], f"the tokenizer's {family.mask_token!r}"
    if mask_id is None and family.mask_token_id < len(tokenizer):
        token = tokenizer.convert_ids_to_tokens(family.mask_token_id) or ""
        if "mask" in token.lower():
            mask_id, source = family.mask_token_id, f"the documented id {family.mask_token_id}"
    if mask_id is None:
        raise ValueError(
            f"no mask token: config.json has no 'mask_token_id', the tokenizer no mask_token and no "
            f"{family.mask_token!r} (the {family.name} mask token, id {family.mask_token_id}); "
            "a masked diffusion LM needs one"
        )
    if not 0 <= int(mask_id) < vocab_size:
        raise ValueError(f"mask token id {mask_id} (from {source}) is outside the model's vocabulary of {vocab_size}")
    return int(mask_id)


# ----------------------------------------------------------------------------- loaders


def mark_diffusion(config, adapter: ModelAdapter) -> None:
    """Write the adapter onto the native config, so a native save_pretrained folder reloads the same adapter."""
    config.mask_token_id = adapter.mask_token_id
    config.block_size = adapter.block_size
    config.dtrpo_family = adapter.family
    config.dtrpo_attention = adapter.attention
    config.dtrpo_prompt_attention = adapter.prompt_attention
    config.dtrpo_shifted = adapter.shifted
    if adapter.attention == "full":
        config.is_causal = False  # a plain model(ids) call is then bidirectional too, as the family decodes


def family_block_size(config: dict, fam: Family, path: Path, block_size: int | None) -> int:
    """The block size to use: the one asked for, else the config's, else the family's documented one
    (with a warning), else an error naming `--block_size`. Full-attention families have none of their
    own: FULL_ATTENTION_BLOCK_SIZE, a decoding schedule choice."""
    if block_size is not None:
        return int(block_size)
    if fam.block_size_key is None:
        return FULL_ATTENTION_BLOCK_SIZE
    if config.get(fam.block_size_key) is not None:
        return int(config[fam.block_size_key])
    if fam.documented_block_size is None:
        raise ValueError(
            f"{path}/config.json has no {fam.block_size_key!r}: the {fam.name} block size is not guessed; "
            f"pass --block_size (block_size= in Python) with the block size the checkpoint was trained with"
        )
    logger.warning(
        "%s/config.json has no %r: using the %s documented block size %d; pass --block_size if it was trained "
        "with another",
        path,
        fam.block_size_key,
        fam.name,
        fam.documented_block_size,
    )
    return fam.documented_block_size


def load_family(
    path: str | Path,
    family: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    block_size: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelAdapter]:
    """A family folder loaded into its native class. Departures from the native class, handled here:
    LLaDA is a Llama under OLMo names and keys (embedding rows may exceed the tokenizer); Dream and
    Fast-dLLM v2 predict token i at position i-1 (`shifted`); SDAR and Fast-dLLM v2 replace `forward` in
    train mode in their remote code (noising internally), which the native class does not do."""
    path, fam = Path(path), FAMILIES[family]
    config = read_config_json(path)
    tokenizer = load_family_tokenizer(path, fam)
    native = native_config(config, fam, attn_implementation)
    tensors = read_weights(path)
    tensors = {new: tensors[old] for old, new in rename(list(tensors), fam, to_native=True).items()}
    model = build_native(native, tensors, dtype, path)
    adapter = ModelAdapter(
        family=fam.name,
        mask_token_id=find_mask_token(config, tokenizer, fam, model.config.vocab_size),
        block_size=family_block_size(config, fam, path, block_size),
        shifted=fam.shifted,
        attention=fam.attention,
        prompt_attention=fam.prompt_attention,
        default_mode=fam.default_mode,
    )
    mark_diffusion(model.config, adapter)
    model.config.dtrpo_source_config = config
    return model, tokenizer, adapter


def load_native_folder(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    block_size: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelAdapter]:
    """A transformers-native folder (the tiny model, or a family exported with format='native')."""
    path = Path(path)
    config = read_config_json(path)
    fam = FAMILIES.get(config.get("dtrpo_family", ""))
    tokenizer = load_family_tokenizer(path, fam)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=False, attn_implementation=attn_implementation
    )
    if block_size is not None:
        model.config.block_size = block_size
    adapter = adapter_from_config(model.config, tokenizer)
    if fam is not None:  # a family exported natively keeps its name and its default mode
        adapter = replace(adapter, family=fam.name, default_mode=fam.default_mode)
    return model.eval(), tokenizer, adapter


LOADERS = {
    "native": load_native_folder,
    **{name: (lambda path, name=name, **kw: load_family(path, name, **kw)) for name in FAMILIES},
}


def load_model(
    path: str | Path,
    family: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    device: str | torch.device | None = None,
    block_size: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelAdapter]:
    """Load a local checkpoint folder; returns (model, tokenizer, adapter). No remote code runs.
    `block_size` overrides the checkpoint's (and is required where its config has none).

    On a GPU: `dtype=torch.bfloat16, attn_implementation="flex_attention", device="cuda"` (the adapter
    then builds flex BlockMasks), and `gradient_checkpointing=True` for long sequences.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    for file in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise ValueError(f"{path}: {problem}; the folder holds no loadable model")
    family = family or detect_family(read_config_json(path), path)
    if family not in LOADERS:
        raise ValueError(f"unknown model family {family!r}; known families: {sorted(LOADERS)}")
    try:
        model, tokenizer, adapter = LOADERS[family](
            path, dtype=dtype, attn_implementation=attn_implementation, block_size=block_size
        )
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met an object that is not a tensor
        raise ValueError(
            f"{path}: its pickled weights (*.bin) hold objects other than tensors, which could run code; "
            "refused (pickled weights load only with weights_only=True; convert a trusted copy to safetensors)"
        ) from None
    assert isinstance(adapter, ModelAdapter)
    if device is not None:
        model = model.to(device)
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer, adapter


# ----------------------------------------------------------------------------- export


def save_safetensors(tensors: dict[str, torch.Tensor], output: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors shards plus their index when large."""
    shards, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name], size = t.detach().contiguous().cpu(), size + n
    if len(shards) == 1:
        save_file(shards[0], output / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, output / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    adapter: ModelAdapter,
    output: str | Path,
    format: str = "family",
    code_from: str | Path | None = None,
) -> Path:
    """Write `model` to `output` in its family's original format (config keys, parameter names,
    safetensors, tokenizer) or, with format='native', as a transformers folder (save_pretrained) that
    `load_model` reloads with the same adapter. `code_from` copies a folder's *.py (the family's remote
    code) next to a family-format export. A LoRA model must be merged first (`lora.merge_lora`)."""
    if format not in ("family", "native"):
        raise ValueError(f"format must be 'family' or 'native', got {format!r}")
    if hasattr(model, "peft_config"):
        raise ValueError("the model carries LoRA adapters: merge them first with dtrpo.lora.merge_lora(model)")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    mark_diffusion(model.config, adapter)
    if format == "native" or adapter.family not in FAMILIES:
        model.save_pretrained(output)
    else:
        fam = FAMILIES[adapter.family]
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: the family stores the embedding only
        names = rename(list(state), fam, to_native=False)
        save_safetensors({names[k]: v for k, v in state.items()}, output)
        config = family_config(model.config, fam, adapter)
        (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in Path(code_from).glob("*.py") if code_from else ():
            shutil.copy(file, output / file.name)
    tokenizer.save_pretrained(output)
    return output
