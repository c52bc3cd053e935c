"""Fast-dLLM v2: Qwen2.5 weights and keys plus `bd_size`, block-causal on the absolute grid, shifted."""

from dtrpo.families.spec import DecodingDefaults, Family

SPEC = Family(
    name="fast_dllm_v2",
    model_type="Fast_dLLM_Qwen",
    native="qwen2",
    architectures=("Fast_dLLM_QwenForCausalLM",),
    auto_map={
        "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
        "AutoModel": "modeling.Fast_dLLM_QwenModel",
        "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
    },
    mask_token="|<MASK>|",
    mask_token_id=151665,
    config_has_mask_id=False,
    shifted=True,
    attention="block_causal",
    prompt_attention="block_causal",
    block_size_key="bd_size",
    documented_block_size=32,  # Fast-dLLM v2's one documented block size
    decoding=DecodingDefaults(
        threshold=0.9,
        sub_block_size=8,
        fix_first_token=True,
        source="NVlabs/Fast-dLLM v2/run_chatbot.py: generate(block_size=32, small_block_size=8, threshold=0.9); "
        "its batch_sample fixes a block's first token from the previous block's last position",
    ),
)
