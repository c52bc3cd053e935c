"""Model adapters: the one place that knows how a dLLM family is driven.

An adapter says which token is the mask, whether logits are shifted, which attention the model
uses at inference, and how a 4D mask and explicit position ids reach the model. The estimators,
trainer and sampler only talk to a model through an adapter, so family quirks live here and in
`families.py` (real checkpoints) and nowhere else.

This module also builds the built-in tiny model: a small Qwen3 run block-causally, with a
character-level tokenizer that has mask, EOS and pad tokens, saved with `save_pretrained`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dtrpo.masking import tail_lengths

ATTENTIONS = ("block_causal", "full")
PROMPT_ATTENTIONS = ("full", "causal", "block_causal")
DENSE_MASK_BYTES = 4 * 2**30  # above this a dense (B, 1, S, S) mask is refused, not left to run out of memory
MODES = ("packed", "exact", "remasked")

PAD, EOS, MASK, UNK = "<pad>", "<eos>", "<mask>", "<unk>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


@dataclass(frozen=True)
class ModelAdapter:
    """How one model is driven. Everything family-specific the rest of dtrpo needs.

    `attention` is the model's attention at inference: `block_causal` (SDAR, Fast-dLLM v2, tiny)
    or `full` (LLaDA, Dream). `prompt_attention` is `full` (bidirectional inside the prompt) or
    `causal`, both with the response's blocks starting at the response; or `block_causal` (SDAR,
    Fast-dLLM v2): blocks counted from absolute position 0, the prompt attending block-causally and its
    last partial block shared with the first response tokens (`masking`, the absolute grid).
    `shifted` means position i-1 predicts token i (Dream, Fast-dLLM v2).
    """

    family: str
    mask_token_id: int
    block_size: int
    shifted: bool = False
    attention: str = "block_causal"
    prompt_attention: str = "full"
    default_mode: str = "packed"

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.prompt_attention not in PROMPT_ATTENTIONS:
            raise ValueError(f"prompt_attention must be one of {PROMPT_ATTENTIONS}, got {self.prompt_attention!r}")
        if self.absolute_grid and not self.block_causal:
            raise ValueError("prompt_attention='block_causal' needs a block-causal model (attention='block_causal')")
        if self.default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES}, got {self.default_mode!r}")

    @property
    def block_causal(self) -> bool:
        return self.attention == "block_causal"

    @property
    def absolute_grid(self) -> bool:
        """Blocks counted from position 0 of the whole sequence (the prompt's tail shares the first block)."""
        return self.prompt_attention == "block_causal"

    def tail(self, prompt_valid: torch.Tensor) -> torch.Tensor:
        """(B,) prompt tokens that share the first response block (0 unless on the absolute grid)."""
        return tail_lengths(prompt_valid, self.block_size, self.absolute_grid)

    def with_block_size(self, block_size: int | None) -> ModelAdapter:
        return self if block_size is None else replace(self, block_size=block_size)

    def attention_mask(self, model: torch.nn.Module, layout):
        """The mask of a `masking.Layout` in the form the model's attention backend takes: a flex
        `BlockMask` under `flex_attention` (CUDA only), else a dense additive (B, 1, S, S) mask in the model's
        dtype (0 = may attend, the dtype's minimum = may not), which SDPA and the eager backend both add."""
        backend = getattr(getattr(_module(model), "config", None), "_attn_implementation", "sdpa")
        full, causal = not self.block_causal, self.prompt_attention == "causal"
        if backend == "flex_attention":
            return layout.flex_mask(causal, full)
        B, S = layout.input_ids.shape
        dtype = _mask_dtype(model)
        size = B * S * S * dtype.itemsize
        if size > DENSE_MASK_BYTES:
            raise ValueError(
                f"the dense attention mask of this batch would take {size / 2**30:.1f} GiB ({B} rows of {S} "
                f"columns, B x S^2 x {dtype.itemsize} bytes; the limit is {DENSE_MASK_BYTES / 2**30:.0f} GiB): load "
                "the model with attn_implementation='flex_attention' on a GPU (a BlockMask keeps only the blocks that "
                "attend), or use shorter sequences or a smaller batch"
            )
        allowed = layout.dense_mask(causal, full)
        # additive, in the model's dtype: SDPA would otherwise turn the bool mask into this in every layer, forward
        # and backward (6-14% of a CPU training step, measured at widths 256 and 64)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )

    def logits(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,  # (B, S)
        attention_mask,  # (B, 1, S, S) additive float (0 = may attend) or a flex BlockMask
        position_ids: torch.Tensor,  # (B, S)
        keep: torch.Tensor | None = None,  # (B, S) bool: positions whose logits are needed
    ) -> torch.Tensor:
        """Logits at the `keep` positions, flattened row-major to (N, V); all positions if keep is None.

        Goes through `model.forward` (so DDP, FSDP, DeepSpeed and PEFT wrappers see the call) and
        projects only the kept hidden states onto the vocabulary.
        """
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=0 if keep is None else keep,
            use_cache=False,
        )
        return out.logits.double() if out.logits.dtype == torch.float64 else out.logits.float()  # float64 kept


def _module(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP or DeepSpeed wrapper (`.module`)."""
    return getattr(model, "module", model)


def _mask_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of an additive mask for `model`: its input embeddings' (float32 for a module without them)."""
    inner = _module(model)
    emb = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    return emb.weight.dtype if emb is not None else torch.float32


def adapter_from_config(config, tokenizer: PreTrainedTokenizerBase | None = None) -> ModelAdapter:
    """The adapter of a transformers-native causal LM used as a block-diffusion model.

    Reads `mask_token_id`, `block_size`, `dtrpo_attention`, `dtrpo_prompt_attention` and
    `dtrpo_shifted` from the config; the mask token falls back to the tokenizer's.
    """
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None and tokenizer is not None:
        mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError(
            "no mask token: the checkpoint's config.json has no 'mask_token_id' and its tokenizer no mask_token; "
            "a masked diffusion LM needs one"
        )
    block_size = getattr(config, "block_size", None)
    if block_size is None:
        raise ValueError(
            "config.json has no 'block_size': pass --block_size (block_size= in Python) with the block size the "
            "model was trained with"
        )
    attention = getattr(config, "dtrpo_attention", "block_causal")
    return ModelAdapter(
        family=getattr(config, "dtrpo_family", "native"),
        mask_token_id=int(mask_id),
        block_size=int(block_size),
        shifted=bool(getattr(config, "dtrpo_shifted", False)),
        attention=attention,
        prompt_attention=getattr(config, "dtrpo_prompt_attention", "full"),
        default_mode="packed" if attention == "block_causal" else "exact",
    )


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII and newline, with pad, EOS, mask and unk."""
    special = [PAD, EOS, MASK, UNK]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(special + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # join characters without spaces
    tok.add_special_tokens(special)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, mask_token=MASK, unk_token=UNK)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> PreTrainedModel:
    """A small random Qwen3 marked as a block-causal, unshifted diffusion LM (the SDAR layout)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        head_dim=hidden_size // num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    config.mask_token_id = tokenizer.mask_token_id
    config.block_size = block_size
    config.dtrpo_attention = "block_causal"
    config.dtrpo_prompt_attention = "full"
    config.dtrpo_shifted = False
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    return model.float().eval()


def init_tiny(
    output: str | Path, block_size: int = 8, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> Path:
    """Write the built-in tiny model and its tokenizer to `output` with `save_pretrained`."""
    output = Path(output)
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, block_size=block_size, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def read_config_json(path: str | Path) -> dict:
    """config.json read as JSON, never through AutoConfig, so no remote code is ever offered to run."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a model folder written by save_pretrained")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e}); the folder holds no loadable model") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: holds a {type(config).__name__}, not a model config object")
    return config


def vocabulary_problem(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, adapter: ModelAdapter) -> str | None:
    """Why the tokenizer's ids or the mask token do not fit the model's vocabulary (its embedding rows and its
    output width, the smaller), or None. Any id at or past it would fail deep inside the model (IndexError)."""
    inner = getattr(_module(model), "get_base_model", lambda: _module(model))()
    rows = inner.get_input_embeddings().num_embeddings
    out = inner.get_output_embeddings()
    vocab = min(rows, out.out_features) if isinstance(out, torch.nn.Linear) else rows
    if not 0 <= adapter.mask_token_id < vocab:
        return f"mask_token_id {adapter.mask_token_id} is outside the model's vocabulary of {vocab} ids (0-{vocab - 1})"
    if len(tokenizer) > vocab:
        return (
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab} ids: any id from "
            f"{vocab} up would fail; use the tokenizer saved with this model"
        )
    return None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
