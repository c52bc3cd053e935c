"""SDAR and TraDo: Qwen3 weights and keys plus `block_size`, block-causal on the absolute grid, unshifted."""

from dtrpo.families.spec import DecodingDefaults, Family

SPEC = Family(
    name="sdar",
    model_type="sdar",
    native="qwen3",
    architectures=("SDARForCausalLM",),
    auto_map={
        "AutoConfig": "configuration_sdar.SDARConfig",
        "AutoModel": "modeling_sdar.SDARModel",
        "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
    },
    mask_token="<|MASK|>",
    mask_token_id=151669,
    config_has_mask_id=False,
    shifted=False,
    attention="block_causal",
    prompt_attention="block_causal",
    block_size_key="block_size",
    documented_block_size=None,  # SDAR/TraDo configs that carry it say 4, but SDAR-4B-Chat carries none: never guessed
    decoding=DecodingDefaults(
        threshold=0.85,
        source="JetAstra/SDAR generate.py: block_length 4 = denoising_steps 4 (one token a step), "
        "remasking_strategy low_confidence_dynamic, confidence_threshold 0.85",
    ),
)
