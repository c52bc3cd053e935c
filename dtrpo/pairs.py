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
import random
from dataclasses import asdict
from pathlib import Path

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
    if samples < 2:
        raise ValueError(f"samples must be at least 2 to form pairs, got {samples}")
    if sampling.temperature <= 0 and sampling.remasking != "random":
        raise ValueError("pairs need diverse samples: set temperature > 0 (or remasking='random')")
    prompts = [r["prompt"] for r in rows for _ in range(samples)]
    texts, stats = sample_texts(model, tokenizer, adapter, prompts, sampling, sampling.seed, desc)
    scores = score_batch(task, [r for r in rows for _ in range(samples)], texts)
    rng = random.Random(sampling.seed)
    provenance = {
        "model": model_name,
        "task": task.name,
        "samples": samples,
        "pairing": pairing,
        "sampling": asdict(sampling),
    }
    out, usable, empty, items = [], 0, 0, []
    for i, row in enumerate(rows):
        scored = list(
            zip(texts[i * samples : (i + 1) * samples], scores[i * samples : (i + 1) * samples], strict=False)
        )
        items.append({"id": row["id"], "prompt": row["prompt"], "responses": [t for t, _ in scored]})
        items[-1]["scores"] = [sc for _, sc in scored]
        empty += sum(not t.strip() for t, _ in scored)
        scored = [(t, sc) for t, sc in scored if t.strip()]  # empty responses are refused as training data
        pairs = form_pairs(scored, pairing, max_pairs_per_prompt, rng)
        usable += bool(pairs)
        items[-1]["pairs"] = len(pairs)
        for c, r in pairs:
            out.append(
                {
                    "id": row["id"],
                    "prompt": row["prompt"],
                    "chosen": scored[c][0],
                    "rejected": scored[r][0],
                    "chosen_score": scored[c][1],
                    "rejected_score": scored[r][1],
                    "provenance": provenance,
                }
            )
    stats.update(
        {
            "prompts": len(rows),
            "prompts_with_pairs": usable,
            "pairs": len(out),
            "empty_responses_dropped": empty,
            "mean_score": sum(scores) / max(len(scores), 1),
        }
    )
    if keep_items:
        stats["items"] = items
    return out, stats


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
