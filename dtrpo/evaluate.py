"""Evaluation: accuracy on held-out prompts with a 95% interval, NFE and tokens per second."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from dtrpo.sampler import REMASKING, generate
from dtrpo.tasks import score_batch


@dataclass
class SamplingArgs:
    """Sampler settings shared by `generate`, `eval`, `pairs` and the demo (method.md section 8)."""

    gen_length: int = field(
        default=32,
        metadata={
            "help": "Tokens to generate (a multiple of the block size); on an absolute block grid (SDAR, Fast-dLLM "
            "v2) up to the end of the block holding the last of them."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Block size; default: the model's own (required where its config.json has none)."},
    )
    steps_per_block: int | None = field(default=None, metadata={"help": "Denoising steps per block; default: B."})
    remasking: str = field(default="low_confidence", metadata={"help": f"Which positions a step reveals: {REMASKING}."})
    threshold: float | None = field(default=None, metadata={"help": "Reveal every position above this confidence."})
    sub_block_size: int | None = field(
        default=None,
        metadata={
            "help": "Decode each block in sub-blocks of this size left to right (needs --threshold; Fast-dLLM v2: 8)."
        },
    )
    fix_first_token: bool = field(
        default=False,
        metadata={"help": "Reveal a block's first token at its first step (Fast-dLLM v2's rule for shifted models)."},
    )
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per sampler batch."})
    chat_template: bool = field(default=False, metadata={"help": "Wrap prompts in the tokenizer's chat template."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sample_texts(model, tokenizer, adapter, prompts: list[str], s: SamplingArgs, seed: int, desc: str | None = None):
    """Generate for every prompt, in batches; returns (texts, stats) with NFE and tokens/s."""
    model.eval()
    texts, nfe, seconds, tokens = [], 0, 0.0, 0
    steps = s.steps_per_block or adapter.block_size
    starts = range(0, len(prompts), s.batch_size)
    for n, i in enumerate(tqdm(starts, desc=desc, disable=desc is None, leave=False)):
        chunk = [encode_prompt(tokenizer, p, s.chat_template) for p in prompts[i : i + s.batch_size]]
        out = generate(
            adapter,
            model,
            chunk,
            s.gen_length,
            steps,
            s.remasking,
            s.threshold,
            s.temperature,
            seed=seed + n,
            eos_token_id=tokenizer.eos_token_id,
            sub_block_size=s.sub_block_size,
            fix_first_token=s.fix_first_token,
        )
        texts += [tokenizer.decode(seq, skip_special_tokens=True) for seq in out.sequences]
        nfe, seconds, tokens = nfe + out.nfe, seconds + out.seconds, tokens + sum(out.lengths)
    batches = max(len(starts), 1)
    return texts, {"nfe_per_batch": nfe / batches, "tokens_per_second": tokens / max(seconds, 1e-9), "seconds": seconds}


def interval95(scores: list[float]) -> tuple[float, float]:
    """Wilson score interval for 0/1 scores, the normal interval of the mean otherwise."""
    n = len(scores)
    if n == 0:
        return (math.nan, math.nan)
    mean = sum(scores) / n
    z = 1.96
    if all(s in (0.0, 1.0) for s in scores):
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return (max(0.0, centre - half), min(1.0, centre + half))
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(n - 1, 1))
    return (mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n))


def evaluate(model, tokenizer, adapter, task, rows: list[dict], s: SamplingArgs, desc: str | None = None) -> dict:
    """Accuracy (mean score) of the model on `rows`, with a 95% interval and sampler statistics."""
    texts, stats = sample_texts(model, tokenizer, adapter, [r["prompt"] for r in rows], s, s.seed, desc)
    scores = score_batch(task, rows, texts)
    low, high = interval95(scores)
    return {
        "task": task.name,
        "n": len(rows),
        "accuracy": sum(scores) / max(len(scores), 1),
        "ci95": [low, high],
        **stats,
        "samples": [
            {"prompt": r["prompt"], "response": t, "score": sc} for r, t, sc in zip(rows, texts, scores, strict=False)
        ][:10],
    }
