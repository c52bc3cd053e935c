"""Dream-7B and DiffuCoder-7B: Qwen2.5 weights and keys, full attention, shifted logits."""

from dtrpo.families.spec import DecodingDefaults, Family

SPEC = Family(
    name="dream",
    model_type="Dream",
    native="qwen2",
    architectures=("DreamModel",),
    auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    mask_token="<|mask|>",
    mask_token_id=151666,
    config_has_mask_id=True,
    shifted=True,
    attention="full",
    prompt_attention="full",
    block_size_key=None,
    documented_block_size=None,
    decoding=DecodingDefaults(
        remasking="entropy",
        source="DreamLM/Dream README, diffusion_generate: steps = max_new_tokens (one token a step), alg entropy",
    ),
)
