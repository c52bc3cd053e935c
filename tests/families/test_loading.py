"""Real-checkpoint families on tiny random checkpoints written in each family's own on-disk format:
load into the native class, score a dTRPO estimate, export (family and native formats), reload bit for
bit; LLaDA against an independent forward; shifted read positions; LoRA; bad inputs.

Facts from shared/models.md that a test relies on are named in a comment `# fact: ...`.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dtrpo.estimators import Batch, EstimatorConfig, draw, position_logprobs, score
from dtrpo.families import (
    FAMILIES,
    FULL_ATTENTION_BLOCK_SIZE,
    detect_family,
    export_checkpoint,
    load_model,
    read_weights,
    save_safetensors,
)
from dtrpo.lora import apply_lora, lora_targets, merge_lora

VOCAB = 300  # embedding rows; the tokenizers below are smaller, as real checkpoints pad their embeddings
CHARS = [chr(i) for i in range(33, 127)]


# ----------------------------------------------------------------------------- tiny checkpoints


def write_tokenizer(path: Path, specials: list[str], eos: str, pad: str, mask: str | None = None, **config) -> None:
    """A character-level tokenizer whose special tokens (the family's mask token among them) come first."""
    vocab = {t: i for i, t in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=pad))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.add_special_tokens(specials)
    extra = {"mask_token": mask} if mask else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, **extra).save_pretrained(path)
    if config:  # e.g. Dream's remote tokenizer class, which AutoTokenizer refuses without trust_remote_code
        file = path / "tokenizer_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **config}))


def rand(*shape: int, norm: bool = False) -> torch.Tensor:
    return 1.0 + 0.1 * torch.randn(shape) if norm else 0.05 * torch.randn(shape)


def write_folder(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


LLADA_CONFIG = {  # fact: LLaDA's config uses OLMo-style keys, model_type "llada", and carries mask_token_id
    "model_type": "llada",
    "architectures": ["LLaDAModelLM"],
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModel": "modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    },
    "d_model": 32,
    "n_heads": 4,
    "n_kv_heads": 4,
    "n_layers": 2,
    "mlp_hidden_size": 64,
    "mlp_ratio": 2,
    "embedding_size": VOCAB,
    "vocab_size": VOCAB,
    "max_sequence_length": 4096,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "weight_tying": False,
    "mask_token_id": 2,
    "eos_token_id": 0,
    "pad_token_id": 0,
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "include_bias": False,
    "include_qkv_bias": False,
    "attention_layer_norm": False,
    "alibi": False,
    "rope": True,
    "scale_logits": False,
    "input_emb_norm": False,
    "layer_norm_with_affine": True,
    "use_cache": False,
}


def write_llada(path: Path, **overrides) -> Path:
    """fact: LLaDA's parameter names (wte, blocks.{i}.{attn_norm, q/k/v_proj, attn_out, ff_norm, ff_proj,
    up_proj, ff_out}, ln_f, top-level ff_out as the untied head) and its mask token <|mdm_mask|>."""
    cfg = {**LLADA_CONFIG, **overrides}
    d, f = cfg["d_model"], 64  # tensor shapes come from the base config; overrides may contradict them
    t = {
        "model.transformer.wte.weight": rand(VOCAB, d),
        "model.transformer.ln_f.weight": rand(d, norm=True),
        "model.transformer.ff_out.weight": rand(VOCAB, d),
    }
    for i in range(cfg["n_layers"]):
        b = f"model.transformer.blocks.{i}."
        t |= {
            b + "attn_norm.weight": rand(d, norm=True),
            b + "ff_norm.weight": rand(d, norm=True),
            b + "q_proj.weight": rand(d, d),
            b + "k_proj.weight": rand(d, d),
            b + "v_proj.weight": rand(d, d),
            b + "attn_out.weight": rand(d, d),
            b + "ff_proj.weight": rand(f, d),
            b + "up_proj.weight": rand(f, d),
            b + "ff_out.weight": rand(d, f),
        }
    write_folder(path, cfg, t)
    write_tokenizer(path, ["<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>"], "<|endoftext|>", "<|endoftext|>")
    return path


def qwen_tensors(cfg: dict, qkv_bias: bool, qk_norm: bool) -> dict[str, torch.Tensor]:
    """Random tensors under Qwen2 / Qwen3 parameter names."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    t = {"model.embed_tokens.weight": rand(VOCAB, d), "model.norm.weight": rand(d, norm=True)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = rand(VOCAB, d)
    for i in range(cfg["num_hidden_layers"]):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        t |= {
            f"model.layers.{i}.input_layernorm.weight": rand(d, norm=True),
            f"model.layers.{i}.post_attention_layernorm.weight": rand(d, norm=True),
            a + "q_proj.weight": rand(q, d),
            a + "k_proj.weight": rand(kv, d),
            a + "v_proj.weight": rand(kv, d),
            a + "o_proj.weight": rand(d, q),
            m + "gate_proj.weight": rand(f, d),
            m + "up_proj.weight": rand(f, d),
            m + "down_proj.weight": rand(d, f),
        }
        if qkv_bias:  # fact: Dream and Fast-dLLM v2 are Qwen2.5, with q/k/v biases
            t |= {a + "q_proj.bias": rand(q), a + "k_proj.bias": rand(kv), a + "v_proj.bias": rand(kv)}
        if qk_norm:  # fact: SDAR is Qwen3, with per-head q/k RMSNorm
            t |= {a + "q_norm.weight": rand(hd, norm=True), a + "k_norm.weight": rand(hd, norm=True)}
    return t


QWEN_BASE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
    "attention_dropout": 0.0,
    "rope_scaling": None,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "use_cache": False,
}
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_dream(path: Path, **overrides) -> Path:
    # fact: Dream's config is Qwen2's with model_type "Dream", its own auto_map and mask_token_id;
    # its mask token is <|mask|>; its tokenizer_config names a remote DreamTokenizer class
    cfg = {
        **QWEN_BASE,
        "model_type": "Dream",
        "architectures": ["DreamModel"],
        "tie_word_embeddings": False,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "mask_token_id": 3,
        **overrides,
    }
    write_folder(path, cfg, qwen_tensors(cfg, qkv_bias=True, qk_norm=False))
    write_tokenizer(
        path,
        [*QWEN_SPECIALS, "<|mask|>"],
        "<|im_end|>",
        "<|endoftext|>",
        mask="<|mask|>",
        tokenizer_class="DreamTokenizer",
        auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
    )
    return path


def write_sdar(path: Path, mask_token: str = "<|MASK|>", **overrides) -> Path:
    # fact: SDAR's config is Qwen3's plus block_size (model_type "sdar"); its mask token <|MASK|> is found
    # in the tokenizer, not in the config. Tied embeddings and a head_dim unlike hidden/heads exercise Qwen3.
    cfg = {
        **QWEN_BASE,
        "model_type": "sdar",
        "architectures": ["SDARForCausalLM"],
        "tie_word_embeddings": True,
        "auto_map": {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        "head_dim": 16,
        "attention_bias": False,
        "block_size": 4,
        **overrides,
    }
    write_folder(path, cfg, qwen_tensors(cfg, qkv_bias=False, qk_norm=True))
    write_tokenizer(path, [*QWEN_SPECIALS, mask_token], "<|im_end|>", "<|endoftext|>")
    return path


def write_fast_dllm(path: Path, **overrides) -> Path:
    # fact: Fast-dLLM v2's config is Qwen2's plus bd_size (model_type "Fast_dLLM_Qwen"); mask token |<MASK>|
    cfg = {
        **QWEN_BASE,
        "model_type": "Fast_dLLM_Qwen",
        "architectures": ["Fast_dLLM_QwenForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
            "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
        },
        "tie_word_embeddings": False,
        "bd_size": 4,
        **overrides,
    }
    write_folder(path, cfg, qwen_tensors(cfg, qkv_bias=True, qk_norm=False))
    write_tokenizer(path, [*QWEN_SPECIALS, "|<MASK>|"], "<|im_end|>", "<|endoftext|>")
    return path


WRITERS = {"llada": write_llada, "dream": write_dream, "sdar": write_sdar, "fast_dllm_v2": write_fast_dllm}
# (mask id in the tiny tokenizer, block size, shifted, attention, prompt attention, default mode)
EXPECTED = {
    # fact: LLaDA is unshifted, full attention; no block size of its own (dtrpo's default 32), mode exact
    "llada": (2, FULL_ATTENTION_BLOCK_SIZE, False, "full", "full", "exact"),
    # fact: Dream is shifted (position i-1 predicts token i), full attention
    "dream": (3, FULL_ATTENTION_BLOCK_SIZE, True, "full", "full", "exact"),
    # fact: SDAR is unshifted, block-causal with the config's block_size on the absolute grid, packed
    "sdar": (3, 4, False, "block_causal", "block_causal", "packed"),
    # fact: Fast-dLLM v2 is shifted, block-causal with the config's bd_size on the absolute grid, packed
    "fast_dllm_v2": (3, 4, True, "block_causal", "block_causal", "packed"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    return {name: write(root / name) for name, write in WRITERS.items()}


def make_batch(block_size: int, n_blocks: int = 2) -> Batch:
    """Two examples: prompts left-padded (4 and 3 tokens), responses of 2 blocks and 1 block."""
    g = torch.Generator().manual_seed(0)
    R = n_blocks * block_size
    prompt = torch.randint(10, 90, (2, 4), generator=g)
    prompt_valid = torch.tensor([[True] * 4, [False] + [True] * 3])
    response = torch.randint(10, 90, (2, R), generator=g)
    response_valid = torch.ones(2, R, dtype=torch.bool)
    response_valid[1, block_size:] = False
    return Batch(prompt, prompt_valid, torch.where(response_valid, response, 0), response_valid)


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- per family


@pytest.mark.parametrize("family", list(WRITERS))
def test_load_score_export_reload(family, checkpoints, tmp_path):
    path = checkpoints[family]
    model, tokenizer, adapter = load_model(path)  # family detected from config.json
    mask_id, block_size, shifted, attention, prompt_attention, mode = EXPECTED[family]
    assert (adapter.family, adapter.mask_token_id, adapter.block_size) == (family, mask_id, block_size)
    assert (adapter.shifted, adapter.attention, adapter.prompt_attention, adapter.default_mode) == (
        shifted,
        attention,
        prompt_attention,
        mode,
    )
    assert tokenizer.convert_ids_to_tokens(adapter.mask_token_id).lower().count("mask") == 1

    # a dTRPO estimate on the loaded model: finite, with a gradient
    bs = min(adapter.block_size, 8)
    batch = make_batch(bs)
    states = draw(adapter.with_block_size(bs), batch, [1, 2], EstimatorConfig(steps_per_block=4))
    value, _ = score(adapter.with_block_size(bs), model, batch, states)
    assert torch.isfinite(value).all() and (value != 0).all()
    value.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()

    # family format: same tensor names, same bits, same config.json as the source folder
    export_checkpoint(model, tokenizer, adapter, tmp_path / "family", format="family")
    original, exported = read_weights(path), read_weights(tmp_path / "family")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    assert json.loads((tmp_path / "family/config.json").read_text()) == json.loads((path / "config.json").read_text())
    again, _, adapter_again = load_model(tmp_path / "family")
    assert_same_tensors(model, again)
    assert adapter_again == adapter

    # native format: a transformers folder that reloads to the same tensors and the same adapter
    export_checkpoint(model, tokenizer, adapter, tmp_path / "native", format="native")
    native, _, adapter_native = load_model(tmp_path / "native")
    assert type(native) is type(model)
    assert_same_tensors(model, native)
    assert adapter_native == adapter
    ids = batch.prompt_ids[:1]
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, model(ids).logits, atol=0, rtol=0)
    # and back to the family format from the native folder
    export_checkpoint(native, tokenizer, adapter_native, tmp_path / "family2", format="family")
    assert json.loads((tmp_path / "family2/config.json").read_text()) == json.loads((path / "config.json").read_text())


def llada_reference_logits(w: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward from its public description, on its own tensor names, full attention:
    pre-RMSNorm blocks, rotary positions (rotate-half convention), multi-head attention, a SwiGLU MLP
    with ff_proj as the gate: ff_out(silu(ff_proj(x)) * up_proj(x)); final ln_f and the ff_out head."""
    L, d, H, eps = ids.shape[0], cfg["d_model"], cfg["n_heads"], cfg["rms_norm_eps"]
    hd = d // H

    def rms(x, g):
        return g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).double() / hd)
    ang = torch.arange(L).double()[:, None] * inv[None]  # (L, hd/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()

    def rope(x):  # (H, L, hd)
        return x * cos + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

    x = w["model.transformer.wte.weight"][ids]  # (L, d)
    for i in range(cfg["n_layers"]):
        b = f"model.transformer.blocks.{i}."
        h = rms(x, w[b + "attn_norm.weight"])
        q, k, v = ((h @ w[b + n + ".weight"].T).view(L, H, hd).transpose(0, 1) for n in ("q_proj", "k_proj", "v_proj"))
        att = torch.softmax(rope(q) @ rope(k).transpose(1, 2) / math.sqrt(hd), -1) @ v  # (H, L, hd)
        x = x + att.transpose(0, 1).reshape(L, d) @ w[b + "attn_out.weight"].T
        h = rms(x, w[b + "ff_norm.weight"])
        x = x + (F.silu(h @ w[b + "ff_proj.weight"].T) * (h @ w[b + "up_proj.weight"].T)) @ w[b + "ff_out.weight"].T
    return rms(x, w["model.transformer.ln_f.weight"]) @ w["model.transformer.ff_out.weight"].T


def test_llada_matches_an_independent_forward(checkpoints):
    # fact (models.md, verified): LLaDA is a Llama under another name; full attention, unshifted logits
    path = checkpoints["llada"]
    model, _, adapter = load_model(path)
    ids = torch.tensor([[5, 17, 40, 3, 2, 2, 2, 2]])  # a fully masked suffix (mask id 2)
    L = ids.shape[1]
    with torch.no_grad():
        got = adapter.logits(model, ids, torch.ones(1, 1, L, L, dtype=torch.bool), torch.arange(L)[None])
        plain = model(ids).logits[0]  # is_causal=False on the config: a plain call is bidirectional too
    want = llada_reference_logits(load_file(path / "model.safetensors"), LLADA_CONFIG, ids[0])
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, want, atol=1e-5, rtol=0)


class PositionRevealer(torch.nn.Module):
    """A hand-built model whose logits at column c put all their mass on token id c."""

    def __init__(self, vocab: int = VOCAB):
        super().__init__()
        self.config = SimpleNamespace(_attn_implementation="sdpa")
        self.vocab = vocab

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, use_cache):
        B, S = input_ids.shape
        logits = 40.0 * F.one_hot(torch.arange(S), self.vocab).float().expand(B, S, -1)
        return SimpleNamespace(logits=logits[logits_to_keep] if torch.is_tensor(logits_to_keep) else logits)


@pytest.mark.parametrize("family", ["fast_dllm_v2", "dream"])
def test_shifted_families_read_each_target_at_the_right_column(family, checkpoints):
    """fact: Fast-dLLM v2 and Dream predict token i at position i-1. Packed layout on Fast-dLLM v2's
    absolute grid [x | clean | noisy tail | noisy], prompt of 3 in blocks of 4 (the tail is the 3 prompt
    tokens, so response tokens 1, 5, 9 start blocks): token j is read at noisy column j-1 (for j = 0 the
    noisy tail's last column), except the first token of a block, read at the last column of the previous
    *clean* block. Exact mode (Dream): one copy, token j read at column j-1."""
    _, _, adapter = load_model(checkpoints[family])
    adapter = adapter.with_block_size(4)
    P, R, bs = 3, 12, 4
    if adapter.default_mode == "packed":
        assert adapter.absolute_grid
        noisy_start = P + R + P % bs
        cols = [P + j - 1 if (P + j) % bs == 0 else noisy_start + j - 1 for j in range(R)]
    else:
        cols = [P + j - 1 for j in range(R)]
    batch = Batch(
        torch.full((1, P), 20),
        torch.ones(1, P, dtype=torch.bool),
        torch.tensor([cols]),
        torch.ones(1, R, dtype=torch.bool),
    )
    noisy = torch.where(torch.rand(1, R) < 0.5, adapter.mask_token_id, batch.response_ids)
    logp, _ = position_logprobs(adapter, PositionRevealer(), batch, noisy, batch.response_valid, adapter.default_mode)
    assert (logp > -1e-6).all(), logp  # every target read exactly at its expected column
    unshifted, _ = position_logprobs(
        replace(adapter, shifted=False), PositionRevealer(), batch, noisy, batch.response_valid, adapter.default_mode
    )
    assert (unshifted < -30).all()  # and the unshifted reading would be wrong everywhere


def test_documented_family_facts():
    # fact: documented mask tokens: LLaDA 126336, Dream/DiffuCoder 151666, SDAR/TraDo 151669, Fast-dLLM v2 151665
    ids = {name: (f.mask_token, f.mask_token_id) for name, f in FAMILIES.items()}
    assert ids == {
        "llada": ("<|mdm_mask|>", 126336),
        "dream": ("<|mask|>", 151666),
        "sdar": ("<|MASK|>", 151669),
        "fast_dllm_v2": ("|<MASK>|", 151665),
        "llada2": ("<|mask|>", 156895),  # fact: dFactory generate's mask_id default (the string is looked up)
    }
    # fact: native classes: Llama for LLaDA, Qwen2 for Dream and Fast-dLLM v2, Qwen3 for SDAR/TraDo
    assert {n: f.native for n, f in FAMILIES.items()} == {
        "llada": "llama",
        "dream": "qwen2",
        "sdar": "qwen3",
        "fast_dllm_v2": "qwen2",
        "llada2": "glm4_moe",
    }
    # fact: model_type spellings; DiffuCoder ships Dream's format; hand-converted Fast-dLLM v2 keeps qwen2 + bd_size
    assert detect_family({"model_type": "llada"}) == "llada"
    assert detect_family({"model_type": "Dream"}) == "dream"
    assert detect_family({"model_type": "sdar", "block_size": 4}) == "sdar"
    assert detect_family({"model_type": "Fast_dLLM_Qwen", "bd_size": 32}) == "fast_dllm_v2"
    assert detect_family({"model_type": "qwen2", "bd_size": 32}) == "fast_dllm_v2"
    assert detect_family({"model_type": "llada2_moe"}) == detect_family({"model_type": "llada2_moe_veomni"}) == "llada2"
    assert detect_family({"model_type": "qwen3", "block_size": 4, "mask_token_id": 2}) == "native"


def test_sharded_export_reads_back(checkpoints, tmp_path):
    model, _, _ = load_model(checkpoints["dream"])
    state = model.state_dict()
    save_safetensors(state, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    back = read_weights(tmp_path)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


# ----------------------------------------------------------------------------- LoRA


def test_lora_with_llada_names_reference_and_merge_export(checkpoints, tmp_path):
    # fact: PEFT target names differ for LLaDA (attn_out, ff_proj, ff_out); native names after loading
    model, tokenizer, adapter = load_model(checkpoints["llada"])
    assert lora_targets(model, adapter, ["attn_out", "ff_proj", "ff_out", "q_proj"]) == [
        "down_proj",
        "gate_proj",
        "o_proj",
        "q_proj",
    ]
    with pytest.raises(ValueError, match="'attn_norm' names no Linear"):
        lora_targets(model, adapter, ["attn_norm"])
    with pytest.raises(ValueError, match="'c_attn' names no Linear"):
        lora_targets(model, adapter, ["c_attn"])
    ids = torch.tensor([[5, 17, 40, 3, 2, 2]])
    with torch.no_grad():
        base = model(ids).logits.clone()
    peft = apply_lora(model, adapter, r=4, alpha=8, target_modules=["attn_out", "ff_proj", "ff_out", "q_proj"])
    assert set(peft.peft_config["default"].target_modules) == {"o_proj", "gate_proj", "down_proj", "q_proj"}
    for name, p in peft.named_parameters():
        assert p.requires_grad == ("lora_" in name)
        if "lora_B" in name:  # B starts at zero; make the adapters matter
            torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        tuned = peft(input_ids=ids).logits
        with peft.disable_adapter():  # the reference model: the base, adapters disabled
            ref = peft(input_ids=ids).logits
    assert torch.equal(ref, base)
    assert (tuned - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="merge_lora"):
        export_checkpoint(peft, tokenizer, adapter, tmp_path / "x")
    merged = merge_lora(peft)
    export_checkpoint(merged, tokenizer, adapter, tmp_path / "merged")
    again, _, _ = load_model(tmp_path / "merged")
    assert_same_tensors(merged, again)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, tuned, atol=1e-5, rtol=0)


def test_lora_defaults_cover_every_projection(checkpoints):
    model, _, adapter = load_model(checkpoints["sdar"])
    peft = apply_lora(model, adapter, r=2)
    wrapped = {n.rsplit(".", 1)[-1] for n, _ in peft.named_modules() if n.endswith(("_proj",))}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= wrapped
    assert sum("lora_A" in n for n, _ in peft.named_parameters()) == 7 * 2  # 7 projections x 2 layers


# ----------------------------------------------------------------------------- bad inputs


def test_unknown_model_type(tmp_path):
    write_folder(tmp_path, {"model_type": "gpt2", "n_embd": 8}, {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown model family.*'gpt2'"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="unknown model family 'gpt9'"):
        load_model(tmp_path, family="gpt9")


def test_folder_without_weights(tmp_path):
    write_llada(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(tmp_path)


def test_mismatched_shapes(tmp_path):
    write_llada(tmp_path, mlp_hidden_size=48)  # the tensors are 64 wide
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(64, 32\).*\(48, 32\)"):
        load_model(tmp_path)


def test_missing_tensor_names_the_tensor(tmp_path):
    write_dream(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.self_attn.k_proj.bias'\]"):
        load_model(tmp_path)


def test_missing_tokenizer(tmp_path):
    write_sdar(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_model(tmp_path)


def test_no_mask_token(tmp_path):
    write_sdar(tmp_path, mask_token="<|not_a_mask|>")  # SDAR's config has no mask_token_id key
    with pytest.raises(ValueError, match="no mask token.*'<|MASK|>'"):
        load_model(tmp_path)


def test_llada_option_without_llama_equivalent(tmp_path):
    write_llada(tmp_path, attention_layer_norm=True)
    with pytest.raises(ValueError, match="attention_layer_norm=True has no Llama equivalent"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- GPU


# flex attention refuses head dimensions below 16: the GPU checkpoints use two heads of 16
FLEX_SHAPES = {
    "llada": {"n_heads": 2, "n_kv_heads": 2},
    "dream": {"num_attention_heads": 2, "num_key_value_heads": 1},
    "sdar": {"num_attention_heads": 2, "num_key_value_heads": 1},
    "fast_dllm_v2": {"num_attention_heads": 2, "num_key_value_heads": 1},
}


@pytest.fixture(scope="module")
def flex_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flex")
    torch.manual_seed(0)
    return {name: write(root / name, **FLEX_SHAPES[name]) for name, write in WRITERS.items()}


def test_flex_checkpoints_have_head_dimension_16(flex_checkpoints):
    for family, path in flex_checkpoints.items():
        model, _, _ = load_model(path)
        assert model.model.layers[0].self_attn.head_dim >= 16, family


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", list(WRITERS))
def test_gpu_bf16_flex_attention_and_checkpointing(family, flex_checkpoints):
    from torch.nn.attention.flex_attention import BlockMask

    model, _, adapter = load_model(
        flex_checkpoints[family],
        dtype=torch.bfloat16,
        attn_implementation="flex_attention",
        gradient_checkpointing=True,
        device="cuda",
    )
    assert model.dtype == torch.bfloat16 and model.is_activation_checkpointing
    model.train()
    adapter = adapter.with_block_size(8)
    cpu = make_batch(8)
    batch = Batch(cpu.prompt_ids.cuda(), cpu.prompt_valid.cuda(), cpu.response_ids.cuda(), cpu.response_valid.cuda())
    from dtrpo.masking import packed_layout

    layout = packed_layout(
        batch.prompt_ids, batch.prompt_valid, batch.response_ids, batch.response_valid, batch.response_ids, 8
    )
    assert isinstance(adapter.attention_mask(model, layout), BlockMask)
    states = draw(adapter, batch, [1, 2], EstimatorConfig(steps_per_block=4))
    value, _ = score(adapter, model, batch, states)
    value.sum().backward()
    assert torch.isfinite(value).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2"])
def test_gpu_flex_equals_sdpa_on_padding_free_pairs(family, flex_checkpoints):
    """Several pairs packed into one row: the flex `BlockMask` gives the dense SDPA mask's log-probs."""
    from tests.test_masking_pairs import pairs_batch

    p, c, r = zip(*[(5, 4, 4), (3, 1, 1), (4, 1, 2), (2, 1, 1)], strict=True)
    got = {}
    for attn in ("sdpa", "flex_attention"):
        model, _, adapter = load_model(flex_checkpoints[family], attn_implementation=attn, device="cuda")
        adapter = adapter.with_block_size(4)
        cpu, noisy = pairs_batch(p, c, r, adapter.mask_token_id, 4, True)
        batch = Batch(*(x.cuda() for x in (cpu.prompt_ids, cpu.prompt_valid, cpu.response_ids, cpu.response_valid)))
        batch = replace(batch, pairs=True, pack=True)
        with torch.no_grad():
            got[attn], _ = position_logprobs(adapter, model, batch, noisy.cuda(), batch.response_valid, "packed")
    torch.testing.assert_close(got["flex_attention"], got["sdpa"], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- training


PAIRS = [{"prompt": f"{i}+{i}=", "chosen": "a" * (3 + i % 4), "rejected": "zz" * (1 + i % 3)} for i in range(4)]


def two_steps(model, tokenizer, adapter, tmp_path):
    from dtrpo.trainer import DTRPOConfig, DTRPOTrainer

    args = DTRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_steps=2,
        use_cpu=True,
        bf16=False,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        report_to=[],
        steps_per_block=2,
        block_size=4,
        max_completion_length=8,
        logging_steps=1,
    )
    trainer = DTRPOTrainer(model=model, args=args, adapter=adapter, processing_class=tokenizer, train_dataset=PAIRS)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("family", list(WRITERS))
def test_two_dtrpo_training_steps(family, checkpoints, tmp_path):
    model, tokenizer, adapter = load_model(checkpoints[family])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    two_steps(model, tokenizer, adapter, tmp_path)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.norm.weight" in changed


def test_two_lora_training_steps_leave_the_base_alone(checkpoints, tmp_path):
    model, tokenizer, adapter = load_model(checkpoints["llada"])
    peft = apply_lora(model, adapter, r=2, target_modules=["attn_out", "ff_out"])
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    two_steps(peft, tokenizer, adapter, tmp_path)
    changed = {k for k, v in peft.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)


@pytest.mark.parametrize("family", list(WRITERS))
def test_generate_with_each_familys_own_attention(family, checkpoints):
    """Block-causal families decode with the KV cache exactly as without it, on their absolute grid;
    full-attention families decode over a fixed canvas. Every family fills its generation length with
    real tokens."""
    from dtrpo.sampler import generate

    model, tokenizer, adapter = load_model(checkpoints[family])
    prompts = [
        tokenizer("ab", add_special_tokens=False)["input_ids"],
        tokenizer("abcde", add_special_tokens=False)["input_ids"],
    ]
    bs = adapter.block_size
    out = generate(adapter, model, prompts, gen_length=2 * bs, steps_per_block=bs, use_cache=True)
    assert all(adapter.mask_token_id not in seq for seq in out.sequences)
    again = generate(adapter, model, prompts, gen_length=2 * bs, steps_per_block=bs, use_cache=False)
    assert again.sequences == out.sequences
    if adapter.block_causal:  # bs = 4: prompts of 2 and 5 leave 2 and 3 response slots in the shared first block
        assert out.blocks == 3 and out.lengths == [2 + 2 * bs, 3 + 2 * bs]
        assert out.nfe == 3 + bs + bs  # one forward per step (one token each): prefill and commits ride on steps
    else:
        assert out.blocks == 2 and out.lengths == [2 * bs, 2 * bs]
        assert out.nfe == 2 * bs  # one full-canvas pass per step, no cache


def test_family_export_after_training_keeps_the_special_token_ids(tmp_path):
    """The Trainer aligns the model config's pad id with the tokenizer's. Fast-dLLM v2's config pads with
    <|im_end|> (the 7B: 151645) while its tokenizer pads with <|endoftext|> (151643), and the family's code
    uses config.pad_token_id as the embedding's padding_idx: the family export keeps the source's ids."""
    from dtrpo.cli import main
    from dtrpo.trainer import DTRPOConfig, DTRPOTrainer

    folder = write_fast_dllm(tmp_path / "source", pad_token_id=2)  # <|im_end|>, as the 7B's config
    model, tokenizer, adapter = load_model(folder)
    source = json.loads((folder / "config.json").read_text())
    assert source["pad_token_id"] != tokenizer.pad_token_id  # else the test could not fail
    args = DTRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                       save_strategy="no", report_to=[], disable_tqdm=True, max_completion_length=8)  # fmt: skip
    trainer = DTRPOTrainer(model=model, args=args, adapter=adapter, processing_class=tokenizer, train_dataset=PAIRS)
    trainer.train()
    trainer.save_model()
    assert model.config.pad_token_id == tokenizer.pad_token_id  # what the Trainer did
    main(["export", "--model_name_or_path", str(tmp_path / "run"), "--output", str(tmp_path / "family")])
    exported = json.loads((tmp_path / "family" / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert exported[key] == source[key], key
    reloaded, _, _ = load_model(tmp_path / "family")
    assert reloaded.config.pad_token_id == source["pad_token_id"]
    assert_same_tensors(reloaded, model)
