"""dTRPO training throughput and model FLOP utilisation on random pairs, for a random-init model of a
real shape (a family's config.json) or the built-in tiny model.

    python scripts/gpu_throughput.py --config path/to/LLaDA-8B/config.json --steps 20 --micro_batch 1 \
        --gradient_checkpointing --output throughput.json        # one GPU, bf16
    python scripts/gpu_throughput.py --device cpu --steps 2 --output throughput.json   # tiny model, CPU

It runs `DTRPOTrainer.train` (policy and live reference, `pair_losses` + backward + AdamW) for `--steps`
steps on synthetic pairs (prompt `--prompt` tokens, chosen and rejected `--response` tokens each) and
times every step after the first. FLOPs per step: 6 N per column the policy ran (forward and backward)
plus 2 N per column the reference ran (forward), counted with forward hooks on both models; N excludes
the input embedding (a lookup). Attention's own FLOPs (O(S^2)) are left out and the LM head is counted
at every column although logits are computed only at the read columns, as in the usual 6 N D estimate.
On a GPU the weights are bf16 and so are AdamW's states (one GPU cannot hold fp32 Adam states of an 8B
model beside the reference); the FLOPs per step do not depend on it.
MFU = FLOPs / step time / (--peak_tflops x 1e12); 989 is H100/H200 dense bf16. tokens/s counts the
prompt and both responses of each pair (the data), columns/s what the model ran (packed rows).

Written on a machine without a GPU: only the CPU path (`--device cpu`, tiny model) has been run; the
numbers for real shapes are still to be measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

# fact: dFactory's configs/model_configs/llada2_mini/config.json, its structural keys (random weights)
LLADA2_MINI = {
    "model_type": "llada2_moe",
    "architectures": ["LLaDA2MoeModelLM"],
    "vocab_size": 157184,
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "num_hidden_layers": 20,
    "first_k_dense_replace": 1,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "partial_rotary_factor": 0.5,
    "rotary_dim": 64,
    "max_position_embeddings": 16384,
    "rope_theta": 600000,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "use_bias": False,
    "use_qkv_bias": False,
    "attention_dropout": 0.0,
    "num_experts": 256,
    "num_shared_experts": 1,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 512,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "score_function": "sigmoid",
    "router_dtype": "fp32",
    "pad_token_id": 156892,
}
SHAPES = {"llada2-mini": LLADA2_MINI}  # --config NAME: a known shape instead of a config.json


def shape_config(name: str, folder: Path, block_size: int, layers: int | None = None) -> str:
    """Write a known shape's config.json (optionally cut to its first `layers` layers) into folder; its path."""
    config = {**SHAPES[name], "block_length": block_size}
    if layers:
        config["num_hidden_layers"] = layers
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder / "config.json")


def build_model(config_path: str | None, hidden: int, layers: int, block_size: int, dtype: torch.dtype):
    """(model, adapter): a family's shape from its config.json with random weights, or the tiny model."""
    from dtrpo.models import ModelAdapter, adapter_from_config, make_char_tokenizer, make_tiny_model

    if config_path is None:
        tokenizer = make_char_tokenizer()
        model = make_tiny_model(tokenizer, block_size=block_size, hidden_size=hidden, num_layers=layers)
        return model.to(dtype), adapter_from_config(model.config, tokenizer)
    from transformers import AutoModelForCausalLM

    from dtrpo.families import FAMILIES
    from dtrpo.families.loading import detect_family, mark_diffusion, native_config, read_config_json

    config = read_config_json(Path(config_path).parent)
    fam = FAMILIES[detect_family(config, config_path)]
    native = native_config(config, fam)
    model = AutoModelForCausalLM.from_config(native, dtype=dtype)
    adapter = ModelAdapter(
        family=fam.name,
        mask_token_id=native.vocab_size - 1,  # any id serves: the pairs are random ids
        block_size=block_size,
        shifted=fam.shifted,
        attention=fam.attention,
        prompt_attention=fam.prompt_attention,
        default_mode=fam.default_mode,
    )
    mark_diffusion(model.config, adapter)
    return model, adapter


def random_pairs(n: int, prompt: int, response: int, vocab: int, mask_id: int, seed: int = 0) -> list[dict]:
    """Tokenized pairs as the collator reads them; ids avoid the mask token."""
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(1, min(vocab, mask_id), (k,), generator=g).tolist()

    return [
        {"prompt_ids": ids(prompt), "chosen_ids": ids(response), "rejected_ids": ids(response), "index": i}
        for i in range(n)
    ]


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, the device synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.times, self._start = device, [], 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def count_columns(model: torch.nn.Module, counts: list[int]) -> None:
    """Add the number of input columns (batch x sequence) of every forward call to counts[0]."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts[0] += ids.numel()

    model.register_forward_pre_hook(hook, with_kwargs=True)


def flop_params(model: torch.nn.Module) -> int:
    """Parameters that do matmul work: all but the input embedding (unless it is tied to the LM head); of a
    mixture of experts' fused routed experts (3D `.experts.` parameters), only the k of E a token is sent to."""
    embed = model.get_input_embeddings().weight
    tied = embed is model.get_output_embeddings().weight
    config = getattr(model, "config", None)
    experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_local_experts", None)
    active = getattr(config, "num_experts_per_tok", None)
    total = 0
    for name, p in model.named_parameters():
        routed = experts and active and p.dim() == 3 and ".experts." in name
        total += p.numel() * active // experts if routed else p.numel()
    return total - (0 if tied else embed.numel())


def measure(args: argparse.Namespace) -> dict:
    from datasets import Dataset

    from dtrpo import DTRPOConfig, DTRPOTrainer
    from dtrpo.data import PreferenceCollator
    from dtrpo.models import make_char_tokenizer

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = args.config
    with tempfile.TemporaryDirectory() as folder:
        if config in SHAPES:
            config = shape_config(config, Path(folder), args.block_size, args.config_layers)
        model, adapter = build_model(config, args.hidden_size, args.num_layers, args.block_size, dtype)
    rows = random_pairs(args.micro_batch * args.steps, args.prompt, args.response, model.config.vocab_size,
                        adapter.mask_token_id)  # fmt: skip
    pairs = Dataset.from_list(rows)
    with tempfile.TemporaryDirectory() as out:
        config = DTRPOConfig(
            output_dir=out, per_device_train_batch_size=args.micro_batch, max_steps=args.steps, learning_rate=1e-5,
            use_cpu=device.type == "cpu", bf16=args.bf16, activation_checkpointing=args.gradient_checkpointing,
            save_strategy="no", report_to=[], disable_tqdm=True, logging_steps=args.steps, seed=0,
            max_prompt_length=None, max_completion_length=args.response, dataloader_num_workers=0,
        )  # fmt: skip
        timer = StepTimer(device)
        trainer = DTRPOTrainer(
            model, args=config, train_dataset=pairs, processing_class=make_char_tokenizer(), adapter=adapter,
            data_collator=PreferenceCollator(0, adapter.block_size, adapter.absolute_grid), callbacks=[timer],
        )  # fmt: skip
        policy, reference = [0], [0]
        count_columns(trainer.model, policy)
        count_columns(trainer.ref_model, reference)
        trainer.train()
    timed = timer.times[1:] or timer.times  # the first step compiles kernels and allocates
    seconds = sum(timed) / len(timed)
    n = flop_params(trainer.model)
    flops = (6 * policy[0] + 2 * reference[0]) * n / args.steps
    data_tokens = args.micro_batch * (args.prompt + 2 * args.response)
    return {
        "model": args.config or f"tiny hidden={args.hidden_size} layers={args.num_layers}",
        "device": str(device),
        "dtype": str(dtype),
        "params_for_flops": n,
        "micro_batch": args.micro_batch,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": args.steps,
        "step_seconds": seconds,
        "tokens_per_s": data_tokens / seconds,
        "columns_per_s": policy[0] / args.steps / seconds,
        "policy_columns_per_step": policy[0] / args.steps,
        "reference_columns_per_step": reference[0] / args.steps,
        "tflops": flops / seconds / 1e12,
        "peak_tflops": args.peak_tflops,
        "mfu": flops / seconds / (args.peak_tflops * 1e12),
        "max_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        help=f"a family's config.json (LLaDA, Dream, SDAR, Fast-dLLM v2, LLaDA2) or {sorted(SHAPES)}; default: tiny",
    )
    parser.add_argument(
        "--config_layers", type=int, help="keep the first N layers of a named shape (16B LLaDA2-mini: one GPU)"
    )
    parser.add_argument("--hidden_size", type=int, default=64, help="tiny model width")
    parser.add_argument("--num_layers", type=int, default=2, help="tiny model depth")
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per pair (a block multiple)")
    parser.add_argument("--response", type=int, default=512, help="tokens of chosen and of rejected")
    parser.add_argument("--micro_batch", type=int, default=1, help="pairs per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for cuda")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200: 989)")
    parser.add_argument("--output", help="write the result as JSON here too")
    args = parser.parse_args(argv)
    if args.bf16 is None:
        args.bf16 = args.device.startswith("cuda")
    result = measure(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
