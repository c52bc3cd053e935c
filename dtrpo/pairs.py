"""Preference pairs from a model's own generations and a verifier, a reward function or a reward model.

For each prompt, N responses are sampled (seeded), scored, and prompts that have both a better and a
worse response give pairs:
- `best_worst`: one pair, the best response against the worst;
- `all`: every ordered pair with a strictly higher score first;
a pair needs its chosen score above its rejected one by more than `min_score_gap` (0: any strict
difference); candidates within it (ties) are dropped and counted (`ties_dropped`: for `best_worst` a
prompt's best and worst, for `all` every two responses); then at most `max_pairs_per_prompt` pairs are
kept, chosen with the seed. Each row keeps the scores and the provenance (model, scorer, sampler settings,
seed), so a pair file says where it came from.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from dtrpo.evaluate import (
    SamplingArgs,
    chunked,
    clear_markers,
    items_paths,
    locked,
    made_by,
    merged_items,
    run_chunks,
    sample_texts,
    shard,
    wait_for,
)
from dtrpo.reward_model import reward_record
from dtrpo.tasks import score_batch

PAIRINGS = ("best_worst", "all")


@dataclass
class PairArgs:
    """How `dtrpo pairs` (and each round of `dtrpo iterate`) turns a prompt's scored samples into pairs."""

    samples: int = field(default=8, metadata={"help": "Responses sampled per prompt."})
    pairing: Literal["best_worst", "all"] = field(
        default="best_worst", metadata={"help": "How pairs are formed: best_worst or all."}
    )
    max_pairs_per_prompt: int | None = field(default=None, metadata={"help": "At most this many pairs per prompt."})
    min_score_gap: float = field(
        default=0.0,
        metadata={
            "help": "A pair's chosen score must exceed its rejected score by more than this (default 0: any strict "
            "difference); pairs within it are dropped and counted (ties_dropped)."
        },
    )

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_score_gap) and self.min_score_gap >= 0):
            raise ValueError(f"--min_score_gap must be a finite number >= 0, got {self.min_score_gap}")


def ties(scores: list[float], pairing: str, min_gap: float = 0.0) -> int:
    """The candidate pairs of one prompt dropped for scores within `min_gap` of each other: for best_worst its
    best and worst (0 or 1), for all every two responses (unordered)."""
    if len(scores) < 2:
        return 0
    if pairing == "best_worst":
        return int(max(scores) - min(scores) <= min_gap)
    return sum(abs(a - b) <= min_gap for i, a in enumerate(scores) for b in scores[i + 1 :])


def form_pairs(
    scored: list[tuple[str, float]], pairing: str, max_pairs: int | None, rng: random.Random, min_gap: float = 0.0
):
    """(chosen, rejected) index pairs of one prompt's scored responses, the chosen score above the rejected by
    more than `min_gap`."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    scores = [s for _, s in scored]
    if not scores:
        return []
    if pairing == "best_worst":
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        pairs = [(best, worst)] if scores[best] - scores[worst] > min_gap else []
    else:
        pairs = [(i, j) for i in range(len(scored)) for j in range(len(scored)) if scores[i] - scores[j] > min_gap]
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = rng.sample(pairs, max_pairs)
    return pairs


def chunk_size(samples: int, sampling: SamplingArgs) -> int:
    """Prompts per chunk: one sampler batch of `samples` responses each. Chunk k is sampled with seed + k, so
    every prompt's samples depend on its chunk only (a resumed or sharded run samples each chunk as a whole
    run does)."""
    return max(1, sampling.batch_size // samples)


def sample_chunk(model, tokenizer, adapter, task, rows, samples, sampling, chunk: int) -> tuple[list[dict], dict]:
    """Every prompt of one chunk with its `samples` responses and scores (items), and sampler statistics."""
    prompts = [r["prompt"] for r in rows for _ in range(samples)]
    # the chunk is one sampler batch, or (more samples than --batch_size) batches of --batch_size on seeds of
    # their own: chunk k's seeds follow chunk k-1's
    batches = -(-len(prompts) // sampling.batch_size)
    local = replace(sampling, batch_size=min(len(prompts), sampling.batch_size))
    texts, stats = sample_texts(model, tokenizer, adapter, prompts, local, sampling.seed + chunk * batches)
    scores = score_batch(task, [r for r in rows for _ in range(samples)], texts)
    items = [
        {
            "id": row["id"],
            "prompt": row["prompt"],
            "chunk": chunk,
            "responses": texts[i * samples : (i + 1) * samples],
            "scores": scores[i * samples : (i + 1) * samples],
        }
        for i, row in enumerate(rows)
    ]
    return items, stats


def item_pairs(
    item: dict, pairing: str, max_pairs: int | None, seed: int, provenance: dict, min_gap: float = 0.0
) -> list[dict]:
    """The pair rows of one prompt's scored responses (empty responses are never training data)."""
    scored = _nonempty(item)
    rng = random.Random(f"{seed}/{item['id']}")  # per prompt: the same pairs however the run was split
    return [
        {
            "id": item["id"],
            "prompt": item["prompt"],
            "chosen": scored[c][0],
            "rejected": scored[r][0],
            "chosen_score": scored[c][1],
            "rejected_score": scored[r][1],
            "provenance": provenance,
        }
        for c, r in form_pairs(scored, pairing, max_pairs, rng, min_gap)
    ]


def _nonempty(item: dict) -> list[tuple[str, float]]:
    return [(t, sc) for t, sc in zip(item["responses"], item["scores"], strict=True) if t.strip()]


def check_sampling(samples: int, sampling: SamplingArgs) -> None:
    if samples < 2:
        raise ValueError(f"samples must be at least 2 to form pairs, got {samples}")
    if sampling.temperature <= 0 and sampling.remasking != "random":
        raise ValueError("pairs need diverse samples: set temperature > 0 (or remasking='random')")


def _provenance(model_name, task, samples, pairing, sampling, min_gap: float = 0.0) -> dict:
    return {
        "model": model_name,
        "task": task.name,
        **reward_record(task),
        "samples": samples,
        "pairing": pairing,
        **({"min_score_gap": min_gap} if min_gap else {}),
        "sampling": asdict(sampling),
    }


@dataclass
class PairStats:
    """Counts of a pair-building run, added one prompt at a time (no list of items or pairs is needed)."""

    prompts: int = 0
    prompts_with_pairs: int = 0
    pairs: int = 0
    empty_responses_dropped: int = 0
    ties_dropped: int = 0
    score_total: float = 0.0
    scores: int = 0

    def add(self, item: dict, pairs: list[dict], ties: int = 0) -> None:
        self.prompts += 1
        self.ties_dropped += ties
        self.prompts_with_pairs += bool(pairs)
        self.pairs += len(pairs)
        self.empty_responses_dropped += sum(not t.strip() for t in item["responses"])
        self.score_total += sum(item["scores"])
        self.scores += len(item["scores"])

    def summary(self) -> dict:
        return {
            "prompts": self.prompts,
            "prompts_with_pairs": self.prompts_with_pairs,
            "pairs": self.pairs,
            "empty_responses_dropped": self.empty_responses_dropped,
            "ties_dropped": self.ties_dropped,
            "mean_score": self.score_total / max(self.scores, 1),
        }


def build_pairs(
    model,
    tokenizer,
    adapter,
    task,
    rows: Iterable[dict],
    samples: int,
    sampling: SamplingArgs,
    pairing: str = "best_worst",
    max_pairs_per_prompt: int | None = None,
    model_name: str = "",
    desc: str | None = None,
    keep_items: bool = False,
    min_score_gap: float = 0.0,
) -> tuple[list[dict], dict]:
    """Sample `samples` responses per prompt, score them, and return (pair rows, statistics), in memory. With
    `keep_items`, the statistics also hold `items`: every prompt's id, responses and scores, pairs or not.
    For many prompts, `run_pairs` writes pairs to a file with bounded memory."""
    check_sampling(samples, sampling)
    provenance = _provenance(model_name, task, samples, pairing, sampling, min_score_gap)
    pairs, items, counts = [], [], PairStats()
    nfe, seconds, tokens, batches = 0.0, 0.0, 0.0, 0
    chunks = chunked(rows, chunk_size(samples, sampling))
    for k, chunk in tqdm(chunks, desc=desc, disable=desc is None, leave=False):
        got, stats = sample_chunk(model, tokenizer, adapter, task, chunk, samples, sampling, k)
        nfe, seconds, tokens, batches = (
            nfe + stats["nfe_per_batch"],
            seconds + stats["seconds"],
            tokens + stats["tokens"],
            batches + 1,
        )
        for item in got:
            mine = item_pairs(item, pairing, max_pairs_per_prompt, sampling.seed, provenance, min_score_gap)
            counts.add(item, mine, ties([sc for _, sc in _nonempty(item)], pairing, min_score_gap))
            pairs += mine
            if keep_items:
                items.append({**item, "pairs": len(mine)})
    stats = {
        **counts.summary(),
        "nfe_per_batch": nfe / max(batches, 1),
        "tokens_per_second": tokens / max(seconds, 1e-9),
        "seconds": seconds,
    }
    if keep_items:
        stats["items"] = items
    return pairs, stats


def run_pairs(
    model, tokenizer, adapter, task, rows, options: PairArgs, sampling, *, model_name: str, output, desc=None
) -> dict:
    """`build_pairs` to files, resumable and sharded, with memory bounded by one chunk whatever the number of
    prompts (`rows` may be a stream, such as `FileTask.stream`). Every chunk's items are appended to
    `<output>.samples[.rankR].jsonl` as soon as they are scored; a rerun with the same output finds the
    chunks done by reading that file a line at a time, cuts off a chunk left incomplete by a kill, and
    samples only the chunks not yet done (so no prompt is done twice or lost, and the samples equal an
    uninterrupted run's). Under `torchrun` (RANK, WORLD_SIZE) rank r does chunks r, r + W, ...; rank 0
    waits for the others' files, merges them in chunk order (prompt order) and writes each prompt's pairs as
    it reads them. Returns the statistics on rank 0, an empty dict on the others."""
    samples, pairing = options.samples, options.pairing
    check_sampling(samples, sampling)
    output = Path(output)
    rank, world = shard()
    paths = items_paths(output, "samples", world)
    made = made_by(model, task, sampling, samples=samples)

    def work(k: int, chunk: list[dict]) -> list[dict]:
        items, stats = sample_chunk(model, tokenizer, adapter, task, chunk, samples, sampling, k)
        # the chunk's sampler cost rides on its first item, as eval's items carry theirs
        items[0]["batch"] = {"nfe": stats["nfe_per_batch"], "sequences": len(chunk) * samples}
        return items

    with locked(paths, output):
        run_chunks(rows, chunk_size(samples, sampling), paths, work, desc, made)
        if rank != 0:
            return {}
        provenance = {
            **_provenance(model_name, task, samples, pairing, sampling, options.min_score_gap),
            "model_weights": made["model_weights"],
        }
        return write_pairs(
            paths, output, pairing, options.max_pairs_per_prompt, sampling.seed, provenance, options.min_score_gap
        )


def write_pairs(
    paths: list[Path], output: Path, pairing, max_pairs_per_prompt, seed: int, provenance: dict, min_gap: float = 0.0
) -> dict:
    """Rank 0's part of `run_pairs`: every rank's samples merged in prompt order, paired, written to `output`."""
    wait_for(paths)
    counts, nfe, passes = PairStats(), [], 0
    tmp = output.with_name(f".{output.name}.tmp")
    with tmp.open("w") as f:
        for item in merged_items(paths):
            pairs = item_pairs(item, pairing, max_pairs_per_prompt, seed, provenance, min_gap)
            counts.add(item, pairs, ties([sc for _, sc in _nonempty(item)], pairing, min_gap))
            f.write("".join(json.dumps(p) + "\n" for p in pairs))
            if "batch" in item:  # a sampler step over a batch of k sequences is k sequence forward passes
                nfe.append(item["batch"]["nfe"])
                passes += round(item["batch"]["nfe"]) * item["batch"]["sequences"]
    os.replace(tmp, output)
    clear_markers(paths)
    generation = {"nfe_per_batch": sum(nfe) / max(len(nfe), 1), "generation_passes": passes}
    return {**counts.summary(), **generation, "items_file": [str(p) for p in paths]}


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
