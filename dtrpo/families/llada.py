"""LLaDA (8B Base, Instruct, 1.5): a Llama under OLMo names and keys, full attention, unshifted logits."""

from __future__ import annotations

from dtrpo.families.spec import NATIVE_CLASSES, DecodingDefaults, Family

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


def native_config(config: dict, family: Family, attn_implementation: str):
    """LLaDA's OLMo-style config.json as a LlamaConfig; options a Llama lacks are refused by name."""
    cls = NATIVE_CLASSES[family.native][0]
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


def update_family_config(out: dict, model_config, family: Family) -> None:
    """Write the native config's structural keys back under LLaDA's names."""
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


SPEC = Family(
    name="llada",
    model_type="llada",
    native="llama",
    architectures=("LLaDAModelLM",),
    auto_map={
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModel": "modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    },
    mask_token="<|mdm_mask|>",
    mask_token_id=126336,
    config_has_mask_id=True,
    shifted=False,
    attention="full",
    prompt_attention="full",
    block_size_key=None,
    documented_block_size=None,
    names=LLADA_NAMES,
    to_native_config=native_config,
    update_family_config=update_family_config,
    # LLaDA's block-level `ff_out` is the down projection; its top-level `ff_out`, the output head, is lm_head
    lora_names={"attn_out": "o_proj", "ff_proj": "gate_proj", "ff_out": "down_proj", "wte": "embed_tokens"},
    decoding=DecodingDefaults(
        source="ML-GSAI/LLaDA generate.py main: steps 128 = gen_length 128 in blocks of 32 (one token a step), "
        "remasking low_confidence, temperature 0",
    ),
)
