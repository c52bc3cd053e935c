"""Loading a model folder: detect its family from config.json and hand back (model, tokenizer, adapter);
and the way back, exporting a model in its family's own format. Everything family-specific comes from the
family's `Family` spec (`spec.py` and one file per family)."""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from dtrpo.families import dream, fast_dllm_v2, llada, llada2, sdar
from dtrpo.families.spec import FULL_ATTENTION_BLOCK_SIZE, NATIVE_CLASSES, Family
from dtrpo.families.weights import save_safetensors
from dtrpo.models import ModelAdapter, adapter_from_config, load_tokenizer, read_config_json, vocabulary_problem
from dtrpo.options import deprecated

logger = logging.getLogger(__name__)
FAMILIES = {spec.name: spec for spec in (llada.SPEC, dream.SPEC, sdar.SPEC, fast_dllm_v2.SPEC, llada2.SPEC)}


# ----------------------------------------------------------------------------- detection


def detect_family(config: dict, path: str | Path = "") -> str:
    """The family of a checkpoint from its config.json contents."""
    model_type = str(config.get("model_type", "")).lower()
    for fam in FAMILIES.values():
        if model_type in (fam.model_type.lower(), *fam.aliases):
            return fam.name
    if model_type in NATIVE_CLASSES and "block_size" in config and "mask_token_id" in config:
        return "native"  # the tiny model, or a family exported with format="native"
    if "bd_size" in config and model_type in ("qwen2", ""):
        return "fast_dllm_v2"  # Fast-dLLM v2 folders converted by hand keep Qwen2's model_type
    remote = " (its auto_map names remote code, which dtrpo never runs)" if config.get("auto_map") else ""
    raise ValueError(
        f"{path}/config.json: unknown model family (model_type={config.get('model_type')!r}){remote}; "
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
    return family.to_native_config(config, family, attn_implementation)


SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


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
    family.update_family_config(out, model_config, family)
    for key in SPECIAL_ID_KEYS if source else ():  # the Trainer aligns the model config's ids with the tokenizer's;
        if key in source:  # the family's own (Fast-dLLM v2's pad_token_id is its embedding's padding_idx) stay
            out[key] = source[key]
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
    if fam.to_native_tensors is not None:
        tensors = fam.to_native_tensors(tensors, config, native)
    else:
        tensors = {new: tensors[old] for old, new in rename(list(tensors), fam, to_native=True).items()}
    model = build_native(native, tensors, dtype, path)
    if dtype == torch.float64 and getattr(model.config, "_experts_implementation", None) == "grouped_mm":
        model.config._experts_implementation = "eager"  # torch's grouped_mm has no float64 kernel
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
    return model.eval(), tokenizer, adapter_from_config(model.config, tokenizer)  # the family's name is on the config


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
    problem = vocabulary_problem(model, tokenizer, adapter)
    if problem:
        raise ValueError(f"{path}: {problem}")
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
        config = family_config(model.config, fam, adapter)
        if fam.to_family_tensors is not None:
            save_safetensors(fam.to_family_tensors(state, config, model.config), output)
        else:
            names = rename(list(state), fam, to_native=False)
            save_safetensors({names[k]: v for k, v in state.items()}, output)
        (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in Path(code_from).glob("*.py") if code_from else ():
            shutil.copy(file, output / file.name)
    tokenizer.save_pretrained(output)
    return output


# ----------------------------------------------------------------------------- options


@dataclass
class ModelArgs:
    model_name_or_path: str = field(
        default=None, metadata={"help": "Model folder: a dtrpo/transformers checkpoint or a family's own."}
    )
    model: str | None = field(default=None, metadata={"help": "Deprecated: use --model_name_or_path."})
    family: str | None = field(default=None, metadata={"help": "Model family; default: detected from config.json."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 (GPU) or float16."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention backend: sdpa, or flex_attention on a GPU."}
    )

    def __post_init__(self) -> None:
        deprecated(self, "model", "model_name_or_path")

    def load(self, block_size: int | None = None):
        """(model, tokenizer, adapter) of `--model_name_or_path`, on the GPU when there is one; `block_size`
        overrides the checkpoint's (and is required where its config.json has none)."""
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        device = "cuda" if torch.cuda.is_available() else None
        dtype = getattr(torch, self.dtype)
        return load_model(
            self.model_name_or_path, self.family, dtype, self.attn_implementation, device=device, block_size=block_size
        )
