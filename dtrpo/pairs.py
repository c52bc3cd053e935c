"""Preference pairs from a model's own generations and a verifier (or reward function).

For each prompt, N responses are sampled (seeded), scored, and prompts that have both a better and a
worse response give pairs:
- `best_worst`: one pair, the best response against the worst;
- `all`: every ordered pair with a strictly higher score first;
then at most `max_pairs_per_prompt` of them, chosen with the seed. Each row keeps the scores and the
provenance (model, sampler settings, seed), so a pair file says where it came from.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

from dtrpo.evaluate import SamplingArgs, sample_texts
from dtrpo.tasks import score_batch

PAIRINGS = ("best_worst", "all")


def form_pairs(scored: list[tuple[str, float]], pairing: str, max_pairs: int | None, rng: random.Random):
    """(chosen, rejected) index pairs of one prompt's scored responses."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    scores = [s for _, s in scored]
    if not scores:
        return []
    if pairing == "best_worst":
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        pairs = [(best, worst)] if scores[best] > scores[worst] else []
    else:
        pairs = [(i, j) for i in range(len(scored)) for j in range(len(scored)) if scores[i] > scores[j]]
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = rng.sample(pairs, max_pairs)
    return pairs


def _chunks(rows: list[dict], samples: int, sampling: SamplingArgs) -> list[list[dict]]:
    """Prompts in chunks of one sampler batch each; chunk k is sampled with seed + k, so every prompt's
    samples depend on its chunk only (a resumed or sharded run samples each chunk as a whole run does)."""
    size = max(1, sampling.batch_size // samples)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def sample_chunk(model, tokenizer, adapter, task, rows, samples, sampling, chunk: int) -> tuple[list[dict], dict]:
    """Every prompt of one chunk with its `samples` responses and scores (items), and sampler statistics."""
    prompts = [r["prompt"] for r in rows for _ in range(samples)]
    local = replace(sampling, batch_size=len(prompts))  # the chunk is one sampler batch
    texts, stats = sample_texts(model, tokenizer, adapter, prompts, local, sampling.seed + chunk)
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


def item_pairs(item: dict, pairing: str, max_pairs: int | None, seed: int, provenance: dict) -> list[dict]:
    """The pair rows of one prompt's scored responses (empty responses are never training data)."""
    scored = [(t, sc) for t, sc in zip(item["responses"], item["scores"], strict=True) if t.strip()]
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
        for c, r in form_pairs(scored, pairing, max_pairs, rng)
    ]


def _check(samples: int, sampling: SamplingArgs) -> None:
    if samples < 2:
        raise ValueError(f"samples must be at least 2 to form pairs, got {samples}")
    if sampling.temperature <= 0 and sampling.remasking != "random":
        raise ValueError("pairs need diverse samples: set temperature > 0 (or remasking='random')")


def _provenance(model_name, task, samples, pairing, sampling) -> dict:
    return {
        "model": model_name,
        "task": task.name,
        "samples": samples,
        "pairing": pairing,
        "sampling": asdict(sampling),
    }


def summarize(items: list[dict], pairs: list[dict]) -> dict:
    scores = [sc for it in items for sc in it["scores"]]
    return {
        "prompts": len(items),
        "prompts_with_pairs": len({p["id"] for p in pairs}),
        "pairs": len(pairs),
        "empty_responses_dropped": sum(not t.strip() for it in items for t in it["responses"]),
        "mean_score": sum(scores) / max(len(scores), 1),
    }


def build_pairs(
    model,
    tokenizer,
    adapter,
    task,
    rows: list[dict],
    samples: int,
    sampling: SamplingArgs,
    pairing: str = "best_worst",
    max_pairs_per_prompt: int | None = None,
    model_name: str = "",
    desc: str | None = None,
    keep_items: bool = False,
) -> tuple[list[dict], dict]:
    """Sample `samples` responses per prompt, score them, and return (pair rows, statistics). With
    `keep_items`, the statistics also hold `items`: every prompt's id, responses and scores, pairs or not."""
    _check(samples, sampling)
    provenance = _provenance(model_name, task, samples, pairing, sampling)
    items, nfe, seconds, tokens = [], 0.0, 0.0, 0.0
    chunks = _chunks(rows, samples, sampling)
    for k, chunk in enumerate(tqdm(chunks, desc=desc, disable=desc is None, leave=False)):
        got, stats = sample_chunk(model, tokenizer, adapter, task, chunk, samples, sampling, k)
        items += got
        nfe, seconds = nfe + stats["nfe_per_batch"], seconds + stats["seconds"]
        tokens += stats["tokens_per_second"] * stats["seconds"]
    pairs = [p for it in items for p in item_pairs(it, pairing, max_pairs_per_prompt, sampling.seed, provenance)]
    stats = {
        **summarize(items, pairs),
        "nfe_per_batch": nfe / max(len(chunks), 1),
        "tokens_per_second": tokens / max(seconds, 1e-9),
        "seconds": seconds,
    }
    for it in items:
        it["pairs"] = sum(p["id"] == it["id"] for p in pairs)
    if keep_items:
        stats["items"] = items
    return pairs, stats


def run_pairs(
    model, tokenizer, adapter, task, rows, samples, sampling, pairing, max_pairs_per_prompt, model_name, output, desc
) -> dict:
    """`build_pairs` to files, resumable and sharded. Every chunk's items are appended to
    `<output>.samples[.rankR].jsonl` as soon as they are scored; a rerun with the same output reads what
    is there, drops a chunk left incomplete by a kill, and samples only the chunks not yet done (so no
    prompt is done twice or lost, and the samples equal an uninterrupted run's). Under `torchrun`
    (RANK, WORLD_SIZE) rank r does chunks r, r + W, ...; rank 0 waits for the others' files and writes
    the pairs. The pairs file is written last, from the items, in prompt order."""
    _check(samples, sampling)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    output = Path(output)
    items_path = _items_path(output, rank, world)
    chunks = _chunks(rows, samples, sampling)
    done = _complete_chunks(items_path, chunks)
    todo = [k for k in range(len(chunks)) if k % world == rank and k not in done]
    if done:
        print(f"resuming: {len(done)} chunks of prompts already sampled in {items_path}", file=sys.stderr)
    with items_path.open("a") as f:
        for k in tqdm(todo, desc=desc, disable=desc is None, leave=False):
            got, _ = sample_chunk(model, tokenizer, adapter, task, chunks[k], samples, sampling, k)
            f.write("".join(json.dumps(it) + "\n" for it in got))
            f.flush()
            os.fsync(f.fileno())
    Path(f"{items_path}.done").touch()
    if rank != 0:
        return {}
    paths = [_items_path(output, r, world) for r in range(world)]
    while not all(Path(f"{p}.done").exists() for p in paths):  # the other ranks' shards
        time.sleep(1)
    order = {row["id"]: i for i, row in enumerate(rows)}
    items = sorted((it for p in paths for it in _read_items(p)), key=lambda it: order.get(it["id"], len(order)))
    provenance = _provenance(model_name, task, samples, pairing, sampling)
    pairs = [p for it in items for p in item_pairs(it, pairing, max_pairs_per_prompt, sampling.seed, provenance)]
    write_jsonl(pairs, output)
    for p in paths:
        Path(f"{p}.done").unlink(missing_ok=True)
    return {**summarize(items, pairs), "items_file": [str(p) for p in paths]}


def _items_path(output: Path, rank: int, world: int) -> Path:
    return output.with_suffix(".samples.jsonl" if world == 1 else f".samples.rank{rank}.jsonl")


def _read_items(path: Path) -> list[dict]:
    """The items of a file; a last line cut by a kill is dropped."""
    items = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return items


def _complete_chunks(path: Path, chunks: list[list[dict]]) -> set[int]:
    """Chunks whose every prompt is in the items file; the file is rewritten without incomplete ones."""
    items = _read_items(path)
    have: dict[int, set] = {}
    for it in items:
        have.setdefault(it["chunk"], set()).add(it["id"])
    done = {k for k, ids in have.items() if k < len(chunks) and ids == {r["id"] for r in chunks[k]}}
    keep = [it for it in items if it["chunk"] in done]
    lines = path.read_text().splitlines() if path.is_file() else []
    if len(keep) != len(lines):  # an incomplete chunk or a line cut by a kill: rewrite without them
        write_jsonl(keep, path)
    return done


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
