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
| `llada2`       | `llada2_moe` (+ `_veomni`, fused experts) | Glm4Moe | `<|mask|>` 156895 | unshifted | block-causal |
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

from dtrpo.families.loading import (
    FAMILIES,
    LOADERS,
    ModelArgs,
    build_native,
    detect_family,
    export_checkpoint,
    family_block_size,
    family_config,
    find_mask_token,
    load_family,
    load_family_tokenizer,
    load_model,
    load_native_folder,
    mark_diffusion,
    native_config,
    read_weights,
    rename,
    safetensors_problem,
)
from dtrpo.families.spec import FULL_ATTENTION_BLOCK_SIZE, NATIVE_CLASSES, Family
from dtrpo.families.weights import save_safetensors

__all__ = [
    "FAMILIES",
    "FULL_ATTENTION_BLOCK_SIZE",
    "LOADERS",
    "ModelArgs",
    "NATIVE_CLASSES",
    "Family",
    "build_native",
    "detect_family",
    "export_checkpoint",
    "family_block_size",
    "family_config",
    "find_mask_token",
    "load_family",
    "load_family_tokenizer",
    "load_model",
    "load_native_folder",
    "mark_diffusion",
    "native_config",
    "read_weights",
    "rename",
    "safetensors_problem",
    "save_safetensors",
]
