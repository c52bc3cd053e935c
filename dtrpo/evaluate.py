"""Evaluation: accuracy on held-out prompts with a 95% interval, NFE and tokens per second."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from dtrpo.data import encode_text, keep_prompt_end, render_chat
from dtrpo.locks import hold
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
    # the decoding settings below default to the model family's own rule (dtrpo.decoding; README's family table)
    steps_per_block: int | None = field(
        default=None, metadata={"help": "Denoising steps per block; default: the family's (every family: B)."}
    )
    remasking: Literal["low_confidence", "random", "margin", "entropy"] | None = field(
        default=None,
        metadata={"help": f"Which positions a step reveals: {REMASKING}; default: the family's (Dream: entropy)."},
    )
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "Reveal every position above this confidence; default: the family's (Fast-dLLM v2 0.9, SDAR "
            "0.85, others none); 0: none."
        },
    )
    sub_block_size: int | None = field(
        default=None,
        metadata={
            "help": "Decode each block in sub-blocks of this size left to right (needs a threshold); default: the "
            "family's (Fast-dLLM v2: 8); 0: none."
        },
    )
    fix_first_token: bool | None = field(
        default=None,
        metadata={
            "help": "Fix a block's first token before its first forward (shifted models); default: the family's "
            "(Fast-dLLM v2: true)."
        },
    )
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    cache: Literal["auto", "none", "prefix", "dual"] = field(
        default="auto",
        metadata={
            "help": "auto: the exact fast path (KV cache for block-causal models, recompute for full attention); "
            "none: recompute every step; prefix / dual: Fast-dLLM's caches for full-attention models, APPROXIMATE "
            "(K/V kept from a block's first step: prefix for the prompt and finished blocks, dual also the suffix)."
        },
    )
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
        for name in ("temperature", "threshold"):  # NaN or inf would sample garbage without an error
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name} must be a finite number, got {value}")


def encode_prompt(
    tokenizer, text: str, chat: bool, max_prompt_length: int | None = None, grid: int | None = None
) -> tuple[list[int], bool]:
    """Token ids of a prompt (in the chat template when `chat`), cut as training cuts it (its last tokens;
    a multiple of `grid` dropped on an absolute block grid), and whether it was cut."""
    if chat:  # the template's special tokens stay special; the prompt's own text never makes one
        text = render_chat(tokenizer, [{"role": "user", "content": text}])
    return keep_prompt_end(encode_text(tokenizer, [text])[0], max_prompt_length, grid)


def encode_prompts(
    tokenizer, texts: list[str], s: SamplingArgs, adapter=None, model=None
) -> tuple[list[list[int]], int]:
    """Token ids of each prompt under `s` (on `adapter`'s block grid), and how many were truncated (logged).
    With `model`, a prompt that `s.gen_length` would carry past the model's positions is refused."""
    grid = adapter.block_size if adapter is not None and adapter.absolute_grid else None
    encoded = [encode_prompt(tokenizer, t, s.chat_template, s.max_prompt_length, grid) for t in texts]
    if model is not None:
        longest = max(range(len(encoded)), key=lambda i: len(encoded[i][0]), default=None)
        if longest is not None:
            check_positions(model, len(encoded[longest][0]), s.gen_length, adapter, texts[longest])
    cut = sum(c for _, c in encoded)
    if cut:
        logger.warning(
            "%d of %d prompts were longer than max_prompt_length=%d tokens: kept their last tokens",
            cut,
            len(texts),
            s.max_prompt_length,
        )
    return [ids for ids, _ in encoded], cut


def check_positions(model, prompt_length: int, gen_length: int, adapter=None, prompt: str | None = None) -> None:
    """Refuse a prompt plus `gen_length` (rounded up to whole blocks) longer than the model's
    `max_position_embeddings`: positions it was never trained on, and a canvas that costs minutes per prompt.
    A prompt that leaves no room for one block is named, with the --max_prompt_length that makes room."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    block = adapter.block_size if adapter is not None else 1
    response = -(-gen_length // block) * block
    needed = prompt_length + response
    if isinstance(limit, int) and needed > limit:
        most = max(0, (limit - prompt_length) // block * block)
        if most == 0 and limit > response:
            shown = f"the prompt {prompt[:60]!r}{'...' if len(prompt) > 60 else ''}" if prompt else "a prompt"
            raise ValueError(
                f"{shown} is {prompt_length} tokens, which leaves no room for --gen_length {gen_length} within the "
                f"model's max_position_embeddings={limit}: pass --max_prompt_length {limit - response} or less "
                "(prompts keep their last tokens)"
            )
        raise ValueError(
            f"--gen_length {gen_length} after a prompt of {prompt_length} tokens needs {needed} positions, over the "
            f"model's max_position_embeddings={limit}: use --gen_length {most} or less"
        )


def sample_texts(model, tokenizer, adapter, prompts: list[str], s: SamplingArgs, seed: int, desc: str | None = None):
    """Generate for every prompt, in batches, decoding settings not given in `s` by the family's rule (they are
    resolved here if the caller has not); returns (texts, stats) with NFE and tokens/s."""
    from dtrpo.decoding import resolve, sampler_kwargs

    s = resolve(s, adapter.family)
    model.eval()
    texts, nfe, seconds, tokens, truncated = [], 0, 0.0, 0, 0
    steps = s.steps_per_block or adapter.block_size
    starts = range(0, len(prompts), s.batch_size)
    for n, i in enumerate(tqdm(starts, desc=desc, disable=desc is None, leave=False)):
        chunk, cut = encode_prompts(tokenizer, prompts[i : i + s.batch_size], s, adapter, model)
        truncated += cut
        out = generate(
            adapter,
            model,
            chunk,
            s.gen_length,
            steps,
            temperature=s.temperature,
            seed=seed + n,
            eos_token_id=tokenizer.eos_token_id,
            cache=s.cache,
            **sampler_kwargs(s),
        )
        texts += [tokenizer.decode(seq, skip_special_tokens=True) for seq in out.sequences]
        nfe, seconds, tokens = nfe + out.nfe, seconds + out.seconds, tokens + sum(out.lengths)
    batches = max(len(starts), 1)
    stats = {"nfe_per_batch": nfe / batches, "tokens_per_second": tokens / max(seconds, 1e-9), "seconds": seconds}
    return texts, {**stats, "prompts_truncated": truncated, "tokens": tokens}


@dataclass
class Moments:
    """Count, sum and squared deviations of scores, added one at a time (Welford), so that accuracy and its
    interval over any number of items need no list of scores."""

    n: int = 0
    total: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the running mean
    binary: bool = True  # every score 0 or 1

    @classmethod
    def of(cls, scores: Iterable[float]) -> Moments:
        moments = cls()
        for score in scores:
            moments.add(score)
        return moments

    def add(self, score: float) -> None:
        before = self.total / self.n if self.n else 0.0
        self.n, self.total = self.n + 1, self.total + score
        self.m2 += (score - before) * (score - self.total / self.n)
        self.binary = self.binary and score in (0.0, 1.0)

    def interval95(self) -> tuple[float, float]:
        """Wilson score interval for 0/1 scores, the normal interval of the mean otherwise."""
        n = self.n
        if n == 0:
            return (math.nan, math.nan)
        mean, z = self.total / n, 1.96
        if self.binary:
            centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
            half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
            return (max(0.0, centre - half), min(1.0, centre + half))
        sd = math.sqrt(self.m2 / max(n - 1, 1))
        return (mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n))


def interval95(scores: list[float]) -> tuple[float, float]:
    """Wilson score interval for 0/1 scores, the normal interval of the mean otherwise."""
    return Moments.of(scores).interval95()


def _report(task, moments: Moments, sampler: dict) -> dict:
    """The report's numbers (all but its items) from the scores' moments and summed sampler statistics."""
    low, high = moments.interval95()
    return {
        "task": task.name,
        "n": moments.n,
        "accuracy": moments.total / moments.n,
        "ci95": [low, high],
        "nfe_per_batch": sampler["nfe"] / max(sampler["batches"], 1),
        "tokens_per_second": sampler["tokens"] / max(sampler["seconds"], 1e-9),
        "seconds": sampler["seconds"],
        "prompts_truncated": sampler["prompts_truncated"],
    }


def evaluate(model, tokenizer, adapter, task, rows: list[dict], s: SamplingArgs, desc: str | None = None) -> dict:
    """Accuracy (mean score) of the model on `rows`, with a 95% interval, sampler statistics and every
    item's id, prompt, response and score (so that two runs can be compared item by item)."""
    if not rows:
        raise ValueError(f"{task.name}: no prompts to evaluate")
    texts, stats = sample_texts(model, tokenizer, adapter, [r["prompt"] for r in rows], s, s.seed, desc)
    scores = score_batch(task, rows, texts)
    moments = Moments.of(scores)
    batches = math.ceil(len(rows) / s.batch_size)
    sampler = {**stats, "nfe": stats["nfe_per_batch"] * batches, "batches": batches}
    return {
        **_report(task, moments, sampler),
        "samples": [
            {"id": r["id"], "prompt": r["prompt"], "response": t, "score": sc}
            for r, t, sc in zip(rows, texts, scores, strict=True)
        ],
    }


def _scores_by_id(report: dict, name: str) -> tuple[dict[str, float], dict[str, str]]:
    """({id: score}, {id: prompt}) of a report's items."""
    samples = report.get("samples") if isinstance(report, dict) else None
    if not isinstance(samples, list) or not samples or any(not isinstance(x, dict) or "id" not in x for x in samples):
        raise ValueError(f"{name}: not a `dtrpo eval` report with every item's id (write it with dtrpo eval --output)")
    if any("prompt" not in x for x in samples):
        raise ValueError(f"{name}: an item has no prompt, so the prompts of two reports cannot be checked to match")
    scores = {str(x["id"]): float(x["score"]) for x in samples}
    if len(scores) != len(samples):
        raise ValueError(f"{name}: item ids repeat; items cannot be paired")
    return scores, {str(x["id"]): x["prompt"] for x in samples}


def compare(a: dict, b: dict, names: tuple[str, str] = ("a", "b")) -> dict:
    """Paired comparison of two eval reports on the same items (the same ids with the same prompt texts):
    the mean of score(b) - score(a) over items, with a 95% normal interval (1.96 standard errors of the
    paired differences)."""
    (sa, pa), (sb, pb) = _scores_by_id(a, names[0]), _scores_by_id(b, names[1])
    differ = [k for k in sa if k in pb and pa[k] != pb[k]]
    if differ:
        k = differ[0]
        raise ValueError(
            f"{names[0]} and {names[1]} were made on different prompts: {len(differ)} items differ, such as id "
            f"{k!r} ({pa[k][:40]!r} vs {pb[k][:40]!r}); evaluate both on the same prompts file"
        )
    if sa.keys() != sb.keys():
        only_a, only_b = sorted(sa.keys() - sb.keys()), sorted(sb.keys() - sa.keys())
        raise ValueError(
            f"{names[0]} and {names[1]} hold different items: {len(only_a)} only in {names[0]} {only_a[:3]}, "
            f"{len(only_b)} only in {names[1]} {only_b[:3]}; evaluate both on the same prompts (--n, --seed, --split)"
        )
    diffs = [sb[k] - sa[k] for k in sa]
    n = len(diffs)
    if not n:
        raise ValueError(f"{names[0]} and {names[1]} hold no items to compare")
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


# ---------------------------------------------------------------------------------------------------
# Runs at scale: prompts streamed in chunks, each chunk's items appended to a file; resumable and sharded


def shard() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun; (0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def chunked(rows: Iterable[dict], size: int) -> Iterator[tuple[int, list[dict]]]:
    """(k, chunk k): consecutive runs of `size` rows pulled lazily, so one chunk of rows is alive at a time.
    Chunk k holds the same prompts however the rows arrive (a list or a file read line by line)."""
    rows = iter(rows)
    for k in itertools.count():
        chunk = list(itertools.islice(rows, size))
        if not chunk:
            return
        yield k, chunk


def items_paths(output: Path, kind: str, world: int) -> list[Path]:
    """Every rank's items file: `<output>.<kind>.jsonl` alone, `<output>.<kind>.rank<R>.jsonl` under torchrun."""
    return [output.with_suffix(f".{kind}.jsonl" if world == 1 else f".{kind}.rank{r}.jsonl") for r in range(world)]


def made_by(model, task, s: SamplingArgs, **extra) -> dict:
    """What the scores of an items file depend on: the model's weights (`reference.weights_fingerprint`),
    the task and its scorer (a reward model by its weights' fingerprint), the sampler settings, and `extra`
    (such as the samples per prompt). Stamped on the first item of every chunk, so that a rerun into the same
    output with any of it changed is refused."""
    from dtrpo.reference import weights_fingerprint
    from dtrpo.reward_model import reward_record

    scorer = {key: getattr(task, key, None) for key in ("reward_name", "match", "prompt_field", "content")}
    scorer |= {k: v for k, v in reward_record(task).items() if k == "reward_model_weights"}  # the weights, not where
    path = getattr(task, "path", None)  # a prompts file: the same file however its path is written
    name = str(Path(path).resolve()) if path is not None else task.name
    return {"model_weights": weights_fingerprint(model), "task": name, **scorer, **extra, **asdict(s)}


def _short(value) -> str:
    return repr(value[:12] + "...") if isinstance(value, str) and len(value) > 40 else repr(value)


def _differences(then: dict, now: dict) -> str:
    keys = sorted(then.keys() | now.keys())
    return ", ".join(f"{k}: {_short(then.get(k))} -> {_short(now.get(k))}" for k in keys if then.get(k) != now.get(k))


def _entry(item: dict) -> bytes:
    """What the digest of a chunk reads of an item or a prompt row: its id and its prompt text."""
    return f"{item['id']}\n{item.get('prompt')}\n".encode()


def _digest(rows: Iterable[dict]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for row in rows:
        h.update(_entry(row))
    return h.hexdigest()


@dataclass
class ChunkRecord:
    """One chunk as an items file holds it: its id, how many items, a digest of their ids and prompts, where
    it starts, and what made it (the `made_by` of its first item; None in files made before it was kept)."""

    chunk: int
    start: int  # byte offset of its first line
    made_by: dict | None = None
    count: int = 0
    ids: object = field(default_factory=lambda: hashlib.blake2b(digest_size=8))

    def add(self, item: dict) -> None:
        self.count += 1
        self.ids.update(_entry(item))


def scan_items(path: Path) -> tuple[list[ChunkRecord], int]:
    """The chunks of an items file in file order, read a line at a time (items are not kept), and the byte
    length of its whole lines: a last line cut by a kill (bad JSON, or no newline yet) is not counted."""
    records, end, torn = [], 0, None
    if not path.is_file():
        return records, end
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if torn is not None:
                raise ValueError(f"{path}: line {torn}: not a whole JSON line, and lines follow it; delete the file")
            try:
                item = json.loads(line) if line.endswith(b"\n") else None
            except json.JSONDecodeError:
                item = None
            if item is None:
                torn = number
                continue
            if not records or records[-1].chunk != item["chunk"]:
                if records and item["chunk"] < records[-1].chunk:
                    raise ValueError(f"{path}: line {number}: chunk {item['chunk']} after chunk {records[-1].chunk}")
                records.append(ChunkRecord(item["chunk"], end, item.get("made_by")))
            records[-1].add(item)
            end += len(line)
    return records, end


def resume(
    path: Path, mine: Iterator[tuple[int, list[dict]]], made: dict | None = None
) -> Iterator[tuple[int, list[dict]]]:
    """The chunks of `mine` not yet in the items file at `path`. The file must hold a prefix of `mine` (a
    run appends its chunks in order); the chunk a kill cut short, always the last, and a torn last line
    are cut off the file. A chunk made by another model, task or sampler settings than `made` (`made_by`),
    or that holds other prompts than `mine` gives (the prompts file, --n, --seed, --batch_size or
    WORLD_SIZE changed) is an error naming what changed, not a silent mixture."""
    records, end = scan_items(path)
    pending = []
    for i, rec in enumerate(records):
        if made is not None and rec.made_by and "content" in rec.made_by and rec.made_by["content"] != made["content"]:
            raise ValueError(
                f"{path}: chunk {rec.chunk} was made from another version of the prompts file --task {made['task']} "
                f"(its content changed since: {_short(rec.made_by['content'])} -> {_short(made['content'])}), so its "
                "prompts or answers may differ; restore the file, or delete the items file or write to another --output"
            )
        if made is not None and rec.made_by != made:
            what = _differences(rec.made_by, made) if rec.made_by else "it does not record what made it (older file)"
            raise ValueError(
                f"{path}: chunk {rec.chunk} was made by another run ({what}); delete the file or write to another "
                "--output"
            )
        k, rows = next(mine, (None, []))
        if rec.chunk != k or rec.count > len(rows) or rec.ids.hexdigest() != _digest(rows[: rec.count]):
            raise ValueError(
                f"{path}: chunk {rec.chunk} (from byte {rec.start}) does not hold the prompts this run gives it "
                f"(expected chunk {k} of {len(rows)} prompts); was the prompts file, --n, --seed, --batch_size or "
                "the number of processes changed? Delete the file or write to another --output"
            )
        if rec.count < len(rows) and i < len(records) - 1:
            raise ValueError(f"{path}: chunk {k} holds {rec.count} of its {len(rows)} prompts, yet chunks follow it")
        if rec.count < len(rows):  # cut short by a kill: sampled again
            end, pending = rec.start, [(k, rows)]
    if path.is_file() and path.stat().st_size != end:
        os.truncate(path, end)  # keeps a prefix of the file: no copy, whatever its size
        logger.warning("%s: dropped an incomplete chunk or a torn line left by an interrupted run", path)
    if records:
        logger.warning("resuming: %d chunks already done in %s", len(records) - len(pending), path)
    return itertools.chain(pending, mine)


def locked(paths: list[Path], output: Path):
    """This rank's lock of its items file (`locks.hold`): a second run into the same --output is refused."""
    return hold(Path(f"{paths[shard()[0]]}.lock"), f"--output {output}")


def run_chunks(
    rows: Iterable[dict],
    size: int,
    paths: list[Path],
    work: Callable[[int, list[dict]], list[dict]],
    desc=None,
    made: dict | None = None,
) -> None:
    """`work(k, chunk k)` for this rank's chunks (rank r of W does k = r, r + W, ...) that the rank's items
    file does not hold yet, each chunk's items appended (the first stamped with `made`) and synced as soon
    as they are made, so a kill loses at most the chunk in progress. A `.done` marker says the rank's file
    is complete."""
    rank, world = shard()
    path, done = paths[rank], Path(f"{paths[rank]}.done")
    done.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    todo = resume(path, ((k, c) for k, c in chunked(rows, size) if k % world == rank), made)
    with path.open("a") as f:
        for k, chunk in tqdm(todo, desc=desc, disable=desc is None, leave=False):
            items = work(k, chunk)
            if made is not None:
                items[0]["made_by"] = made
            f.write("".join(json.dumps(it) + "\n" for it in items))
            f.flush()
            os.fsync(f.fileno())
    done.touch()


def wait_for(paths: list[Path], poll: float = 0.5) -> None:
    """Until every rank's items file is complete (its `.done` marker): the ranks share no process group,
    only the output folder, so this works across nodes on a shared file system too."""
    markers = [Path(f"{p}.done") for p in paths]
    while not all(m.exists() for m in markers):
        time.sleep(poll)


def clear_markers(paths: list[Path]) -> None:
    for p in paths:
        Path(f"{p}.done").unlink(missing_ok=True)


def _read_jsonl(path: Path) -> Iterator[dict]:
    with path.open() as f:
        for line in f:
            yield json.loads(line)


def merged_items(paths: list[Path]) -> Iterator[dict]:
    """Every rank's items in global chunk order, one line per file in memory. Chunk k lives in file k % W and
    each file holds its chunks in increasing order (a resumed run appends after a prefix), so taking one
    chunk from each file in turn gives chunks 0, 1, 2, ... with no sort."""
    files = [itertools.groupby(_read_jsonl(p), key=lambda it: it["chunk"]) for p in paths]
    for k in itertools.count():
        chunk, items = next(files[k % len(files)], (None, None))
        if chunk is None:
            break
        if chunk != k:
            raise ValueError(f"{paths[k % len(files)]}: holds chunk {chunk} where chunk {k} belongs")
        yield from items
    for path, rest in zip(paths, files, strict=True):
        if (left := next(rest, None)) is not None:
            raise ValueError(f"{path}: holds chunk {left[0]} after the last whole run of chunks (chunk {k} missing)")


def eval_chunk(model, tokenizer, adapter, task, rows: list[dict], s: SamplingArgs, chunk: int) -> list[dict]:
    """The items of one chunk (one sampler batch, seeded `seed + chunk` as `evaluate` seeds its batches); the
    first carries the batch's sampler statistics."""
    texts, stats = sample_texts(model, tokenizer, adapter, [r["prompt"] for r in rows], s, s.seed + chunk)
    scores = score_batch(task, rows, texts)
    batch = {key: stats[key] for key in ("seconds", "tokens", "prompts_truncated")} | {"nfe": stats["nfe_per_batch"]}
    items = [
        {"id": r["id"], "prompt": r["prompt"], "response": t, "score": sc, "chunk": chunk}
        for r, t, sc in zip(rows, texts, scores, strict=True)
    ]
    items[0]["batch"] = batch
    return items


def _sample(item: dict) -> dict:
    return {key: item[key] for key in ("id", "prompt", "response", "score")}


def run_eval(model, tokenizer, adapter, task, rows: Iterable[dict], s: SamplingArgs, output, desc=None) -> dict:
    """`evaluate` over a stream of prompts, written to `output`: resumable and sharded as `run_chunks` says,
    with items in `<output>.items[.rankR].jsonl`. Chunk k is `evaluate`'s batch k with its seed, so the
    report equals `evaluate`'s however the run was split or interrupted. Rank 0 computes the report from the
    merged items, streaming, writes it (items last) and removes the items files, so that a later run with
    the same output starts afresh; it returns the report without its items, other ranks an empty dict."""
    output = Path(output)
    rank, world = shard()
    paths = items_paths(output, "items", world)
    made = made_by(model, task, s)
    with locked(paths, output):
        work = lambda k, c: eval_chunk(model, tokenizer, adapter, task, c, s, k)
        run_chunks(rows, s.batch_size, paths, work, desc, made)
        return _eval_report(task, paths, output, made) if rank == 0 else {}


def _eval_report(task, paths: list[Path], output: Path, made: dict) -> dict:
    """Rank 0's part of `run_eval`: the report from every rank's items, written to `output`."""
    wait_for(paths)
    moments, sampler = Moments(), dict.fromkeys(("nfe", "batches", "seconds", "tokens", "prompts_truncated"), 0)
    for item in merged_items(paths):
        moments.add(item["score"])
        for key, value in item.get("batch", {}).items():
            sampler[key] += value
        sampler["batches"] += "batch" in item
    if not moments.n:
        raise ValueError(f"{task.name}: no prompts to evaluate")
    report = {**_report(task, moments, sampler), "made_by": made}
    write_report(output, report, (_sample(it) for it in merged_items(paths)))
    for p in paths:
        p.unlink()
    clear_markers(paths)
    return report


def write_report(path: Path, report: dict, samples: Iterable[dict]) -> None:
    """`report` as JSON with `samples` as its last key, written item by item to a temporary file that then
    replaces `path` (never a half-written report); reads as `json.dumps({**report, "samples": [...]})`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2)[:-2] + ',\n  "samples": [')
        for i, sample in enumerate(samples):
            f.write(("," if i else "") + "\n    " + json.dumps(sample))
        f.write("\n  ]\n}\n")
    os.replace(tmp, path)
