"""Benchmarks that write JSON: per-pair training-step cost of each estimator, measured side by side.

Each repeat runs every estimator once, in turn, on the same pairs, so that machine noise hits them
alike; the report gives medians and ratios to `dtrpo`.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from dtrpo.estimators import Batch, EstimatorConfig, draw, score
from dtrpo.models import adapter_from_config, make_char_tokenizer, make_tiny_model


@dataclass
class BenchArgs:
    output: str = field(default="bench.json", metadata={"help": "JSON report to write."})
    pairs: int = field(default=4, metadata={"help": "Preference pairs per training step."})
    prompt_length: int = field(default=32, metadata={"help": "Prompt tokens."})
    response_length: int = field(default=64, metadata={"help": "Response tokens (a multiple of the block size)."})
    block_size: int = field(default=8, metadata={"help": "Block size B."})
    steps_per_block: int = field(default=4, metadata={"help": "Denoising steps T_B per block."})
    vrpo_samples: int = field(default=8, metadata={"help": "n of the vrpo estimator."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the tiny model."})
    num_layers: int = field(default=2, metadata={"help": "Layers of the tiny model."})
    repeats: int = field(default=5, metadata={"help": "Timed repeats per estimator (after one warm-up)."})
    estimators: str = field(default="dtrpo,vrpo,trajectory", metadata={"help": "Comma-separated estimators to time."})
    draws: int = field(default=256, metadata={"help": "Seeds per estimator for the bias and variance statistics."})


def _trainer(policy, ref, adapter, tokenizer, pairs: int):
    """A `DTRPOTrainer` whose `pair_losses` (the training loss code itself) is what gets timed."""
    import tempfile

    from dtrpo.trainer import DTRPOConfig, DTRPOTrainer

    args = DTRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="dtrpo-bench-"),
        per_device_train_batch_size=pairs,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        block_size=adapter.block_size,
    )
    return DTRPOTrainer(model=policy, ref_model=ref, args=args, adapter=adapter, processing_class=tokenizer)


def _step(trainer, inputs, cfg) -> int:
    """One training step's loss and backward through `DTRPOTrainer.pair_losses`; returns forward passes per pair."""
    trainer.estimator_config = cfg
    losses, metrics = trainer.pair_losses(trainer.model, inputs)
    losses.mean().backward()
    return int(metrics["estimator/forward_passes_per_pair"])


def estimator_costs(args: BenchArgs) -> dict:
    """Median seconds per pair of one training step (policy forward+backward, reference forward), timed
    through the trainer's own loss code."""
    tok = make_char_tokenizer()
    policy = make_tiny_model(tok, args.block_size, args.hidden_size, args.num_layers, seed=0).train()
    ref = make_tiny_model(tok, args.block_size, args.hidden_size, args.num_layers, seed=1)
    adapter = adapter_from_config(policy.config, tok)
    trainer = _trainer(policy, ref, adapter, tok, args.pairs)
    g = torch.Generator().manual_seed(0)
    n, P, R = args.pairs, args.prompt_length, args.response_length
    inputs = {
        "prompt_ids": torch.randint(4, 99, (n, P), generator=g),
        "prompt_valid": torch.ones(n, P, dtype=torch.bool),
        "chosen_ids": torch.randint(4, 99, (n, R), generator=g),
        "chosen_valid": torch.ones(n, R, dtype=torch.bool),
        "rejected_ids": torch.randint(4, 99, (n, R), generator=g),
        "rejected_valid": torch.ones(n, R, dtype=torch.bool),
        "index": torch.arange(n),
    }
    inputs = trainer._prepare_inputs(inputs)
    names = args.estimators.split(",")
    cfgs = {
        e: EstimatorConfig(estimator=e, steps_per_block=args.steps_per_block, vrpo_samples=args.vrpo_samples)
        for e in names
    }
    times, passes = {e: [] for e in names}, {}
    for rep in range(args.repeats + 1):
        for e in names:
            policy.zero_grad(set_to_none=True)
            start = time.perf_counter()
            passes[e] = _step(trainer, inputs, cfgs[e])
            if rep:  # the first round warms up
                times[e].append((time.perf_counter() - start) / n)
    base = statistics.median(times[names[0]])
    rows = {
        e: {
            "seconds_per_pair": statistics.median(times[e]),
            "forward_passes_per_pair": passes[e],  # policy and reference, chosen and rejected
            "ratio_to_" + names[0]: statistics.median(times[e]) / base,
        }
        for e in names
    }
    return {"settings": asdict(args), "threads": torch.get_num_threads(), "estimators": rows}


def _perturbed(model, scale: float, seed: int):
    """A reference near the policy, so that log-ratios have the size they have in training."""
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return ref


@torch.no_grad()
def estimator_statistics(args: BenchArgs) -> dict:
    """Mean and standard deviation over `draws` seeds of each estimator's log-ratio for one response,
    against the trajectory mean (the quantity dtrpo estimates without bias), on the block-causal tiny
    model; and, for the same weights run with full attention, the bias of `remasked` and `packed`
    against `exact` (method.md section 4)."""
    tok = make_char_tokenizer()
    policy = make_tiny_model(tok, args.block_size, args.hidden_size, args.num_layers, seed=0)
    ref = _perturbed(policy, 0.02, seed=1)
    g = torch.Generator().manual_seed(1)
    n, P, R = args.draws, args.prompt_length, args.response_length
    one = [torch.randint(4, 99, (1, P), generator=g), torch.randint(4, 99, (1, R), generator=g)]
    batch = Batch(
        one[0].expand(n, -1),
        torch.ones(n, P, dtype=torch.bool),
        one[1].expand(n, -1),
        torch.ones(n, R, dtype=torch.bool),
    )
    seeds = list(range(n))

    def ratios(adapter, **kw):
        cfg = EstimatorConfig(steps_per_block=args.steps_per_block, vrpo_samples=args.vrpo_samples, **kw)
        states = draw(adapter, batch, seeds, cfg)
        return score(adapter, policy, batch, states)[0] - score(adapter, ref, batch, states)[0]

    def summary(x, reference):
        """Bias against the reference's mean, with the standard error of the paired difference (same seeds)."""
        d = x - reference
        se = (d.std() / len(d) ** 0.5).item()
        return {"mean": x.mean().item(), "std": x.std().item(), "bias": d.mean().item(), "bias_se": se}

    block = adapter_from_config(policy.config, tok)
    truth = ratios(block, estimator="trajectory", trajectory_mode="packed")
    rows = {"trajectory": summary(truth, truth)}
    for name, kw in {
        "dtrpo": {},
        "dtrpo_all_masked_weighted": {"targets": "all_masked_weighted"},
        "vrpo": {"estimator": "vrpo"},
        "meanfield": {"estimator": "meanfield"},
    }.items():
        rows[name] = summary(ratios(block, **kw), truth)
    full = replace(block, attention="full", default_mode="exact")
    exact = ratios(full, mode="exact")
    modes = {m: summary(ratios(full, mode=m), exact) for m in ("exact", "packed", "remasked")}
    return {"block_causal": rows, "full_attention_modes": modes}


@torch.no_grad()
def sampler_throughput(args: BenchArgs) -> dict:
    """Tokens per second and NFE of block sampling with and without the KV cache, side by side."""
    from dtrpo.sampler import generate

    tok = make_char_tokenizer()
    model = make_tiny_model(tok, args.block_size, args.hidden_size, args.num_layers, seed=0)
    adapter = adapter_from_config(model.config, tok)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 99, (args.prompt_length,), generator=g).tolist() for _ in range(2 * args.pairs)]
    rows = {}
    for rep in range(args.repeats + 1):
        for cache in (True, False):
            out = generate(adapter, model, prompts, args.response_length, args.steps_per_block, use_cache=cache)
            if rep:  # the first round warms up
                rows.setdefault(cache, []).append((out.tokens_per_second, out.nfe))
    return {
        ("kv_cache" if cache else "recompute"): {
            "tokens_per_second": statistics.median(t for t, _ in r),
            "nfe": r[0][1],
            "prompts": len(prompts),
        }
        for cache, r in rows.items()
    }


def grid_costs(args: BenchArgs) -> dict:
    """Per-pair step time of packed dTRPO on the absolute block grid (SDAR/Fast-dLLM v2: block-causal
    prompt, the prompt tail copied into the noisy half) against the response grid (blocks starting at
    the response), side by side on the same tiny model and batch, through `DTRPOTrainer.pair_losses`.
    Prompt lengths mix every remainder P % B, so the tail copy is as wide as it gets (B - 1 columns)."""
    tok = make_char_tokenizer()
    policy = make_tiny_model(tok, args.block_size, args.hidden_size, args.num_layers, seed=0).train()
    ref = make_tiny_model(tok, args.block_size, args.hidden_size, args.num_layers, seed=1)
    response_grid = adapter_from_config(policy.config, tok)
    adapters = {
        "response_grid": response_grid,
        "absolute_grid": replace(response_grid, prompt_attention="block_causal"),
    }
    trainers = {name: _trainer(policy, ref, a, tok, args.pairs) for name, a in adapters.items()}
    for trainer in trainers.values():
        trainer.args.share_prompt = False  # the packed layout itself: [x | clean | tail | noisy]
    g = torch.Generator().manual_seed(3)
    n, P, R, bs = args.pairs, args.prompt_length, args.response_length, args.block_size
    lengths = [P - i % bs for i in range(n)]
    inputs = trainers["response_grid"]._prepare_inputs(
        {
            "prompt_ids": torch.randint(4, 99, (n, P), generator=g),
            "prompt_valid": torch.tensor([[False] * (P - m) + [True] * m for m in lengths]),
            "chosen_ids": torch.randint(4, 99, (n, R), generator=g),
            "chosen_valid": torch.ones(n, R, dtype=torch.bool),
            "rejected_ids": torch.randint(4, 99, (n, R), generator=g),
            "rejected_valid": torch.ones(n, R, dtype=torch.bool),
            "index": torch.arange(n),
        }
    )
    cfg = EstimatorConfig(steps_per_block=args.steps_per_block)
    times = {name: [] for name in adapters}
    for rep in range(args.repeats + 1):
        for name, trainer in trainers.items():
            policy.zero_grad(set_to_none=True)
            start = time.perf_counter()
            _step(trainer, inputs, cfg)
            if rep:  # the first round warms up
                times[name].append((time.perf_counter() - start) / n)
    tail = int(max(m % bs for m in lengths))
    base = statistics.median(times["response_grid"])
    return {
        name: {
            "seconds_per_pair": statistics.median(t),
            "packed_columns": P + 2 * R + (tail if name == "absolute_grid" else 0),
            "ratio_to_response_grid": statistics.median(t) / base,
        }
        for name, t in times.items()
    }
