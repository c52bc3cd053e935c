"""Benchmarks that write JSON: per-pair training-step cost of each estimator, measured side by side.

Each repeat runs every estimator once, in turn, on the same pairs, so that machine noise hits them
alike; the report gives medians and ratios to `dtrpo`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from dtrpo.estimators import Batch, EstimatorConfig, draw, score
from dtrpo.losses import preference_loss
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


def _step(adapter, policy, ref, batch, cfg, seeds, n) -> int:
    states = draw(adapter, batch, seeds, cfg)
    pol, passes = score(adapter, policy, batch, states)
    with torch.no_grad():
        rf, _ = score(adapter, ref, batch, states)
    lr = pol - rf
    loss, _ = preference_loss(lr[:n], lr[n:], beta=0.1)
    loss.mean().backward()
    return passes


def estimator_costs(args: BenchArgs) -> dict:
    """Median seconds per pair of one training step (policy forward+backward, reference forward)."""
    tok = make_char_tokenizer()
    policy = make_tiny_model(tok, args.block_size, args.hidden_size, args.num_layers, seed=0).train()
    ref = make_tiny_model(tok, args.block_size, args.hidden_size, args.num_layers, seed=1)
    adapter = adapter_from_config(policy.config, tok)
    g = torch.Generator().manual_seed(0)
    n, P, R = args.pairs, args.prompt_length, args.response_length
    prompt = torch.randint(4, 99, (n, P), generator=g).repeat(2, 1)
    batch = Batch(
        prompt,
        torch.ones_like(prompt, dtype=torch.bool),
        torch.randint(4, 99, (2 * n, R), generator=g),
        torch.ones(2 * n, R, dtype=torch.bool),
    )
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
            passes[e] = _step(adapter, policy, ref, batch, cfgs[e], list(range(2 * n)), n)
            if rep:  # the first round warms up
                times[e].append((time.perf_counter() - start) / n)
    base = statistics.median(times[names[0]])
    rows = {
        e: {
            "seconds_per_pair": statistics.median(times[e]),
            "forward_passes_per_pair": 4 * passes[e],  # policy and reference, chosen and rejected
            "ratio_to_" + names[0]: statistics.median(times[e]) / base,
        }
        for e in names
    }
    return {"settings": asdict(args), "threads": torch.get_num_threads(), "estimators": rows}
