"""LLaDA2.x (inclusionAI, mini and flash): a mixture-of-experts block-diffusion LM, loaded into transformers'
GLM-4.5 MoE class (`Glm4MoeForCausalLM`), block-causal on the absolute grid, unshifted.

What the public code (inclusionAI/dFactory `models/llada2_moe`) computes, and where the native class has it:
- GQA attention with one fused `query_key_value` projection (rows: the query heads, then the key heads, then
  the value heads), RMSNorm on each query and key head (`query_layernorm`, `key_layernorm`), rotary on the
  first `partial_rotary_factor` of each head in the rotate-half layout, output projection `dense`:
  Glm4Moe's `q_proj`/`k_proj`/`v_proj` (the fused rows split), `q_norm`/`k_norm` (`use_qk_norm`), its partial
  rotary (`partial_rotary_factor`) and `o_proj`;
- `first_k_dense_replace` dense SwiGLU layers, then MoE layers: a router in fp32, sigmoid scores, a per-expert
  bias added for selection only, group-limited top-k (a group's score is the sum of its two best biased
  scores, `topk_group` groups kept, the rest at -inf), the chosen experts' unbiased scores normalised to sum 1
  (whenever more than one expert is chosen) and scaled by `routed_scaling_factor`, plus shared experts:
  Glm4Moe's `Glm4MoeTopkRouter` (`e_score_correction_bias`, a buffer) and `Glm4MoeMoE`, term for term;
- experts on disk either as separate modules (`mlp.experts.{j}.gate_proj.weight`, the released checkpoints,
  `model_type` "llada2_moe") or fused (`mlp.experts.gate_proj` of shape (E, I, H), dFactory's training
  layout, `model_type` "llada2_moe_veomni"); the native class holds them fused as `gate_up_proj` (E, 2I, H)
  and `down_proj` (E, H, I). A family export writes the layout its `model_type` names, bit for bit.

Options of the public config that no native class computes the same way are refused by name before any
weight is read (`native_config`).
"""

from __future__ import annotations

import re

import torch

from dtrpo.families.spec import NATIVE_CLASSES, DecodingDefaults, Family

FUSED_MODEL_TYPE = "llada2_moe_veomni"  # dFactory's code builds fused experts exactly for this model_type
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# config.json key -> Glm4MoeConfig attribute, written back on export (read both ways)
KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "hidden_act": "hidden_act",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "use_qkv_bias": "attention_bias",
    "attention_dropout": "attention_dropout",
    "num_experts": "n_routed_experts",
    "num_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "moe_intermediate_size": "moe_intermediate_size",
    "n_group": "n_group",
    "topk_group": "topk_group",
    "routed_scaling_factor": "routed_scaling_factor",
    "first_k_dense_replace": "first_k_dense_replace",
}
# the public config class's defaults, for keys a config.json may leave out
DEFAULTS = {
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "use_qkv_bias": False,
    "attention_dropout": 0.1,
    "max_position_embeddings": 16384,
    "hidden_act": "silu",
    "first_k_dense_replace": 0,
    "routed_scaling_factor": 2.5,
    "partial_rotary_factor": 0.5,
    "rope_theta": 10000.0,
}
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
REQUIRED += ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group")
# options the public code (or the config class) has, with the only value the native class computes: refused
# by name otherwise. (key, value needed, value when absent)
FIXED = (
    ("score_function", "sigmoid", "sigmoid"),  # dFactory's router is sigmoid only
    ("router_dtype", "fp32", "fp32"),  # dFactory's router always runs in fp32
    ("use_bias", False, True),  # a bias on the output projection `dense` (the config class defaults to True)
    ("norm_head", False, False),
    ("use_rmsnorm", True, True),
    ("use_sliding_window", False, False),
    ("rope_scaling", None, None),
)


def problem(config: dict) -> str | None:
    """The first router or attention setting of a LLaDA2 config.json that dtrpo does not compute, or None."""
    for key in REQUIRED:
        if config.get(key) is None:
            return f"has no {key!r}, which the LLaDA2 router and attention need; it is never guessed"
    for key, want, absent in FIXED:
        value = config.get(key, absent)
        if value != want:
            return f"{key}={value!r}: dtrpo computes LLaDA2 with {key}={want!r} only, as dFactory's code does"
    E, G, TG, K = (config[k] for k in ("num_experts", "n_group", "topk_group", "num_experts_per_tok"))
    if E % G or E // G < 2:
        return f"n_group={G} must divide num_experts={E} into groups of 2 or more (a group scores its best 2)"
    if not 1 <= TG <= G or not 1 <= K <= TG * (E // G):
        return f"topk_group={TG} / num_experts_per_tok={K} do not fit {G} groups of {E // G} experts"
    if config.get("norm_topk_prob") is False and K > 1:
        return "norm_topk_prob=false: dFactory's router normalises the chosen experts' weights whenever top-k > 1"
    if not config.get("num_shared_experts"):
        return "num_shared_experts is 0 or absent: dtrpo loads LLaDA2 with its shared experts only"
    if config.get("first_k_dense_replace", 0) and config.get("intermediate_size") is None:
        return "has dense layers (first_k_dense_replace) but no 'intermediate_size'"
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor = config.get("partial_rotary_factor", DEFAULTS["partial_rotary_factor"])
    if config.get("rotary_dim") is not None and config["rotary_dim"] != int(head_dim * factor):
        return (
            f"rotary_dim={config['rotary_dim']} disagrees with head_dim x partial_rotary_factor = "
            f"{int(head_dim * factor)} (dFactory's code rotates by the factor, other implementations by rotary_dim)"
        )
    return None


def native_config(config: dict, family: Family, attn_implementation: str):
    """LLaDA2's config.json as a Glm4MoeConfig; a setting it has no equivalent for is one error naming the key."""
    why = problem(config)
    if why:
        raise ValueError(f"LLaDA2 config.json {why}")
    cls = NATIVE_CLASSES[family.native][0]
    get = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}.get
    kw = {native: get(key) for key, native in KEYS.items() if get(key) is not None}
    kw["head_dim"] = get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kw["norm_topk_prob"] = config["num_experts_per_tok"] > 1  # dFactory normalises whenever top-k > 1
    kw.setdefault("intermediate_size", config["moe_intermediate_size"])  # unused without dense layers
    rope = {"rope_type": "default", "rope_theta": get("rope_theta")}
    rope["partial_rotary_factor"] = get("partial_rotary_factor")
    ids = {k: config.get(k) for k in ("pad_token_id", "eos_token_id", "bos_token_id")}
    return cls(
        **kw,
        **ids,
        rope_parameters=rope,
        use_qk_norm=True,  # dFactory's attention always norms query and key heads (its use_qk_norm key is unread)
        num_mtp_layers=0,
        attn_implementation=attn_implementation,
    )


def update_family_config(out: dict, model_config, family: Family) -> None:
    """Write the native config's structural keys back under LLaDA2's names."""
    for key, native in KEYS.items():
        if key in out or key in REQUIRED:
            out[key] = getattr(model_config, native)
    rope = getattr(model_config, "rope_parameters", None) or {}
    if "partial_rotary_factor" in out or "partial_rotary_factor" in rope:
        out["partial_rotary_factor"] = rope.get("partial_rotary_factor", DEFAULTS["partial_rotary_factor"])


# ----------------------------------------------------------------------------- tensors

# (LLaDA2 name, native name) for the tensors that only change name; `{i}` is the layer index
NAMES = (
    ("model.word_embeddings.weight", "model.embed_tokens.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("model.layers.{i}.attention.query_layernorm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("model.layers.{i}.attention.key_layernorm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("model.layers.{i}.attention.dense.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),  # dense layers
    ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("model.layers.{i}.mlp.gate.weight", "model.layers.{i}.mlp.gate.weight"),  # the router
    ("model.layers.{i}.mlp.gate.expert_bias", "model.layers.{i}.mlp.gate.e_score_correction_bias"),
    ("model.layers.{i}.mlp.shared_experts.gate_proj.weight", "model.layers.{i}.mlp.shared_experts.gate_proj.weight"),
    ("model.layers.{i}.mlp.shared_experts.up_proj.weight", "model.layers.{i}.mlp.shared_experts.up_proj.weight"),
    ("model.layers.{i}.mlp.shared_experts.down_proj.weight", "model.layers.{i}.mlp.shared_experts.down_proj.weight"),
)
QKV = re.compile(r"model\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)$")
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(?:(\d+)\.)?(gate_proj|up_proj|down_proj)(?:\.weight)?$")
NATIVE_QKV = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
NATIVE_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


def _renamer(to_native: bool):
    pairs = [(_pattern(a if to_native else b), b if to_native else a) for a, b in NAMES]

    def rename(name: str) -> str | None:
        for pattern, target in pairs:
            m = pattern.match(name)
            if m:
                return target.replace("{i}", m.group(1)) if m.groups() else target
        return None

    return rename


def _heads(config) -> tuple[int, int, int]:
    return config.num_attention_heads, config.num_key_value_heads, config.head_dim


def to_native_tensors(tensors: dict[str, torch.Tensor], config: dict, native) -> dict[str, torch.Tensor]:
    """LLaDA2's tensors (either expert layout) under the native names: the fused query_key_value split into
    q/k/v, each layer's experts stacked into gate_up_proj (E, 2I, H) and down_proj (E, H, I). A tensor this
    loader does not know is refused by name."""
    rename, out = _renamer(True), {}
    H, K, D = _heads(native)
    experts: dict[tuple[int, str], dict[int | None, torch.Tensor]] = {}
    for name, t in tensors.items():
        if (m := QKV.match(name)) is not None:
            q, k, v = t.split([H * D, K * D, K * D], dim=0)
            for p, part in zip("qkv", (q, k, v), strict=True):
                out[f"model.layers.{m.group(1)}.self_attn.{p}_proj.{m.group(2)}"] = part
        elif (m := EXPERT.match(name)) is not None:
            j = None if m.group(2) is None else int(m.group(2))
            experts.setdefault((int(m.group(1)), m.group(3)), {})[j] = t
        elif (new := rename(name)) is not None:
            out[new] = t
        else:
            raise ValueError(f"tensor {name!r} is not a LLaDA2 parameter this loader knows; cannot load it")
    E = native.n_routed_experts
    stacked = {key: _stack(parts, E, key) for key, parts in experts.items()}
    for layer in sorted({i for i, _ in stacked}):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate, up, down = (stacked.get((layer, p)) for p in PROJECTIONS)
        if gate is None or up is None or down is None:
            raise ValueError(f"layer {layer}: experts need gate_proj, up_proj and down_proj; some are missing")
        out[prefix + "gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[prefix + "down_proj"] = down
    for layer in range(native.first_k_dense_replace, native.num_hidden_layers):  # absent: zeros, as dFactory inits it
        out.setdefault(f"model.layers.{layer}.mlp.gate.e_score_correction_bias", torch.zeros(E))
    return out


def _stack(parts: dict[int | None, torch.Tensor], E: int, key: tuple[int, str]) -> torch.Tensor:
    if None in parts:  # fused: one (E, ., .) tensor
        if len(parts) > 1:
            raise ValueError(f"layer {key[0]} {key[1]}: experts stored both fused and as separate modules")
        return parts[None]
    missing = sorted(set(range(E)) - parts.keys())
    if missing or len(parts) != E:
        raise ValueError(f"layer {key[0]} {key[1]}: expert tensors missing or extra (missing {missing[:5]})")
    return torch.stack([parts[j] for j in range(E)])


def to_family_tensors(state: dict[str, torch.Tensor], config: dict, native) -> dict[str, torch.Tensor]:
    """The native state dict under LLaDA2's names, in the expert layout the config's `model_type` names (fused
    for dFactory's "llada2_moe_veomni", separate modules otherwise): the inverse of `to_native_tensors`."""
    rename, out = _renamer(False), {}
    fused = str(config.get("model_type", "")).lower() == FUSED_MODEL_TYPE
    H, K, D = _heads(native)
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        if (m := NATIVE_QKV.match(name)) is not None:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
        elif (m := NATIVE_EXPERT.match(name)) is not None:
            prefix = f"model.layers.{m.group(1)}.mlp.experts."
            parts = dict(zip(PROJECTIONS[:2], t.chunk(2, dim=1), strict=True)) if m.group(2) == "gate_up_proj" else {}
            parts = parts or {"down_proj": t}
            for proj, w in parts.items():
                if fused:
                    out[prefix + proj] = w
                else:
                    out.update({f"{prefix}{j}.{proj}.weight": w[j] for j in range(w.shape[0])})
        elif (new := rename(name)) is not None:
            out[new] = t
        else:
            raise ValueError(f"tensor {name!r} is not a parameter the LLaDA2 format has; cannot export it")
    for (layer, kind), parts in qkv.items():
        out[f"model.layers.{layer}.attention.query_key_value.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


SPEC = Family(
    name="llada2",
    model_type="llada2_moe",  # the released checkpoints (experts as separate modules)
    aliases=(FUSED_MODEL_TYPE,),  # dFactory's training layout (experts fused)
    native="glm4_moe",
    architectures=("LLaDA2MoeModelLM",),
    auto_map={
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
    },
    mask_token="<|mask|>",  # looked up in the tokenizer; the documented id below is checked to be a mask token
    mask_token_id=156895,  # dFactory's generate default (mask_id) and training mask_token_id
    config_has_mask_id=False,
    shifted=False,  # generate reads each block position's own logits; SFT trains with same_token_labels
    attention="block_causal",
    prompt_attention="block_causal",  # generate: blocks of block_length counted from position 0, prompt included
    block_size_key="block_length",  # the public configs carry none: generate's and training's 32 is documented
    documented_block_size=32,
    to_native_config=native_config,
    update_family_config=update_family_config,
    to_native_tensors=to_native_tensors,
    to_family_tensors=to_family_tensors,
    lora_names={"dense": "o_proj"},  # the fused query_key_value is three native layers: name q/k/v_proj
    decoding=DecodingDefaults(
        threshold=0.95,
        source="inclusionAI/dFactory modeling_llada2_moe.py generate: block_length 32, steps 32, threshold 0.95",
    ),
)


# ----------------------------------------------------------------------------- a tiny LLaDA2


def tiny_config(vocab_size: int, block_size: int, hidden_size: int, num_layers: int, tokenizer) -> dict:
    """config.json of a small LLaDA2 with the public config's keys: 8 experts in 4 groups (2 kept), 2 experts a
    token, one shared expert, the first layer dense, head_dim 16 with half of it rotated."""
    heads = max(2, hidden_size // 16)
    return {
        "architectures": list(SPEC.architectures),
        "auto_map": dict(SPEC.auto_map),
        "model_type": SPEC.model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "first_k_dense_replace": 1 if num_layers > 1 else 0,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 600000,
        "rope_scaling": None,
        "partial_rotary_factor": 0.5,
        "rotary_dim": 8,
        "tie_word_embeddings": False,
        "use_bias": False,
        "use_qkv_bias": False,
        "use_rmsnorm": True,
        "norm_head": False,
        "attention_dropout": 0.0,
        "num_experts": 8,
        "num_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": max(8, hidden_size // 4),
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "score_function": "sigmoid",
        "router_dtype": "fp32",
        "moe_router_enable_expert_bias": True,
        "use_sliding_window": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
        "block_length": block_size,
    }


def init_tiny(output, block_size: int = 8, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """Write a small random LLaDA2 in the family's released layout (experts as separate modules), with the
    built-in character tokenizer (its `<mask>` is the mask token): `dtrpo init-tiny --family llada2`."""
    import json
    from pathlib import Path

    from dtrpo.families.weights import save_safetensors
    from dtrpo.models import make_char_tokenizer

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = make_char_tokenizer()
    config = tiny_config(len(tokenizer), block_size, hidden_size, num_layers, tokenizer)
    native = native_config(config, SPEC, "sdpa")
    torch.manual_seed(seed)
    model = NATIVE_CLASSES[SPEC.native][1](native).float()
    with torch.no_grad():  # a trained router's bias is not zero: a small random one makes it matter
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.05)
    save_safetensors(to_family_tensors(model.state_dict(), config, native), output)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(output)
    return output
