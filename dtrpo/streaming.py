"""`--streaming`: training data read once, lazily, as a `datasets.IterableDataset`, tokenized on the fly by the
per-chunk functions of the token cache (`data.preference_examples` / `sft_examples`), never held whole and never
cached.

Rows are read one at a time (a JSONL file one line at a time, a parquet file one record batch at a time, a dataset
folder from its memory-mapped Arrow files, a hub dataset by `load_dataset(..., streaming=True)`), each with its
position in the data (`index`, which seeds its draws as in the cache), shuffled in a buffer of `SHUFFLE_BUFFER`
raw rows (`--train_sampling_strategy random`, the default; `sequential` keeps the data's order), and tokenized
`data.CHUNK` rows at a time as the Trainer asks for batches. A bad row is named (file and line, or row) when it is
reached. The data is read once: a run whose data runs out before `--max_steps` stops (`StreamEnd`), and what needs
every row up front (a length, a precomputed reference, length-grouped sampling) is refused (`refusal`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.iterable_dataset import ExamplesIterable
from transformers import PreTrainedTokenizerBase, TrainerCallback

from dtrpo import data as D
from dtrpo.data_cache import KINDS, Source, file_stamp

logger = logging.getLogger(__name__)

INDEX = "dtrpo_index"  # a streamed row's position in the data, counted from 0 (blank JSONL lines skipped)
# Raw rows (a JSONL line's bytes, a parquet row) held to shuffle: about 40 MiB at UltraFeedback-like rows of
# ~4 KiB, and 10x datasets' default of 1000, so that a batch mixes rows from far apart in a file written in
# order (by prompt or by source); filling it reads rows but tokenizes none (tokenizing comes after the shuffle).
SHUFFLE_BUFFER = 10_000
ROW, JSON = ("row", INDEX), ("raw", "line", INDEX)  # the columns of a streamed raw row
ORDERS = ("random", "sequential")  # --train_sampling_strategy values a stream can follow


def refusal(args) -> str | None:
    """Why `--streaming` cannot run with these settings (each needs the whole data up front), or None."""
    if args.max_steps <= 0:
        return (
            f"--streaming needs --max_steps > 0 (got {args.max_steps}): a stream has no length, so "
            "--num_train_epochs cannot give the number of steps"
        )
    if getattr(args, "precompute_ref_log_probs", False):
        return "--streaming cannot run with --precompute_ref_log_probs true: it scores every pair before training"
    if args.train_sampling_strategy not in ORDERS:
        return (
            f"--streaming cannot run with --train_sampling_strategy {args.train_sampling_strategy}: it needs every "
            "row's length up front; use random (a shuffle buffer) or sequential"
        )
    return None


def streamed(
    builder, data: Any, tokenizer: PreTrainedTokenizerBase, limits: D.Limits, args
) -> datasets.IterableDataset:
    """`data` (a path, a list of rows, a Dataset or a datasets.IterableDataset) as a stream of tokenized rows with
    the columns the cache gives (`prompt_ids`, `chosen_ids`/`rejected_ids` or `response_ids`, `index`). `args` are
    the trainer's, whose construction refused what a stream cannot serve (`refusal`)."""
    kind = KINDS[builder]
    raw, columns, name, json_path = raw_rows(data)
    if args.train_sampling_strategy == "random":
        seed = args.data_seed if args.data_seed is not None else args.seed
        raw = raw.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    fn = functools.partial(
        _tokenize, kind=kind, tokenizer=tokenizer, limits=limits, eos=D.eos_id(tokenizer), name=name, path=json_path
    )
    ds = raw.map(fn, batched=True, batch_size=D.CHUNK, remove_columns=list(columns))
    if isinstance(data, (str, os.PathLike)):  # watched while training (DataWatch), as a cached file is
        path = str(Path(data).absolute())
        ds.dtrpo_source = Source(str(data), path, "", "stream", (path,), (file_stamp(Path(path)),))
    logger.warning("streaming %s: read once, tokenized as training reaches it (nothing cached)", name)
    return ds


def raw_rows(data: Any) -> tuple[datasets.IterableDataset, tuple[str, ...], str, str | None]:
    """(stream of untokenized rows, its columns, how errors name the data, the JSONL path or None). A JSONL file
    streams each non-blank line's bytes with its line (parsed when tokenized, so errors name the line); other
    sources stream each row as a dict."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        suffix = path.suffix.lower()
        if path.is_dir():
            return _stream(functools.partial(_dataset_rows, D.load_dataset_folder(path))), ROW, str(data), None
        if suffix == ".parquet":
            return _stream(functools.partial(_parquet_rows, path)), ROW, str(data), None
        if suffix in (".jsonl", ".json"):
            with path.open("rb") as f:
                if suffix == ".json" and f.read(4096).decode("utf-8", errors="replace").lstrip()[:1] == "[":
                    raise ValueError(
                        f"{path}: a JSON list is read whole; --streaming reads one object a line (JSONL): "
                        "convert it, or train without --streaming"
                    )
            return _stream(functools.partial(_json_rows, path)), JSON, str(data), str(path)
        D.read_rows(path)  # names the unknown format
    if isinstance(data, (datasets.Dataset, list)):
        name = D.dataset_source(data) if isinstance(data, datasets.Dataset) else D.MEMORY
        return _stream(functools.partial(_dataset_rows, data)), ROW, name, None
    if isinstance(data, datasets.IterableDataset):
        name = data.info.dataset_name or D.MEMORY
        name = f"{name} (split {str(data.split)!r})" if data.split is not None else name
        return _stream(functools.partial(_dataset_rows, data)), ROW, name, None
    raise TypeError(f"--streaming reads a path, rows, a Dataset or an IterableDataset, got {type(data).__name__}")


def _stream(rows) -> datasets.IterableDataset:
    """An IterableDataset over `rows()` (a fresh pass each time it is iterated), one shard: every process of a
    launch reads the same order and keeps its part of each global batch (accelerate's IterableDatasetShard)."""
    return datasets.IterableDataset(ExamplesIterable(functools.partial(_keyed, rows), {}))


def _keyed(rows) -> Iterator[tuple[int, dict]]:
    return enumerate(rows())  # (key, example), as datasets' example iterables yield them


def _json_rows(path: Path) -> Iterator[dict]:
    with path.open("rb") as f:
        rows = ((n, raw) for n, raw in enumerate(f, 1) if raw.strip())
        for i, (n, raw) in enumerate(rows):
            yield {"raw": raw, "line": n, INDEX: i}


def _parquet_rows(path: Path) -> Iterator[dict]:
    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=D.CHUNK):
            for row in batch.to_pylist():
                yield {"row": row, INDEX: i}
                i += 1
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None


def _dataset_rows(data) -> Iterator[dict]:
    for i, row in enumerate(data):
        yield {"row": row, INDEX: i}


def _tokenize(
    batch: dict[str, list],
    *,
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    limits: D.Limits,
    eos: int,
    name: str,
    path: str | None,
) -> dict[str, list]:
    """One chunk of streamed rows validated and tokenized; rows whose chosen equals rejected are dropped (named in
    a warning)."""
    index = batch[INDEX]
    if path is not None:
        p, hint = Path(path), D.json_hint(Path(path))
        rows = [
            (f"{p}: line {n}", D.as_object(D.parse_line(raw, p, n, hint), p, n))
            for raw, n in zip(batch["raw"], batch["line"], strict=True)
        ]
    else:
        rows = [(f"{name}: row {i + 1}", row) for i, row in zip(index, batch["row"], strict=True)]
    if kind == "preference":
        examples, dropped = D.preference_examples(rows, tokenizer, eos, limits)
        if dropped:  # one line a chunk at most
            where = ", ".join(rows[j][0].rpartition(": ")[2] for j in dropped)
            logger.warning("%s: dropped %d rows whose chosen equals rejected (%s)", name, len(dropped), where)
        gone = set(dropped)
        index = [i for j, i in enumerate(index) if j not in gone]
        columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    else:
        examples, _ = D.sft_examples(rows, tokenizer, eos, limits, "completion")
        columns = ("prompt_ids", "response_ids")
    out = {c: [e[c] for e in examples] for c in columns}
    out["index"] = index
    return out


def undispatched(args) -> None:
    """Each process of a launch reads the stream and keeps its part of every global batch (accelerate's
    IterableDatasetShard): accelerate would otherwise dispatch an IterableDataset's batches from the main process,
    concatenating the batches of all processes, which fails on padded batches of different widths."""
    config = args.accelerator_config
    if config.dispatch_batches:
        raise ValueError(
            "--streaming cannot run with dispatch_batches true in --accelerator_config: batches padded to their "
            "longest row have different widths and cannot be concatenated to be dispatched"
        )
    config.dispatch_batches = False


class StreamEnd(TrainerCallback):
    """Stops a streamed run whose data ran out before `--max_steps`: the Trainer would start the stream again (a
    second epoch), which a resumed run could not find its place in; a stream is read once. Raised at the end of
    the pass, before anything is saved for it."""

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self.begin = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs) -> None:
        stopped = control.should_training_stop and state.global_step > self.begin  # by a callback, not for want of data
        if state.global_step >= args.max_steps or stopped:
            return
        if state.global_step == 0:
            raise ValueError("--streaming: the training data holds no usable rows")
        raise ValueError(
            f"--streaming: the training data ran out at step {state.global_step} of --max_steps {args.max_steps} "
            "(a stream is read once); lower --max_steps, or train without --streaming to repeat the data"
        )
