"""LLaDA2.x (mixture-of-experts block diffusion) on tiny random checkpoints written in the family's own two
on-disk layouts: loading into Glm4MoeForCausalLM, exact against an independent forward written from the
public description (inclusionAI/dFactory `models/llada2_moe`), every dtrpo layout on the absolute grid,
routing, controls that must fail, sampler, training, export, LoRA, and bad configs.

Facts from the public code that a test relies on are named in a comment `# fact: ...`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.families.test_loading import VOCAB, rand, write_folder, write_tokenizer

LLADA2_CONFIG = {  # fact: the keys of dFactory's configs/model_configs/llada2_mini/config.json, tiny sizes
    "architectures": ["LLaDA2MoeModelLM"],
    "auto_map": {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
    },
    "model_type": "llada2_moe",
    "num_hidden_layers": 3,
    "hidden_size": 32,
    "intermediate_size": 48,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "moe_intermediate_size": 16,
    "norm_topk_prob": True,
    "num_experts_per_tok": 3,
    "norm_head": False,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_key_value_heads": 2,
    "rope_theta": 600000,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_bias": False,
    "use_rmsnorm": True,
    "rms_norm_eps": 1e-06,
    "head_dim": 16,
    "num_shared_experts": 1,
    "use_cache": False,
    "use_qkv_bias": False,
    "embedding_dropout": 0.0,
    "attention_dropout": 0.0,
    "output_dropout": 0.0,
    "vocab_size": VOCAB,
    "rotary_dim": 8,
    "router_dtype": "fp32",
    "moe_router_enable_expert_bias": True,
    "routed_scaling_factor": 2.5,
    "n_group": 4,
    "topk_group": 2,
    "score_function": "sigmoid",
    "pad_token_id": 0,
    "eos_token_id": 0,
    "partial_rotary_factor": 0.5,
    "use_sliding_window": False,
    "block_length": 4,
}
SPECIALS = ["<|endoftext|>", "<role>", "</role>", "<|mask|>"]  # mask id 3


def llada2_tensors(cfg: dict, fused: bool = False) -> dict[str, torch.Tensor]:
    """fact: dFactory's parameter names: word_embeddings, layers.{i}.attention.{query_key_value, query_layernorm,
    key_layernorm, dense}, mlp.{gate_proj, up_proj, down_proj} (dense layers), mlp.gate.{weight, expert_bias},
    mlp.experts.{j}.{gate,up,down}_proj.weight (released) or mlp.experts.{gate,up,down}_proj (E, ., .) (fused),
    mlp.shared_experts.*, norm, lm_head."""
    d, H, K, D = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    E, M, F_ = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]
    t = {
        "model.word_embeddings.weight": rand(VOCAB, d) * 10,
        "model.norm.weight": rand(d, norm=True),
        "lm_head.weight": rand(VOCAB, d) * 10,
    }
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        t |= {
            b + "input_layernorm.weight": rand(d, norm=True),
            b + "post_attention_layernorm.weight": rand(d, norm=True),
            b + "attention.query_key_value.weight": rand((H + 2 * K) * D, d) * 6,
            b + "attention.query_layernorm.weight": rand(D, norm=True),
            b + "attention.key_layernorm.weight": rand(D, norm=True),
            b + "attention.dense.weight": rand(d, H * D) * 4,
        }
        if i < cfg["first_k_dense_replace"]:
            t |= {b + "mlp.gate_proj.weight": rand(F_, d) * 4, b + "mlp.up_proj.weight": rand(F_, d) * 4}
            t |= {b + "mlp.down_proj.weight": rand(d, F_) * 4}
            continue
        t |= {
            b + "mlp.gate.weight": rand(E, d) * 10,
            b + "mlp.gate.expert_bias": 0.3 * torch.randn(E),  # some negative: the -inf group masking matters
            b + "mlp.shared_experts.gate_proj.weight": rand(M, d) * 4,
            b + "mlp.shared_experts.up_proj.weight": rand(M, d) * 4,
            b + "mlp.shared_experts.down_proj.weight": rand(d, M) * 4,
        }
        experts = {"gate_proj": rand(E, M, d) * 4, "up_proj": rand(E, M, d) * 4, "down_proj": rand(E, d, M) * 4}
        for proj, w in experts.items():
            if fused:
                t[b + f"mlp.experts.{proj}"] = w
            else:
                t |= {b + f"mlp.experts.{j}.{proj}.weight": w[j].clone() for j in range(E)}
    return t


def write_llada2(path: Path, fused: bool = False, **overrides) -> Path:
    cfg = {**LLADA2_CONFIG, **overrides}
    if fused:
        cfg["model_type"] = "llada2_moe_veomni"  # fact: dFactory builds fused experts for this model_type
    write_folder(path, cfg, llada2_tensors({**LLADA2_CONFIG, **overrides}, fused))
    write_tokenizer(path, SPECIALS, "<|endoftext|>", "<|endoftext|>")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The same random weights in both on-disk layouts."""
    root = tmp_path_factory.mktemp("llada2")
    torch.manual_seed(0)
    separate = write_llada2(root / "separate")
    torch.manual_seed(0)
    return {"separate": separate, "fused": write_llada2(root / "fused", fused=True)}


# ----------------------------------------------------------------------------- the independent reference


def expert_weight(w: dict, prefix: str, proj: str, j: int) -> torch.Tensor:
    """Expert j's projection in either layout: `experts.{j}.{proj}.weight` or row j of the fused `experts.{proj}`."""
    separate = f"{prefix}experts.{j}.{proj}.weight"
    return w[separate] if separate in w else w[f"{prefix}experts.{proj}"][j]


def reference_forward(
    w: dict[str, torch.Tensor], cfg: dict, ids: list[int], block: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """LLaDA2's forward from its public description, on its own tensor names; position q attends k exactly when
    k // block <= q // block (blocks counted from 0). Returns the (L, V) logits and, per MoE layer, the (L, k)
    chosen experts (sorted). As the public code: RMSNorm and the router computed in float32 whatever the dtype,
    rotary angles in float32 on the first `partial_rotary_factor` of each head (rotate-half), a sigmoid router
    whose per-expert bias enters the choice only, groups scored by their 2 best, weights normalised and scaled."""
    w = {k: v.to(dtype) if v.is_floating_point() else v for k, v in w.items()}
    L = len(ids)
    H, K, D, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    E, G, TG, k = cfg["num_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]

    def rms(x, g):
        x32 = x.float()
        return g * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)

    r = int(D * cfg["partial_rotary_factor"])
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, r, 2, dtype=torch.float32) / r)
    ang = torch.arange(L, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)

    def rope(x):  # (heads, L, D): rotate the first r dims of each head, keep the rest
        a, rest = x[..., :r], x[..., r:]
        turned = torch.cat([-a[..., r // 2 :], a[..., : r // 2]], -1)
        return torch.cat([a * cos + turned * sin, rest], -1)

    allowed = torch.tensor([[kk // block <= q // block for kk in range(L)] for q in range(L)])

    def swiglu(x, gate, up, down):
        return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T

    x, routes = w["model.word_embeddings.weight"][torch.tensor(ids)], []
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        h = rms(x, w[b + "input_layernorm.weight"])
        qkv = (h @ w[b + "attention.query_key_value.weight"].T).view(L, H + 2 * K, D)
        q, kk, v = qkv[:, :H], qkv[:, H : H + K], qkv[:, H + K :]
        q = rope(rms(q, w[b + "attention.query_layernorm.weight"]).transpose(0, 1))  # (H, L, D)
        kk = rope(rms(kk, w[b + "attention.key_layernorm.weight"]).transpose(0, 1))  # (K, L, D)
        v = v.transpose(0, 1)
        heads = []
        for hh in range(H):  # query head hh reads key/value head hh // (H / K)
            s = q[hh] @ kk[hh // (H // K)].T / D**0.5
            heads.append(torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v[hh // (H // K)])
        x = x + torch.cat(heads, -1) @ w[b + "attention.dense.weight"].T
        h = rms(x, w[b + "post_attention_layernorm.weight"])
        if i < cfg["first_k_dense_replace"]:
            x = x + swiglu(h, w[b + "mlp.gate_proj.weight"], w[b + "mlp.up_proj.weight"], w[b + "mlp.down_proj.weight"])
            continue
        scores = torch.sigmoid(h.float() @ w[b + "mlp.gate.weight"].float().T)  # (L, E), float32
        biased = scores + w[b + "mlp.gate.expert_bias"].float()
        chosen, weights = [], []
        for t in range(L):
            groups = biased[t].view(G, E // G).sort(-1, descending=True).values[:, :2].sum(-1)
            keep = groups.argsort(descending=True)[:TG]
            allowed_experts = [j for j in range(E) if j // (E // G) in keep.tolist()]
            best = sorted(allowed_experts, key=lambda j: -biased[t, j].item())[:k]
            s = scores[t, best]
            weights.append(s / (s.sum() + 1e-20) * cfg["routed_scaling_factor"] if k > 1 else s)
            chosen.append(best)
        out = torch.stack(
            [
                swiglu(h, *(expert_weight(w, b + "mlp.", p, j) for p in ("gate_proj", "up_proj", "down_proj")))
                for j in range(E)
            ],
            1,
        )  # (L, E, d): every expert on every token
        routed = torch.stack([(out[t, chosen[t]] * weights[t][:, None]).sum(0) for t in range(L)])
        shared = [w[b + f"mlp.shared_experts.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")]
        x = x + routed.to(dtype) + swiglu(h, *shared)
        routes.append(torch.tensor(chosen).sort(-1).values)
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T, routes


def model_forward(model, ids: list[int], block: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """dtrpo's loaded model on one sequence under the absolute block-causal mask (built by loops); the experts
    its routers chose, sorted, per MoE layer."""
    L, dtype = len(ids), model.dtype
    allowed = torch.tensor([[k // block <= q // block for k in range(L)] for q in range(L)])
    additive = torch.zeros(1, 1, L, L, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    routes = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: routes.append(out[2].sort(-1).values))
        for name, m in model.named_modules()
        if name.endswith("mlp.gate")
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), attention_mask=additive, position_ids=torch.arange(L)[None])
    finally:
        for h in hooks:
            h.remove()
    return logits.logits[0], routes


SEQUENCES = [torch.randint(4, 200, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 6, 9, 13)]


@pytest.mark.parametrize("layout", ["separate", "fused"])
def test_logits_and_routes_equal_the_public_description(folders, layout):
    """fp64 to 1e-10 relative, fp32 within a few ulp of the largest logit; every token's experts equal."""
    from safetensors.torch import load_file

    from dtrpo.families import load_model

    w = load_file(folders[layout] / "model.safetensors")
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 8 * torch.finfo(torch.float32).eps)):
        model, _, adapter = load_model(folders[layout], dtype=dtype)
        for ids in SEQUENCES:
            got, routes = model_forward(model, ids, adapter.block_size)
            want, want_routes = reference_forward(w, LLADA2_CONFIG, ids, 4, dtype)
            assert (got - want).abs().max() <= tol * want.abs().max(), (dtype, len(ids))
            assert len(routes) == 2 and all(torch.equal(a, b) for a, b in zip(routes, want_routes, strict=True))
