"""LLaDA2.x (mixture-of-experts block diffusion) on tiny random checkpoints written in the family's own two
on-disk layouts: loading into Glm4MoeForCausalLM, exact against an independent forward written from the
public description (inclusionAI/dFactory `models/llada2_moe`), every dtrpo layout on the absolute grid,
routing, controls that must fail, sampler, training, export, LoRA, and bad configs.

Facts from the public code that a test relies on are named in a comment `# fact: ...`.
"""

from __future__ import annotations

import json
import math
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


def route(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cfg: dict, dtype: torch.dtype = torch.float32):
    """The public router on (L, d) hidden states, token by token, in `dtype` (float32 in the public code): sigmoid
    scores; the bias enters the choice only; a group scores the sum of its 2 best biased scores, `topk_group`
    groups are kept; the best `num_experts_per_tok` biased experts inside them; their unbiased scores normalised
    to sum 1 (top-k > 1) and scaled. Returns the chosen experts per token and their weights."""
    E, G, TG, k = cfg["num_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
    scores = torch.sigmoid(h.to(dtype) @ weight.to(dtype).T)  # (L, E)
    biased = scores + bias.to(dtype)
    chosen, weights = [], []
    top2 = biased.view(-1, G, E // G).sort(-1, descending=True).values[..., :2].sum(-1)  # (L, G)
    for t, row in enumerate(biased.tolist()):
        keep = top2[t].argsort(descending=True)[:TG].tolist()
        inside = [j for j in range(E) if j // (E // G) in keep]
        best = sorted(inside, key=lambda j: -row[j])[:k]
        s = scores[t, best]
        weights.append(s / (s.sum() + 1e-20) * cfg["routed_scaling_factor"] if k > 1 else s)
        chosen.append(best)
    return chosen, weights


def reference_forward(
    w: dict[str, torch.Tensor],
    cfg: dict,
    ids: list[int],
    block: int,
    dtype: torch.dtype = torch.float64,
    router_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """LLaDA2's forward from its public description, on its own tensor names; position q attends k exactly when
    k // block <= q // block (blocks counted from 0). Returns the (L, V) logits and, per MoE layer, the (L, k)
    chosen experts (sorted). As the public code: RMSNorm and the router computed in float32 whatever the dtype,
    rotary angles in float32 on the first `partial_rotary_factor` of each head (rotate-half), a sigmoid router
    whose per-expert bias enters the choice only, groups scored by their 2 best, weights normalised and scaled."""
    w = {k: v.to(dtype) if v.is_floating_point() else v for k, v in w.items()}
    L = len(ids)
    H, K, D, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]

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
        chosen, weights = route(h, w[b + "mlp.gate.weight"], w[b + "mlp.gate.expert_bias"], cfg, router_dtype)
        out = torch.stack(
            [
                swiglu(h, *(expert_weight(w, b + "mlp.", p, j) for p in ("gate_proj", "up_proj", "down_proj")))
                for j in range(cfg["num_experts"])
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


# ----------------------------------------------------------------------------- every dtrpo layout on the grid

BS = 4
PROMPT_LENS = (4, 5, 6, 7, 3)  # every remainder P % 4 and a prompt shorter than a block, in one batch


def state_of(prompt: list[int], response: list[int], noisy_row: list[int], j: int, mode: str) -> list[int]:
    """The sequence the public sampler holds when it decodes response token j (test_grid's rule): earlier blocks
    clean, j's absolute block in its noisy state, nothing after it; `remasked`: every block noisy at once."""
    P = len(prompt)
    b = (P + j) // BS
    if mode == "remasked":
        return prompt + noisy_row[: len(response)]
    start, end = max(b * BS - P, 0), (b + 1) * BS - P
    return prompt + response[:start] + noisy_row[start:end]


def pair_batch(mask_id: int):
    """Pairs sharing their prompt (rows i and n + i), responses ending on the absolute grid, a random state."""
    from tests.families.test_grid import grid_batch

    n = len(PROMPT_LENS)
    batch, prompts, responses, _ = grid_batch(PROMPT_LENS * 2, (3, 2, 3, 1, 2) * 2, mask_id)
    prompt_ids, prompt_valid = batch.prompt_ids.clone(), batch.prompt_valid.clone()
    prompt_ids[n:], prompt_valid[n:] = prompt_ids[:n], prompt_valid[:n]
    rejected = [(responses[n + i] * 2)[: len(responses[i]) - BS if len(responses[i]) > BS else len(responses[i])]
                for i in range(n)]  # fmt: skip
    responses = responses[:n] + rejected
    R = max(map(len, responses))
    ids = torch.tensor([r + [0] * (R - len(r)) for r in responses])
    valid = torch.tensor([[True] * len(r) + [False] * (R - len(r)) for r in responses])
    g = torch.Generator().manual_seed(5)
    noisy = torch.where((torch.rand(ids.shape, generator=g) < 0.6) & valid, mask_id, ids)
    from dtrpo.estimators import Batch

    return Batch(prompt_ids, prompt_valid, ids, valid, pairs=True, pack=True), prompts[:n] * 2, responses, noisy


@pytest.fixture(scope="module")
def model64(folders):
    from dtrpo.families import load_model

    model, tokenizer, adapter = load_model(folders["separate"], dtype=torch.float64)
    lift_routers(model)
    return model, tokenizer, adapter


def lift_routers(model: torch.nn.Module) -> None:
    """Run every router of `model` by `route` in the model's dtype. The public router (and the native one) runs in
    float32 whatever the model's dtype, and a float32 matmul rounds differently for different numbers of rows
    (BLAS picks kernels by shape): a float64 forward of a packed batch then agrees with one of a single state to
    float32 precision only (6e-7 measured). The float64 layout checks lift both routers to float64."""
    for name, m in model.named_modules():
        if name.endswith("mlp.gate"):

            def forward(hidden, m=m):
                h = hidden.view(-1, m.hidden_dim)
                chosen, weights = route(h, m.weight, m.e_score_correction_bias, LLADA2_CONFIG, model.dtype)
                return h @ m.weight.T, torch.stack(weights), torch.tensor(chosen)

            m.forward = forward


def layout_errors(model, adapter, w, mode: str) -> float:
    """The largest |dtrpo log-prob - reference log-prob| over every response token of a mixed batch."""
    from dtrpo.estimators import position_logprobs
    from tests.families.test_grid import grid_batch

    if mode == "pairs":
        batch, prompts, responses, noisy = pair_batch(adapter.mask_token_id)
    else:
        batch, prompts, responses, noisy = grid_batch(PROMPT_LENS, (3, 2, 3, 1, 2), adapter.mask_token_id)
    with torch.no_grad():
        got, _ = position_logprobs(adapter, model, batch, noisy, batch.response_valid, mode.replace("pairs", "packed"))
    worst, cache, lifted = 0.0, {}, model.dtype if model.dtype == torch.float64 else torch.float32
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        for j in range(len(r)):
            seq = state_of(p, r, noisy[i].tolist(), j, mode.replace("pairs", "packed"))
            if tuple(seq) not in cache:
                logits, _ = reference_forward(w, LLADA2_CONFIG, seq, BS, model.dtype, lifted)
                cache[tuple(seq)] = torch.log_softmax(logits.double(), -1)
            worst = max(worst, abs(got[i, j].item() - cache[tuple(seq)][len(p) + j, r[j]].item()))
    assert (got[~batch.response_valid] == 0).all()
    return worst


@pytest.mark.parametrize("mode", ["packed", "exact", "remasked", "pairs"])
def test_every_layout_equals_the_reference_for_every_remainder(folders, model64, mode):
    """float64 (routers lifted to float64 on both sides) to 1e-9 in log-probability."""
    from safetensors.torch import load_file

    model, _, adapter = model64
    assert adapter.absolute_grid and adapter.block_size == BS and not adapter.shifted
    assert layout_errors(model, adapter, load_file(folders["separate"] / "model.safetensors"), mode) < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["packed", "exact", "remasked", "pairs"])
def test_every_layout_in_float32_with_the_native_router(folders, mode):
    """float32, the native float32 router as loaded: within float32 rounding (2e-5 in log-probability)."""
    from safetensors.torch import load_file

    from dtrpo.families import load_model

    model, _, adapter = load_model(folders["separate"])
    assert layout_errors(model, adapter, load_file(folders["separate"] / "model.safetensors"), mode) < 2e-5


def test_controls_are_far_off_the_reference(folders, model64):
    """Each departure from the public code is caught by the check above: a response-relative grid with a
    bidirectional prompt, a token-causal prompt, full rotary, the router without its bias or without groups."""
    import copy
    from dataclasses import replace

    from safetensors.torch import load_file

    model, _, adapter = model64
    w = load_file(folders["separate"] / "model.safetensors")
    assert layout_errors(model, adapter, w, "packed") < 1e-9
    assert layout_errors(model, replace(adapter, prompt_attention="full"), w, "packed") > 0.1
    assert layout_errors(model, replace(adapter, prompt_attention="causal"), w, "packed") > 0.1

    from dtrpo.families import load_model

    native, _, _ = load_model(folders["separate"], dtype=torch.float64)  # its own routers, not lifted: editable
    assert layout_errors(native, adapter, w, "packed") < 1e-5  # float32 routers: float32 precision

    def changed(edit) -> float:
        other = copy.deepcopy(native)
        edit(other)
        return layout_errors(other, adapter, w, "packed")

    def full_rotary(m):
        m.config.rope_parameters = {**m.config.rope_parameters, "partial_rotary_factor": 1.0}
        m.model.rotary_emb = type(m.model.rotary_emb)(config=m.config)

    def routers(m):
        return [mod for name, mod in m.named_modules() if name.endswith("mlp.gate")]

    def no_bias(m):
        for r in routers(m):
            r.e_score_correction_bias.zero_()

    def no_groups(m):
        for r in routers(m):
            r.num_group = r.topk_group = 1

    for edit in (full_rotary, no_bias, no_groups):
        assert changed(edit) > 0.1, edit.__name__


# ----------------------------------------------------------------------------- sampler


def reference_generate(
    model, prompt: list[int], gen_length: int, threshold: float, eos: int, mask_id: int
) -> list[int]:
    """The public `generate`, greedy, one prompt, written from its description with `steps` = block (one token a
    step at least): blocks of BS counted from position 0; decoding starts at the block holding the prompt's
    end; each step forwards everything up to the current block's end (block-causal) and, among the block's
    masked positions, fixes every one whose argmax probability (full softmax) exceeds `threshold`, or else the
    single most confident; with eos_early_stop it returns once an EOS is fixed with everything before it decoded,
    and it stops after a block whose tokens hold an EOS. Returns the response up to (not including) its first
    EOS, at most gen_length tokens. Each forward is one call of the loaded model on the unpadded prefix under a
    loop-built mask (`model_forward`, equal to the independent forward above)."""
    P = len(prompt)
    total = -(-(P + gen_length) // BS) * BS
    x = prompt + [mask_id] * (total - P)
    for b in range(P // BS, total // BS):
        end = (b + 1) * BS
        for _ in range(BS):
            masked = [i for i in range(b * BS, end) if x[i] == mask_id]
            if not masked:
                break
            logits, _ = model_forward(model, x[:end], BS)
            probs = torch.softmax(logits, -1)
            conf, token = probs.max(-1)
            high = [i for i in masked if conf[i] > threshold]
            for i in high or [max(masked, key=lambda i: conf[i].item())]:
                x[i] = int(token[i])
            if eos in x[P:end] and mask_id not in x[P : P + x[P:end].index(eos)]:
                break  # early stop: an EOS with everything before it decoded
        if eos in x[P:end]:
            break
    out = x[P : P + gen_length]
    return out[: out.index(eos)] if eos in out else out


@pytest.mark.parametrize("threshold", [0.95, 0.1])
def test_sampler_gives_the_reference_generate_tokens(folders, threshold):
    """Greedy, steps = block, a confidence threshold and EOS stopping, on 20 prompts of every P % B: dtrpo's
    batched sampler (KV cache) gives the loop-written public rule's tokens on every prompt."""
    from collections import Counter

    from dtrpo.families import load_model
    from dtrpo.sampler import generate

    model, _, adapter = load_model(folders["separate"])
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(4, 200, (n,), generator=g).tolist() for n in range(1, 21)]
    probe = generate(adapter, model, prompts, gen_length=8, steps_per_block=BS)
    eos = Counter(t for s in probe.sequences for t in s).most_common(1)[0][0]  # a frequent token as EOS
    out = generate(adapter, model, prompts, gen_length=8, steps_per_block=BS, threshold=threshold, eos_token_id=eos)
    want = [reference_generate(model, p, 8, threshold, eos, adapter.mask_token_id) for p in prompts]
    assert sum(out.finished) >= 3  # EOS met on some prompts: the stopping rule is exercised
    if threshold < 0.5:
        assert out.nfe < probe.nfe  # some steps fixed several tokens: the threshold is exercised
    assert [s[:8] for s in out.sequences] == want  # dtrpo decodes to the end of the block holding token 8


# ----------------------------------------------------------------------------- export, training, MoE


@pytest.mark.parametrize("layout", ["separate", "fused"])
def test_family_export_is_bit_exact_in_its_own_layout(folders, layout, tmp_path):
    """fact: dFactory's moe_convertor stacks `experts.{j}.{proj}.weight` into `experts.{proj}` (E, ., .) and back.
    A family export writes the layout its model_type names, same names, same bits, same config.json; the other
    layout's folder holds the same weights stacked; a native export reloads to the same tensors."""
    from dtrpo.families import export_checkpoint, load_model, read_weights
    from tests.families.test_loading import assert_same_tensors

    source = folders[layout]
    model, tokenizer, adapter = load_model(source)
    export_checkpoint(model, tokenizer, adapter, tmp_path / "family")
    original, exported = read_weights(source), read_weights(tmp_path / "family")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    assert json.loads((tmp_path / "family/config.json").read_text()) == json.loads((source / "config.json").read_text())
    other = read_weights(folders["fused" if layout == "separate" else "separate"])
    fused = original if layout == "fused" else other
    separate = other if layout == "fused" else original
    assert torch.equal(
        fused["model.layers.2.mlp.experts.up_proj"][5], separate["model.layers.2.mlp.experts.5.up_proj.weight"]
    )
    export_checkpoint(model, tokenizer, adapter, tmp_path / "native", format="native")
    native, _, adapter_native = load_model(tmp_path / "native")
    assert_same_tensors(model, native)
    assert adapter_native == adapter
    export_checkpoint(native, tokenizer, adapter_native, tmp_path / "family2")
    again = read_weights(tmp_path / "family2")
    assert again.keys() == original.keys() and all(torch.equal(original[k], again[k]) for k in original)


def test_train_two_steps_export_reload_gives_the_same_logits(folders, tmp_path):
    """Two dTRPO steps change attention, router and expert weights but not the expert bias (a buffer); the
    family export reloads to the trained tensors, and the independent forward on the exported file gives the
    trained model's logits."""
    from safetensors.torch import load_file

    from dtrpo.families import export_checkpoint, load_model
    from tests.families.test_loading import two_steps

    source = write_llada2(tmp_path / "source", pad_token_id=2)  # a config pad id unlike the tokenizer's (0)
    model, tokenizer, adapter = load_model(source)
    assert tokenizer.pad_token_id != 2  # else the kept-ids check below could not fail
    names = dict(model.named_parameters())
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in dict(model.named_buffers())
    assert not any("e_score_correction_bias" in n for n in names)  # a buffer: never trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    two_steps(model, tokenizer, adapter, tmp_path)
    assert model.config.pad_token_id == tokenizer.pad_token_id  # the Trainer aligned it with the tokenizer
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    for name in (
        "self_attn.q_proj.weight",
        "mlp.gate.weight",
        "mlp.experts.gate_up_proj",
        "mlp.shared_experts.up_proj.weight",
    ):
        assert f"model.layers.1.{name}" in changed, name
    assert not any("e_score_correction_bias" in k for k in changed)
    export_checkpoint(model, tokenizer, adapter, tmp_path / "trained")
    exported = json.loads((tmp_path / "trained/config.json").read_text())
    assert exported == json.loads((source / "config.json").read_text())  # special-token ids kept
    again, _, _ = load_model(tmp_path / "trained")
    ids = SEQUENCES[-1]
    got, _ = model_forward(model.eval(), ids, BS)
    torch.testing.assert_close(model_forward(again, ids, BS)[0], got, atol=0, rtol=0)
    want, _ = reference_forward(
        load_file(tmp_path / "trained/model.safetensors"), LLADA2_CONFIG, ids, BS, torch.float32
    )
    assert (got - want).abs().max() <= 8 * torch.finfo(torch.float32).eps * want.abs().max()


def test_policy_and_reference_route_alike_at_equal_weights(folders, tmp_path):
    """The trainer's reference copy (and, for LoRA, the base with adapters off) routes every token to the same
    experts as the policy at equal weights; the router has no auxiliary loss in the native class or the public
    code (dFactory returns aux_loss None), so none enters the dTRPO loss."""
    from dtrpo.families import load_model
    from dtrpo.trainer import DTRPOConfig, DTRPOTrainer
    from tests.families.test_loading import PAIRS

    model, tokenizer, adapter = load_model(folders["separate"])
    args = DTRPOConfig(output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to=[], save_strategy="no",
                       disable_tqdm=True, block_size=4, max_completion_length=8)  # fmt: skip
    trainer = DTRPOTrainer(model=model, args=args, adapter=adapter, processing_class=tokenizer, train_dataset=PAIRS)
    for ids in SEQUENCES:
        policy_logits, policy_routes = model_forward(model, ids, BS)
        ref_logits, ref_routes = model_forward(trainer.ref_model, ids, BS)
        assert all(torch.equal(a, b) for a, b in zip(policy_routes, ref_routes, strict=True))
        torch.testing.assert_close(policy_logits, ref_logits, atol=0, rtol=0)
    assert not getattr(model.config, "output_router_logits", False)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"score_function": "softmax"}, "score_function='softmax'"),
        ({"n_group": None}, "has no 'n_group'"),
        ({"topk_group": None}, "has no 'topk_group'"),
        ({"n_group": 3}, "n_group=3 must divide num_experts=8"),
        ({"router_dtype": "bf16"}, "router_dtype='bf16'"),
        ({"use_bias": True}, "use_bias=True"),
        ({"norm_topk_prob": False}, "norm_topk_prob=false"),
        ({"rotary_dim": 16}, "rotary_dim=16 disagrees"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling="),
    ],
)
def test_unknown_router_settings_are_one_line_before_any_weight_loads(tmp_path, change, named):
    """The weights file is removed: the error must come from config.json alone, naming the key."""
    from dtrpo.families import load_model

    folder = write_llada2(tmp_path / "m", **change)
    cfg = json.loads((folder / "config.json").read_text())
    for key in [k for k, v in change.items() if v is None]:
        cfg.pop(key)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"LLaDA2 config\.json ") as err:
        load_model(folder)
    assert named in str(err.value) and "\n" not in str(err.value)


SENTINEL_CODE = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('remote code ran')\n"


def test_remote_code_is_never_executed(folders, tmp_path):
    """A LLaDA2 folder ships its modeling code (auto_map): it loads natively and the code never runs; a folder
    whose config names only remote code of an unknown model is refused with that reason, nothing run."""
    import shutil

    from dtrpo.cli import main
    from dtrpo.families import load_model

    folder = tmp_path / "with_code"
    shutil.copytree(folders["separate"], folder)
    for name in ("modeling_llada2_moe.py", "configuration_llada2_moe.py"):
        (folder / name).write_text(SENTINEL_CODE)
    model, _, _ = load_model(folder)
    assert type(model).__name__ == "Glm4MoeForCausalLM" and not (folder / "RAN").exists()

    only_code = tmp_path / "only_code"
    only_code.mkdir()
    cfg = {"model_type": "llada3_moe", "auto_map": {"AutoModelForCausalLM": "modeling_llada3.Model"}}
    (only_code / "config.json").write_text(json.dumps(cfg))
    (only_code / "modeling_llada3.py").write_text(SENTINEL_CODE)
    with pytest.raises(ValueError, match="auto_map names remote code, which dtrpo never runs"):
        load_model(only_code)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model_name_or_path", str(only_code), "--prompt", "x"])
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "auto_map names remote code" in message and "\n" not in message
    assert not (only_code / "RAN").exists()


def test_lora_reaches_attention_and_the_fused_experts(folders, tmp_path):
    """Default LoRA targets: attention, the dense and shared MLPs (Linear) and the routed experts (3D parameters,
    PEFT target_parameters); with adapters off the model is the base (the reference), routes included; two
    training steps move only LoRA weights; the merged export reloads to the merged model."""
    from dtrpo.families import export_checkpoint, load_model
    from dtrpo.lora import apply_lora, merge_lora
    from tests.families.test_loading import two_steps

    model, tokenizer, adapter = load_model(folders["separate"])
    base_logits, base_routes = model_forward(model, SEQUENCES[-1], BS)
    peft = apply_lora(model, adapter, r=2)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert any("experts" in n and "lora_A" in n for n in trainable)
    assert any("self_attn.q_proj.lora_A" in n for n in trainable) and any("shared_experts" in n for n in trainable)
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    two_steps(peft, tokenizer, adapter, tmp_path)
    changed = {k for k, v in peft.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed) and any("experts.lora_B" in k for k in changed)
    peft.eval()
    with peft.disable_adapter():
        off_logits, off_routes = model_forward(peft, SEQUENCES[-1], BS)
    torch.testing.assert_close(off_logits, base_logits, atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(off_routes, base_routes, strict=True))
    on_logits, _ = model_forward(peft, SEQUENCES[-1], BS)
    assert (on_logits - base_logits).abs().max() > 1e-4
    merged = merge_lora(peft)
    export_checkpoint(merged, tokenizer, adapter, tmp_path / "merged")
    again, _, _ = load_model(tmp_path / "merged")
    torch.testing.assert_close(
        model_forward(again, SEQUENCES[-1], BS)[0], on_logits, atol=1e-4, rtol=0
    )  # merge rounding


def test_lora_target_names_an_expert_parameter_or_is_refused(folders):
    from dtrpo.families import load_model
    from dtrpo.lora import apply_lora

    model, _, adapter = load_model(folders["separate"])
    peft = apply_lora(model, adapter, r=2, target_modules=["gate_up_proj"])  # the routed experts only
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("experts" in n and "shared" not in n for n in trainable)
    model, _, adapter = load_model(folders["separate"])
    with pytest.raises(ValueError, match="LoRA target 'query_key_value' names no Linear"):
        apply_lora(model, adapter, r=2, target_modules=["query_key_value"])
    with pytest.raises(ValueError, match="--lora_dropout 0.05: LoRA on fused experts only takes no dropout"):
        apply_lora(model, adapter, r=2, target_modules=["gate_up_proj"], dropout=0.05)
    peft = apply_lora(model, adapter, r=2, dropout=0.05)  # PEFT has no dropout on parameters: experts left out
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert any("q_proj" in n for n in trainable) and not any(".experts.lora" in n for n in trainable)


# ----------------------------------------------------------------------------- the whole loop on a tiny LLaDA2


@pytest.mark.slow
def test_the_cli_loop_on_a_tiny_llada2(tmp_path, capsys):
    """init-tiny --family llada2, then sft, eval, pairs, train (LoRA on attention and experts), generate and a
    family export, all from the command line."""
    from dtrpo.families import load_model, read_weights
    from tests.test_cli import cli

    cpu = ("--use_cpu", "true", "--disable_tqdm", "true")
    cli("init-tiny", "--output_dir", tmp_path / "tiny", "--family", "llada2", "--block_size", 4, "--hidden_size", 32)
    _, _, adapter = load_model(tmp_path / "tiny")
    assert (adapter.family, adapter.block_size, adapter.absolute_grid) == ("llada2", 4, True)
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(10, 30)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli("sft", "--model_name_or_path", tmp_path / "tiny", "--dataset_name", tmp_path / "sft.jsonl",
        "--output_dir", tmp_path / "sft", "--max_steps", 2, "--per_device_train_batch_size", 4, *cpu)  # fmt: skip
    sft = tmp_path / "sft"
    cli("eval", "--model_name_or_path", sft, "--task", "arithmetic:digits=2", "--n", 4, "--gen_length", 8,
        "--output", tmp_path / "eval.json")  # fmt: skip
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 4
    cli("pairs", "--model_name_or_path", sft, "--task", "arithmetic:digits=2", "--n", 4, "--samples", 3,
        "--temperature", 1.0, "--gen_length", 8, "--output", tmp_path / "pairs.jsonl")  # fmt: skip
    pairs = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(10, 18)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    cli("train", "--model_name_or_path", sft, "--dataset_name", tmp_path / "p.jsonl", "--output_dir",
        tmp_path / "lora", "--lora_r", 2, "--lora_dropout", 0, "--max_steps", 2,
        "--per_device_train_batch_size", 4, *cpu)  # fmt: skip
    out = cli("generate", "--model_name_or_path", tmp_path / "lora", "--prompt", "12+12=", "--gen_length", 8,
              capsys=capsys)  # fmt: skip
    assert '"prompt": "12+12="' in out.stdout
    cli("export", "--model_name_or_path", tmp_path / "lora", "--output", tmp_path / "family")
    exported = read_weights(tmp_path / "family")
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in exported  # the released layout, as the source
    assert json.loads((tmp_path / "family/config.json").read_text())["model_type"] == "llada2_moe"


@pytest.mark.slow
def test_iterate_and_lm_eval_on_a_tiny_llada2(tmp_path):
    """`dtrpo iterate` (two rounds of sample, pair, train, evaluate) and the lm-eval model class run on a tiny
    LLaDA2 as on the built-in model."""
    from types import SimpleNamespace

    from dtrpo.cli import main
    from dtrpo.families.llada2 import init_tiny
    from tests.test_iterate import argv

    init_tiny(tmp_path / "tiny", block_size=4, hidden_size=32, num_layers=2)
    rows = [{"id": f"p{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i), "split": "train" if i < 20 else "heldout"}
            for i in range(10, 26)]  # fmt: skip
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["iterate", *argv(tmp_path, tmp_path / "run")])
    assert list((tmp_path / "run").rglob("*.json"))
    lm_eval = pytest.importorskip("lm_eval")
    from dtrpo.harness import DTRPOLM

    assert lm_eval
    lm = DTRPOLM(pretrained=str(tmp_path / "tiny"), mc_samples=2)
    ((logp, _),) = lm.loglikelihood([SimpleNamespace(args=("1+1=", "2"))])
    assert logp < 0 and math.isfinite(logp)
    (text,) = lm.generate_until([SimpleNamespace(args=("1+1=", {"until": [], "max_gen_toks": 6}))])
    assert isinstance(text, str) and len(text) <= 8
