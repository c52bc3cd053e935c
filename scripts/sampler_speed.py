"""Decoding speed of the block sampler beside HF autoregressive `generate` on the same random-init weights:
a real shape on a GPU (issue 16's last goal: at the 1.7B shape, the KV cache faster than none, and one token
per step at least as fast as autoregressive decoding), or the tiny model on a CPU.

    python scripts/sampler_speed.py --shape qwen3-1.7b --device cuda --dtype bfloat16 --block_size 4 \
        --prompt_length 256 --new_tokens 256 --output sampler_gpu.json        # the issue's GPU shape
    python scripts/sampler_speed.py --shape config:path/to/config.json --device cuda --dtype bfloat16
    python scripts/sampler_speed.py --shape tiny:96x3 --prompt_length 16 --new_tokens 64 --threads 2

`--shape`: `qwen3-1.7b` (Qwen3-1.7B's dimensions as an SDAR checkpoint: block-causal, absolute grid, random
weights, nothing downloaded), `llada2-mini` (LLaDA2-mini's 16B mixture of experts, `gpu_throughput.SHAPES`),
`config:PATH` (a family's config.json: LLaDA, Dream, SDAR, Fast-dLLM v2) or
`tiny:WIDTHxLAYERS` (the built-in model). The arms run side by side, in turn, `--repeats` times after a
warm-up, as `dtrpo bench sampler` runs them (its `side_by_side`); the JSON gives medians and each arm's
ratio to the autoregressive arm of the same run. Speed only: on random weights the settings with a fixed
number of steps (one or two tokens per step) do the same work as on trained weights; a threshold's speed
depends on the model's confidence and is not meaningful here, so none is timed. EOS is ignored by every arm.

`--profile` adds where one `one_per_step` call spends its time (cProfile, by internal time: matrix products
against attention, copies and the Python around them), to tell compute from overhead.

`--compile default|reduce-overhead` wraps the model's forward in `torch.compile` (dynamic shapes) for every
arm; `reduce-overhead` is CUDA graphs, a GPU option.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))  # gpu_throughput's model builder, when run as a script

from gpu_throughput import SHAPES, build_model, shape_config  # noqa: E402

from dtrpo.apps.bench_sampler import SETTINGS, side_by_side, speed_table  # noqa: E402

ARMS = ("one_per_step", "one_per_step_no_cache", "two_per_step")  # fixed steps: the same work on any weights

# fact: Qwen3-1.7B's public configuration (SDAR-1.7B is Qwen3-1.7B's shape plus block_size)
QWEN3_1_7B = {
    "model_type": "sdar",
    "architectures": ["SDARForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "attention_bias": False,
}


def model_for(shape: str, block_size: int, dtype: torch.dtype, folder: Path):
    """(model, adapter, description) for `--shape`, random weights."""
    if shape == "qwen3-1.7b":
        path = folder / "config.json"
        path.write_text(json.dumps({**QWEN3_1_7B, "block_size": block_size}))
        model, adapter = build_model(str(path), 0, 0, block_size, dtype)
        return model, adapter, "Qwen3-1.7B shape as SDAR"
    if shape in SHAPES:  # e.g. llada2-mini: the mixture-of-experts block-diffusion shape
        model, adapter = build_model(shape_config(shape, folder, block_size), 0, 0, block_size, dtype)
        return model, adapter, f"{shape} shape, random weights"
    if shape.startswith("config:"):
        model, adapter = build_model(shape[len("config:") :], 0, 0, block_size, dtype)
        return model, adapter, shape
    if shape.startswith("tiny:"):
        try:
            width, layers = (int(x) for x in shape[len("tiny:") :].split("x"))
        except ValueError:
            raise SystemExit(f"--shape {shape!r}: expected tiny:WIDTHxLAYERS, e.g. tiny:96x3") from None
        model, adapter = build_model(None, width, layers, block_size, dtype)
        return model, adapter, f"tiny {width}x{layers}"
    raise SystemExit(f"--shape {shape!r}: one of qwen3-1.7b, {', '.join(SHAPES)}, config:PATH, tiny:WIDTHxLAYERS")


def measure(args: argparse.Namespace, log=print) -> dict:
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as folder:
        model, adapter, what = model_for(args.shape, args.block_size, dtype, Path(folder))
    model.to(device).eval()
    if args.compile != "none":
        # the sampler's shapes change within a generation (a block's first step also commits the previous block;
        # the keys grow by a block per block): let every shape compile rather than fall back to eager after 8
        torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
        model.forward = torch.compile(model.forward, mode=args.compile, dynamic=True)
    vocab = min(model.config.vocab_size, adapter.mask_token_id)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(1, vocab, (args.prompts, args.prompt_length), generator=g).tolist()
    names = [a for a in args.arms.split(",") if a]
    arms = {name: SETTINGS[name] for name in names if args.block_size % SETTINGS[name]["steps"] == 0}
    if adapter.attention == "full":  # full attention always recomputes: no separate no-cache arm
        arms.pop("one_per_step_no_cache", None)
    log(
        f"{what}: {args.prompts} prompts of {args.prompt_length}, {args.new_tokens} new tokens, block {args.block_size}"
    )
    tok = SimpleNamespace(pad_token_id=0)
    results = side_by_side(model, adapter, tok, [prompts], args.new_tokens, arms, None, args.repeats, log)
    profile = one_step_profile(model, adapter, prompts, args.new_tokens) if args.profile else None
    return {
        "profile": profile,
        "shape": what,
        "params": sum(p.numel() for p in model.parameters()),
        "attention": adapter.attention,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "settings": vars(args),
        "arms": speed_table(results),
    }


def one_step_profile(model, adapter, prompts: list[list[int]], new_tokens: int, top: int = 8) -> dict:
    """cProfile of one `generate` call at one token per step: the total and the `top` functions by internal time
    (seconds and share of the total)."""
    from dtrpo.sampler import generate

    profiler = cProfile.Profile()
    profiler.enable()
    generate(adapter, model, prompts, new_tokens, adapter.block_size)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, internal, cumulative, _)
    total = sum(v[2] for v in stats.values())
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {
        "seconds": total,
        "top": [
            {
                "function": f"{Path(f).name}:{name}" if f != "~" else name,
                "calls": v[0],
                "seconds": v[2],
                "share": v[2] / total,
            }
            for (f, _, name), v in rows
        ],  # fmt: skip
    }


def table(result: dict) -> str:
    lines = ["| arm | tokens/s | x AR | forwards | tokens/forward |", "|---|---|---|---|---|"]
    for name, row in result["arms"].items():
        lines.append(
            f"| {name} | {row['positions_per_second']:,.0f} | {row['ratio_to_autoregressive']:.2f} | "
            f"{row['nfe_per_batch']:.0f} | {row['tokens_per_forward']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny:96x3", help="qwen3-1.7b, config:PATH or tiny:WIDTHxLAYERS")
    parser.add_argument("--block_size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per batch")
    parser.add_argument("--prompt_length", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64, help="a multiple of --block_size")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, among {ARMS}")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--compile", default="none", choices=("none", "default", "reduce-overhead"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also profile one one_per_step call")
    parser.add_argument("--output", help="write the result as JSON here too")
    args = parser.parse_args(argv)
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"--arms: unknown arm(s) {sorted(unknown)}; known: {list(ARMS)}")
    if args.new_tokens % args.block_size:
        parser.error(f"--new_tokens {args.new_tokens} must be a multiple of --block_size {args.block_size}")
    result = measure(args)
    print(table(result))
    for row in (result["profile"] or {}).get("top", []):
        print(f"  {row['share']:6.1%}  {row['seconds']:7.3f} s  {row['calls']:6d} calls  {row['function']}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
