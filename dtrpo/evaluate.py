"""Evaluation: accuracy on held-out prompts with a 95% interval, NFE and tokens per second."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

from tqdm.auto import tqdm

from dtrpo.data import keep_prompt_end
from dtrpo.sampler import REMASKING, generate
from dtrpo.tasks import score_batch

logger = logging.getLogger(__name__)


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
    remasking: Literal["low_confidence", "random", "margin", "entropy"] = field(
        default="low_confidence", metadata={"help": f"Which positions a step reveals: {REMASKING}."}
    )
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
    max_prompt_length: int | None = field(
        default=512,
        metadata={"help": "Prompts longer than this (in tokens, chat template included) keep their last tokens."},
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed."})

    def __post_init__(self) -> None:
        if self.max_prompt_length is not None and self.max_prompt_length <= 0:
            raise ValueError(f"--max_prompt_length must be positive, got {self.max_prompt_length}")
        if self.batch_size <= 0:
            raise ValueError(f"--batch_size must be positive, got {self.batch_size}")


def encode_prompt(
    tokenizer, text: str, chat: bool, max_prompt_length: int | None = None, grid: int | None = None
) -> tuple[list[int], bool]:
    """Token ids of a prompt (in the chat template when `chat`), cut as training cuts it (its last tokens;
    a multiple of `grid` dropped on an absolute block grid), and whether it was cut."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return keep_prompt_end(tokenizer(text, add_special_tokens=False)["input_ids"], max_prompt_length, grid)


def encode_prompts(tokenizer, texts: list[str], s: SamplingArgs, adapter=None) -> tuple[list[list[int]], int]:
    """Token ids of each prompt under `s` (on `adapter`'s block grid), and how many were truncated (logged)."""
    grid = adapter.block_size if adapter is not None and adapter.absolute_grid else None
    encoded = [encode_prompt(tokenizer, t, s.chat_template, s.max_prompt_length, grid) for t in texts]
    cut = sum(c for _, c in encoded)
    if cut:
        logger.warning(
            "%d of %d prompts were longer than max_prompt_length=%d tokens: kept their last tokens",
            cut,
            len(texts),
            s.max_prompt_length,
        )
    return [ids for ids, _ in encoded], cut


def sample_texts(model, tokenizer, adapter, prompts: list[str], s: SamplingArgs, seed: int, desc: str | None = None):
    """Generate for every prompt, in batches; returns (texts, stats) with NFE and tokens/s."""
    model.eval()
    texts, nfe, seconds, tokens, truncated = [], 0, 0.0, 0, 0
    steps = s.steps_per_block or adapter.block_size
    starts = range(0, len(prompts), s.batch_size)
    for n, i in enumerate(tqdm(starts, desc=desc, disable=desc is None, leave=False)):
        chunk, cut = encode_prompts(tokenizer, prompts[i : i + s.batch_size], s, adapter)
        truncated += cut
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
    stats = {"nfe_per_batch": nfe / batches, "tokens_per_second": tokens / max(seconds, 1e-9), "seconds": seconds}
    return texts, {**stats, "prompts_truncated": truncated}


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
    """Accuracy (mean score) of the model on `rows`, with a 95% interval, sampler statistics and every
    item's id, prompt, response and score (so that two runs can be compared item by item)."""
    if not rows:
        raise ValueError(f"{task.name}: no prompts to evaluate")
    texts, stats = sample_texts(model, tokenizer, adapter, [r["prompt"] for r in rows], s, s.seed, desc)
    scores = score_batch(task, rows, texts)
    low, high = interval95(scores)
    return {
        "task": task.name,
        "n": len(rows),
        "accuracy": sum(scores) / len(scores),
        "ci95": [low, high],
        **stats,
        "samples": [
            {"id": r["id"], "prompt": r["prompt"], "response": t, "score": sc}
            for r, t, sc in zip(rows, texts, scores, strict=True)
        ],
    }


def _scores_by_id(report: dict, name: str) -> dict[str, float]:
    samples = report.get("samples") if isinstance(report, dict) else None
    if not isinstance(samples, list) or not samples or any("id" not in x for x in samples):
        raise ValueError(f"{name}: not a `dtrpo eval` report with every item's id (write it with dtrpo eval --output)")
    scores = {str(x["id"]): float(x["score"]) for x in samples}
    if len(scores) != len(samples):
        raise ValueError(f"{name}: item ids repeat; items cannot be paired")
    return scores


def compare(a: dict, b: dict, names: tuple[str, str] = ("a", "b")) -> dict:
    """Paired comparison of two eval reports on the same items: the mean of score(b) - score(a) over
    items, with a 95% normal interval (1.96 standard errors of the paired differences)."""
    sa, sb = _scores_by_id(a, names[0]), _scores_by_id(b, names[1])
    if sa.keys() != sb.keys():
        only_a, only_b = sorted(sa.keys() - sb.keys()), sorted(sb.keys() - sa.keys())
        raise ValueError(
            f"{names[0]} and {names[1]} hold different items: {len(only_a)} only in {names[0]} {only_a[:3]}, "
            f"{len(only_b)} only in {names[1]} {only_b[:3]}; evaluate both on the same prompts (--n, --seed, --split)"
        )
    diffs = [sb[k] - sa[k] for k in sa]
    n = len(diffs)
    mean = sum(diffs) / n
    half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else math.nan
    return {
        "n": n,
        "a": sum(sa.values()) / n,
        "b": sum(sb.values()) / n,
        "difference": mean,
        "ci95": [mean - half, mean + half],
        "b_better": sum(d > 0 for d in diffs),
        "a_better": sum(d < 0 for d in diffs),
    }
