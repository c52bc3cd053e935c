"""Per-GPU memory of dTRPO training on paper: 7-8B diffusion LMs on 8 GPUs, full fine-tuning and LoRA,
under DDP, FSDP2 / ZeRO-3 and ZeRO-2. Prints a markdown table, or JSON with --json.

    python scripts/memory_table.py [--gpus 8] [--prompt 256] [--response 512] [--block 32] [--json]

Bytes per parameter (mixed-precision Adam, as in the ZeRO paper, arXiv 1910.02054): weights 2 (bf16),
gradients 2, Adam 12 (fp32 master copy, first and second moments). FSDP2 with bf16 compute keeps fp32
sharded weights and gradients instead (4 + 4 + 8): the same 16 bytes, split differently. Sharded:
ZeRO-2 divides gradients and Adam by the GPU count, FSDP2 / ZeRO-3 everything, plus the working set of
the gathered units (the largest unit, current and prefetched, in bf16). The reference is a bf16 copy:
whole under DDP and ZeRO-2 (DeepSpeed runs it at stage 0), sharded under FSDP2 / ZeRO-3, none for LoRA
(the base with adapters disabled) and none with precomputed reference log-probs. LoRA: r on q, k, v,
o, gate, up, down; the base is frozen bf16, the adapters train with the same 16 bytes per parameter.

Activations of the packed dTRPO row (`share_prompt`): one row per pair of S = P + 2 (2R - B) columns
(the prompt once; per response its noisy copy, R, and its clean blocks but the last, R - B), so per
sequence the brief's P + 2R less one block. Per layer and token, what a Llama/Qwen layer keeps for its
backward in bf16, with flash/SDPA attention (no S x S scores) and no dropout: the input and output of
both RMSNorms (4h), Q and the attention output (2h), K and V (2 kv), the MLP's gate, up, activation
and product (4I): 2 (6h + 2kv + 4I) bytes; this is Korthikanti et al.'s 34 s b h (arXiv 2205.05198)
for a SwiGLU MLP, without their dropout masks and the S^2 term. With gradient checkpointing each layer
keeps its input (2h bytes per token) and one layer is recomputed at a time. The logits are computed
only at the 2R read columns: bf16 logits plus a log-softmax kept for backward (2 + 4 bytes per vocab
entry). Not counted: the CUDA context and allocator fragmentation (1-3 GB), communication buffers, the
reference's transient activations (one layer and its logits, not kept).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

GB = 1e9
STRATEGIES = ("DDP", "ZeRO-2", "FSDP2 / ZeRO-3")


@dataclass(frozen=True)
class Shape:
    name: str
    params: float  # total parameters
    hidden: int
    layers: int
    vocab: int
    intermediate: int  # the dense MLP's width (a MoE model's first `dense_layers`)
    kv_dim: int  # key/value width: kv heads x head dim (GQA)
    experts: int = 0  # routed experts per MoE layer; 0: a dense model
    experts_per_token: int = 0
    expert_intermediate: int = 0  # the width of each routed and shared expert
    shared_experts: int = 0
    dense_layers: int = 0  # a MoE model's first layers, with a dense MLP


def llada2(name: str, hidden: int, layers: int, intermediate: int, expert_intermediate: int, kv_heads: int) -> Shape:
    """A LLaDA2.x shape from its config.json (dFactory configs/model_configs): 256 routed experts, 8 a token, one
    shared expert, the first layer dense, head_dim 128 (query width = hidden), vocabulary 157184, untied head."""
    shape = Shape(name, 0.0, hidden, layers, 157184, intermediate, kv_heads * 128, 256, 8, expert_intermediate, 1, 1)
    attention = 2 * hidden * hidden + 2 * hidden * shape.kv_dim
    total = 2 * shape.vocab * hidden + layers * attention + 3 * hidden * intermediate
    total += (layers - 1) * mlp_params(shape, moe=True)
    return Shape(**{**asdict(shape), "params": float(total)})


def mlp_params(m: Shape, moe: bool) -> float:
    """One layer's MLP: dense SwiGLU, or routed and shared experts (SwiGLU each) and the router."""
    if not moe:
        return 3 * m.hidden * m.intermediate
    return 3 * m.hidden * m.expert_intermediate * (m.experts + m.shared_experts) + m.experts * m.hidden


def moe_layers(m: Shape) -> int:
    return m.layers - m.dense_layers if m.experts else 0


MODELS = (
    Shape("LLaDA-8B", 8.0e9, 4096, 32, 126464, 12288, 4096),
    Shape("SDAR / Fast-dLLM v2 7B (Qwen2.5-7B)", 7.6e9, 3584, 28, 152064, 18944, 512),
    llada2("LLaDA2-mini (16B, MoE)", 2048, 20, 5120, 512, 4),
    llada2("LLaDA2-flash (100B, MoE)", 4096, 32, 9216, 1024, 4),
)


@dataclass(frozen=True)
class Run:
    gpus: int = 8
    prompt: int = 256
    response: int = 512
    block: int = 32
    lora_rank: int = 16


def lora_params(m: Shape, r: int) -> float:
    """r (in + out) per adapted matrix: q, o (h x h), k, v (h x kv), gate, up, down (h x I). MoE layers: the
    shared experts' gate, up, down (h x s I_e) and every routed expert's own rank-r pair on its fused gate_up
    (h x 2 I_e) and down (I_e x h) (PEFT target_parameters)."""
    attention = r * (2 * (2 * m.hidden) + 2 * (m.hidden + m.kv_dim))
    dense = r * 3 * (m.hidden + m.intermediate)
    shared = r * 3 * (m.hidden + m.shared_experts * m.expert_intermediate)
    routed = m.experts * r * ((m.hidden + 2 * m.expert_intermediate) + (m.expert_intermediate + m.hidden))
    return m.layers * attention + (m.layers - moe_layers(m)) * dense + moe_layers(m) * (shared + routed)


def row_columns(run: Run) -> int:
    """S of one packed pair row: the prompt once, each response's noisy copy and its clean blocks but the last."""
    return run.prompt + 2 * (2 * run.response - run.block)


def saved_mlp(m: Shape, moe: bool) -> float:
    """Two-byte values an MLP keeps per token: dense, gate, up, activation, product (4 I); MoE, the same for each
    chosen and shared expert (4 (k + s) I_e), the token's copy to and output from each chosen expert (2 k h),
    and the fp32 router logits and scores (4 E)."""
    if not moe:
        return 4 * m.intermediate
    k = m.experts_per_token
    return 4 * (k + m.shared_experts) * m.expert_intermediate + 2 * k * m.hidden + 4 * m.experts


def activations(m: Shape, run: Run, pairs: int, checkpointing: bool) -> float:
    """Bytes the policy keeps for backward: `pairs` rows per GPU (the micro-batch)."""
    tokens = pairs * row_columns(run)
    dense, moe = (2 * (6 * m.hidden + 2 * m.kv_dim + saved_mlp(m, e)) * tokens for e in (False, True))
    n_moe = moe_layers(m)
    layer = max(dense, moe) if n_moe else dense  # one layer's saved tensors
    everything = (m.layers - n_moe) * dense + n_moe * moe
    body = m.layers * 2 * m.hidden * tokens + layer if checkpointing else everything
    logits = pairs * 2 * run.response * m.vocab * (2 + 4)
    return body + logits


def states(m: Shape, strategy: str, lora: bool, run: Run) -> dict[str, float]:
    """Weights, gradients, Adam and reference bytes per GPU (the reference as a live bf16 model)."""
    n, P = run.gpus, m.params
    attention = 2 * m.hidden**2 + 2 * m.hidden * m.kv_dim
    unit = max(attention + mlp_params(m, moe_layers(m) > 0), m.vocab * m.hidden)  # a layer or the LM head
    gathered = 2 * 2 * unit  # bf16, the unit in use and the prefetched one
    trained = lora_params(m, run.lora_rank) if lora else P
    frozen = P if lora else 0  # the LoRA base
    if strategy == "DDP":
        weights, grads, adam = 2 * (trained + frozen), 2 * trained, 12 * trained
    elif strategy == "ZeRO-2":
        weights, grads, adam = 2 * (trained + frozen), 2 * trained / n, 12 * trained / n
    else:
        weights, grads, adam = 2 * (trained + frozen) / n + gathered, 2 * trained / n, 12 * trained / n
    reference = 0.0 if lora else (2 * P / n if strategy == "FSDP2 / ZeRO-3" else 2 * P)
    return {"weights": weights, "grads": grads, "adam": adam, "reference": reference}


ACTIVATIONS = {"act mb1": (1, False), "act mb1 ckpt": (1, True), "act mb2 ckpt": (2, True)}


def table(run: Run) -> list[dict]:
    rows = []
    for m in MODELS:
        for lora in (False, True):
            for strategy in STRATEGIES:
                row = {"model": m.name, "method": f"LoRA r={run.lora_rank}" if lora else "full", "strategy": strategy}
                row.update({k: v / GB for k, v in states(m, strategy, lora, run).items()})
                fixed = row["weights"] + row["grads"] + row["adam"] + row["reference"]
                for name, (pairs, ckpt) in ACTIVATIONS.items():
                    row[name] = activations(m, run, pairs, ckpt) / GB
                    row["total " + name.removeprefix("act ")] = fixed + row[name]
                row["total mb2 ckpt, precomputed ref"] = row["total mb2 ckpt"] - row["reference"]
                rows.append(row)
    return rows


def markdown(rows: list[dict], run: Run, capacity: float = 80.0) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        over = {k: "*" if k.startswith("total") and r[k] > capacity else "" for k in keys}
        cells = [r[k] if isinstance(r[k], str) else f"{r[k]:.1f}{over[k]}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    S = row_columns(run)
    lines.append(
        f"\nGB (1e9 bytes) per GPU, {run.gpus} GPUs; prompt {run.prompt}, response {run.response}, block {run.block}: "
        f"packed pair row of S = {S} columns; mb = pairs per GPU; * = over {capacity:.0f} GB."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in asdict(Run()).items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a markdown table")
    args = vars(parser.parse_args(argv))
    as_json = args.pop("json")
    run = Run(**args)
    rows = table(run)
    print(json.dumps(rows, indent=2) if as_json else markdown(rows, run))


if __name__ == "__main__":
    main()
