"""The token cache: training and evaluation data tokenized once per machine into Arrow files that every
later run, resume and process memory-maps.

A cache folder holds the tokenized rows of one data source under one setting, in the Arrow files
`datasets.Dataset.map` writes (int32 token ids), and `dtrpo_cache.json`: the fingerprint's fields, the
row counts and the size of every file. Its name is `<kind>-<source>-<fingerprint>`: the fingerprint
covers what decides the result: the data (the sha256 of a file's bytes, of every file of a dataset
folder, or the `datasets` fingerprint of a Dataset read from the hub cache), the tokenizer (its
serialized vocabulary and rules, special tokens and chat template), the limits and block grid, the
model family, and the code that tokenizes. Another setting is another folder; when the last cache of
the same source differs, the log names the fields that did.

The main process of each machine makes the cache first (`args.main_process_first`): it copies a JSON or
parquet file into Arrow parts of about `RAW_PART_BYTES` (JSON rows as raw lines, so that a worker names
the line of a bad row) and tokenizes each part with `Dataset.map` in batches of `BATCH` rows over
`dataset_num_proc` processes, then unmaps and deletes it, all in a temporary folder renamed into place
once complete. The other processes then find the cache and memory-map it: memory holds one part's pages
and one batch per worker while making it, and pages of the map while training. A cache whose files do
not match their recorded sizes, or that Arrow cannot read, is never read as data: it is made again.

Data given in memory (a list of rows, a Dataset built in memory) is tokenized in memory, as before.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase, TrainerCallback

from dtrpo import data as D

logger = logging.getLogger(__name__)

FORMAT = "dtrpo-token-cache/1"
META = "dtrpo_cache.json"
BATCH = 256  # rows per map batch: one batch's texts and ids are what a worker holds
RAW_BATCH = 4096  # rows per record batch of the raw-line table
RAW_PART_BYTES = 64 << 20  # raw rows per part: the most of a data file mapped at once while tokenizing
PROGRESS_ROWS = 50_000  # datasets' progress bars are shown from this many rows
IDS = getattr(datasets, "List", getattr(datasets, "Sequence", None))(datasets.Value("int32"))  # List: datasets 4+
FEATURES = {
    "preference": datasets.Features(
        {
            "prompt_ids": IDS,
            "chosen_ids": IDS,
            "rejected_ids": IDS,
            "index": datasets.Value("int64"),
            "prompt_truncated": datasets.Value("bool"),
            "responses_truncated": datasets.Value("int8"),
        }
    ),
    "sft": datasets.Features(
        {
            "prompt_ids": IDS,
            "response_ids": IDS,
            "index": datasets.Value("int64"),
            "prompt_truncated": datasets.Value("bool"),
            "response_truncated": datasets.Value("bool"),
        }
    ),
}
KEPT = {
    "preference": ("prompt_ids", "chosen_ids", "rejected_ids", "index"),
    "sft": ("prompt_ids", "response_ids", "index"),
}
KINDS = {D.build_preference_dataset: "preference", D.build_sft_dataset: "sft"}


def default_cache_dir() -> Path:
    """`dtrpo` in the datasets cache (HF_DATASETS_CACHE): a local, writable place on every machine, where
    datasets keeps its own Arrow files; beside the data would need the data's folder to be writable, and hub
    data has no folder of its own."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "dtrpo"


# ----------------------------------------------------------------------------- what the data is


@dataclass(frozen=True)
class Source:
    """A data source as the cache keys it."""

    name: str  # how errors and the log name it
    key: str  # which data it is, whatever it holds: the absolute path, or the dataset's folder and split
    digest: str  # what it holds: sha256 of the bytes, or the datasets fingerprint
    reader: str  # "json", "parquet" or "dataset"
    files: tuple[str, ...] = ()  # local files whose change during a run stops it
    stamps: tuple[tuple[int, int], ...] = ()  # (size, mtime_ns) of each file when read

    def changed(self) -> str | None:
        """The first watched file that changed since it was read, or None."""
        for file, stamp in zip(self.files, self.stamps, strict=True):
            if file_stamp(Path(file)) != stamp:
                return file
        return None


def file_stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def describe(data: Any) -> Source | None:
    """The cache's view of `data`: a path (a JSON or parquet file, a dataset folder) or a Dataset read from
    Arrow files; None for data held in memory (or a path dtrpo.data refuses, which then names the problem)."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data).absolute()
        if path.is_file() and path.suffix.lower() in (".jsonl", ".json", ".parquet"):
            reader = "parquet" if path.suffix.lower() == ".parquet" else "json"
            return _hashed(str(data), str(path), [path], reader)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file())
            return _hashed(str(data), str(path), files, "dataset", root=path)
        return None
    if isinstance(data, datasets.Dataset) and data.cache_files and getattr(data, "_fingerprint", None):
        name = D.dataset_source(data)
        return Source(name, name, f"datasets:{data._fingerprint}:{data.split}:{len(data)}", "dataset")
    return None


def _hashed(name: str, key: str, files: list[Path], reader: str, root: Path | None = None) -> Source:
    """A Source whose digest is the sha256 of the files' digests (and names, for a folder). Refused in one
    line when a file changes while it is read."""
    stamps = tuple(file_stamp(f) for f in files)
    h = hashlib.sha256()
    for f in files:
        if root is not None:
            h.update(f"{f.relative_to(root)}\0".encode())
        with f.open("rb") as stream:
            h.update(hashlib.file_digest(stream, "sha256").digest())
    source = Source(name, key, h.hexdigest(), reader, tuple(map(str, files)), stamps)
    if changed := source.changed():
        raise ValueError(f"{changed}: changed while it was read; start again once it is written")
    return source


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides a tokenizer's ids: its serialized model, rules and added tokens (a fast
    tokenizer), or the datasets hash of the object (a slow one), with its class and special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer).encode())
    h.update(json.dumps([tokenizer.all_special_tokens, tokenizer.eos_token_id], default=str).encode())
    return h.hexdigest()


def _code_digest() -> str:
    """The tokenizing code's own files: a change of dtrpo's tokenization makes every cache again."""
    h = hashlib.sha256()
    for module in (D.__file__, __file__):
        h.update(Path(module).read_bytes())
    return h.hexdigest()[:16]


def fields(kind: str, source: Source, tokenizer: PreTrainedTokenizerBase, limits: D.Limits, family: str) -> dict:
    """What a cache's rows depend on, field by field."""
    import tokenizers

    template = getattr(tokenizer, "chat_template", None)
    return {
        "format": FORMAT,
        "kind": kind,
        "data": source.digest,
        "tokenizer": tokenizer_digest(tokenizer),
        "chat_template": hashlib.sha256(json.dumps(template).encode()).hexdigest(),
        "limits": asdict(limits),
        "family": family,
        "code": f"{_code_digest()} tokenizers {tokenizers.__version__}",
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- making and opening


class Damaged(Exception):
    """A cache folder that cannot be read as it was written."""


def open_cache(folder: Path, kind: str) -> tuple[datasets.Dataset, dict]:
    """The memory-mapped rows of a complete cache folder and its record; Damaged when a file is missing, has
    another size than recorded, or is not a whole Arrow stream."""
    try:
        meta = json.loads((folder / META).read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Damaged(f"{META} unreadable ({type(e).__name__})") from None
    for name, size in sorted(files.items()):
        actual = (folder / name).stat().st_size if (folder / name).is_file() else None
        if actual != size:
            raise Damaged(f"{name} is {'missing' if actual is None else f'{actual} bytes'}, written as {size} bytes")
    try:
        parts = [datasets.Dataset.from_file(str(folder / name)) for name in sorted(files)]
    except (pa.ArrowException, OSError, ValueError) as e:
        raise Damaged(f"Arrow cannot read it ({type(e).__name__}: {str(e)[:120]})") from None
    rows = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(rows) != meta.get("kept"):
        raise Damaged(f"it holds {len(rows)} rows, written with {meta.get('kept')}")
    return rows.select_columns(list(KEPT[kind])), meta


JSON_SCHEMA = pa.schema([("raw", pa.binary()), ("line", pa.int64())])


def _raw_parts(source: Source, data: Any, folder: Path) -> Iterator[datasets.Dataset]:
    """The untokenized rows, one memory-mapped part at a time: a JSON or parquet file is copied into Arrow
    files of about RAW_PART_BYTES (JSON rows as their raw line and line number, parsed by the workers, which
    name the line of a bad row), each removed once tokenized, so the mapped pages a process reads stay
    bounded whatever the file's size; a dataset folder or a Dataset is one part, as it is."""
    if source.reader == "dataset":
        yield data if isinstance(data, datasets.Dataset) else D.load_dataset_folder(Path(data))
        return
    path = Path(data)
    batches = _parquet_batches(path) if source.reader == "parquet" else _json_batches(path)
    writer, out, size, k = None, None, 0, 0
    for batch in batches:
        if writer is None:
            out = folder / f"raw-{k:05d}.arrow"
            sink = pa.OSFile(str(out), "wb")
            writer = pa.ipc.new_stream(sink, batch.schema)
        writer.write_batch(batch)
        size += batch.nbytes
        if size >= RAW_PART_BYTES:
            writer.close()
            sink.close()
            yield from _mapped(out)
            writer, size, k = None, 0, k + 1
    if writer is not None:
        writer.close()
        sink.close()
        yield from _mapped(out)


def _mapped(path: Path) -> Iterator[datasets.Dataset]:
    part = datasets.Dataset.from_file(str(path))
    yield part
    del part
    path.unlink()


def _parquet_batches(path: Path) -> Iterator[pa.RecordBatch]:
    try:
        yield from pq.ParquetFile(path).iter_batches(batch_size=RAW_BATCH)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None


def _json_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """Record batches of the rows of a JSON file: each non-blank line of a .jsonl file as its bytes, or each
    item of a .json list re-serialized, with the line it starts on."""
    raws, lines = [], []
    with path.open("rb") as f:
        listed = path.suffix.lower() == ".json" and f.read(4096).decode("utf-8", errors="replace").lstrip()[:1] == "["
    if listed:
        records = ((line, json.dumps(item).encode()) for line, item in D.json_rows(path))
    else:
        records = _lines(path)
    for line, raw in records:
        raws.append(raw)
        lines.append(line)
        if len(raws) == RAW_BATCH:
            yield pa.record_batch([pa.array(raws, pa.binary()), pa.array(lines, pa.int64())], schema=JSON_SCHEMA)
            raws, lines = [], []
    if raws:
        yield pa.record_batch([pa.array(raws, pa.binary()), pa.array(lines, pa.int64())], schema=JSON_SCHEMA)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        yield from ((n, raw) for n, raw in enumerate(f, 1) if raw.strip())


def _tokenize(
    batch: dict[str, list],
    indices: list[int],
    *,
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    limits: D.Limits,
    eos: int,
    source: str,
    json_path: str | None,
    offset: int,
) -> dict[str, list]:
    """One map batch: its rows validated and tokenized (`index`: the row's position in the data, `offset` that
    of the part's first row)."""
    indices = [offset + i for i in indices]
    if json_path is not None:
        path = Path(json_path)
        hint = D.json_hint(path)
        rows = [
            (f"{path}: line {n}", D.as_object(D.parse_line(raw, path, n, hint), path, n))
            for raw, n in zip(batch["raw"], batch["line"], strict=True)
        ]
    else:
        names = list(batch)
        rows = [
            (f"{source}: row {i + 1}", dict(zip(names, values, strict=True)))
            for i, *values in zip(indices, *batch.values(), strict=True)
        ]
    if kind == "preference":
        examples, dropped = D.preference_examples(rows, tokenizer, eos, limits)
        kept = [i for j, i in enumerate(indices) if j not in set(dropped)]
    else:
        examples, _ = D.sft_examples(rows, tokenizer, eos, limits, "completion")
        kept = indices
    out = {name: [e[name] for e in examples] for name in FEATURES[kind] if name != "index"}
    out["index"] = kept
    return out


def _make(
    kind: str, source: Source, data: Any, tokenizer, limits: D.Limits, num_proc: int | None, folder: Path
) -> dict:
    """Tokenize the data into `folder` (map's Arrow files, one or more per part, and the record); returns the
    record."""
    (folder / "raw").mkdir(parents=True)
    fn = functools.partial(
        _tokenize,
        kind=kind,
        tokenizer=tokenizer,
        limits=limits,
        eos=D.eos_id(tokenizer),
        source=source.name,
        json_path=source.name if source.reader == "json" else None,
    )
    n, kept, cut, dropped = 0, 0, [0, 0], []
    column = "responses_truncated" if kind == "preference" else "response_truncated"
    for k, part in enumerate(_raw_parts(source, data, folder / "raw")):
        procs = num_proc if num_proc and num_proc > 1 and len(part) >= 2 * BATCH else None
        with _progress(len(part) >= PROGRESS_ROWS):
            rows = part.map(
                functools.partial(fn, offset=n),
                batched=True,
                batch_size=BATCH,
                with_indices=True,
                num_proc=procs,
                remove_columns=part.column_names,
                features=FEATURES[kind],
                cache_file_name=str(folder / f"tokens-{k:05d}.arrow"),
                load_from_cache_file=False,
                new_fingerprint=_digest([source.digest, kind, k])[:32],
                desc=f"tokenizing {source.name}",
            )
        table = rows.data
        gone = np.setdiff1d(np.arange(len(part)), table.column("index").to_numpy() - n, assume_unique=True)
        if len(dropped) < 11 and len(gone):
            dropped += [int(part[int(j)]["line"]) if source.reader == "json" else n + int(j) + 1 for j in gone[:11]]
        kept += len(rows)
        cut[0] += int(pc.sum(table.column("prompt_truncated").cast(pa.int64())).as_py() or 0)
        cut[1] += int(pc.sum(table.column(column).cast(pa.int64())).as_py() or 0)
        n += len(part)
        del rows, table, part
    if not n and kind == "sft":
        raise ValueError(f"{source.name}: no rows")
    if not kept and kind == "preference":
        raise ValueError(f"{source.name}: no usable rows ({n} rows, {n - kept} with chosen equal to rejected)")
    stats = {"rows": n, "kept": kept}
    if kind == "preference":
        unit = "lines" if source.reader == "json" else "rows"
        where = f"{unit} " + ", ".join(map(str, dropped[:10])) + (", ..." if n - kept > 10 else "")
        stats |= {"identical_dropped": n - kept, "dropped_where": where}
    stats |= {"prompts_truncated": cut[0], "responses_truncated": cut[1]}
    shutil.rmtree(folder / "raw")
    return {"kept": kept, "stats": stats, "files": {f.name: f.stat().st_size for f in sorted(folder.glob("*.arrow"))}}


@contextlib.contextmanager
def _progress(show: bool):
    was = datasets.utils.are_progress_bars_disabled()
    if not show:
        datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            datasets.utils.enable_progress_bars()


def _why_new(cache_dir: Path, prefix: str, new: dict) -> str:
    """Why no cache fits: none yet for this source, or the fields in which the newest one for it differs."""
    olds = []
    for folder in cache_dir.glob(f"{prefix}-*"):
        with contextlib.suppress(OSError, ValueError):
            olds.append((folder.stat().st_mtime, json.loads((folder / META).read_text())["fields"]))
    if not olds:
        return "no cache of this data yet"
    old = max(olds, key=lambda x: x[0])[1]
    differ = [k for k in new if old.get(k) != new[k]]
    if "limits" in differ:
        changed = [f"{k} {old['limits'].get(k)} -> {v}" for k, v in new["limits"].items() if old["limits"].get(k) != v]
        differ[differ.index("limits")] = "limits (" + ", ".join(changed) + ")"
    return "the last cache of this data differs in " + ", ".join(differ)


def _writable(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"--dataset_cache_dir {cache_dir}: not writable ({e.strerror or e}); pass a writable folder"
        ) from None


def cached(
    builder: Callable,
    data: Any,
    tokenizer: PreTrainedTokenizerBase,
    limits: D.Limits,
    family: str,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    main_first: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[datasets.Dataset, dict, Source | None]:
    """(rows, stats, source) of `data` tokenized by `builder` (build_preference_dataset or build_sft_dataset):
    memory-mapped from the cache, made first when no complete cache of this setting exists. `main_first`
    runs the main process of the machine first (the others then find its cache). Data in memory is
    tokenized in memory (source None)."""
    kind = KINDS[builder]
    source = describe(data)
    if source is None:
        ds, stats = builder(data, tokenizer, *astuple_limits(limits))
        return ds, stats, None
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    with main_first():
        rows, meta, made = _open_or_make(kind, source, data, tokenizer, limits, family, cache_dir, num_proc)
    if changed := source.changed():
        raise ValueError(f"{changed}: changed while it was tokenized; start again once it is written")
    stats = dict(meta["stats"])
    where = stats.pop("dropped_where", "")
    if stats.get("identical_dropped"):
        warnings.warn(
            f"{source.name}: dropped {stats['identical_dropped']} of {stats['rows']} rows whose chosen equals "
            f"rejected ({where})",
            stacklevel=3,
        )
    logger.warning(
        "token cache %s: %s (%d rows%s)", "made" if made else "reused", meta["folder"], len(rows), meta.get("took", "")
    )
    return rows, stats, source


def astuple_limits(limits: D.Limits) -> tuple:
    return (limits.block_size, limits.max_prompt_length, limits.max_response_length, limits.truncation, limits.absolute)


def _open_or_make(kind, source, data, tokenizer, limits, family, cache_dir: Path, num_proc):
    """(rows, record, made): the cache of this setting, opened, or made (again, when damaged) and opened."""
    new = fields(kind, source, tokenizer, limits, family)
    prefix = f"{kind}-{_digest(source.key)[:12]}"
    folder = cache_dir / f"{prefix}-{_digest(new)[:16]}"
    if folder.is_dir():
        try:
            rows, meta = open_cache(folder, kind)
            return rows, {**meta, "folder": str(folder)}, False
        except Damaged as e:
            logger.warning("token cache %s is damaged (%s): making it again", folder, e)
            why = "the cache was damaged"
            _writable(cache_dir)
            shutil.rmtree(folder, ignore_errors=True)
    else:
        why = _why_new(cache_dir, prefix, new)
        _writable(cache_dir)
    logger.warning("token cache for %s: making %s (%s)", source.name, folder, why)
    start = time.perf_counter()
    staging = cache_dir / f".partial-{folder.name}-{socket.gethostname()}-{os.getpid()}"  # nodes may share it
    shutil.rmtree(staging, ignore_errors=True)
    try:
        record = _make(kind, source, data, tokenizer, limits, num_proc, staging)
        record["fields"], record["source"] = new, source.name
        (staging / META).write_text(json.dumps(record, indent=1))
        try:
            staging.rename(folder)
        except OSError:  # another run made it first
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    rows, meta = open_cache(folder, kind)
    return rows, {**meta, "folder": str(folder), "took": f", {time.perf_counter() - start:.1f} s"}, True


class DataWatch(TrainerCallback):
    """Stops a run whose data file changed after it was tokenized: the cache holds the old rows, and nothing
    trains on them once the file says otherwise. One `stat` per file and step."""

    def __init__(self, datasets_: list) -> None:
        self.sources = [s for d in datasets_ if (s := getattr(d, "dtrpo_source", None)) is not None]

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        for source in self.sources:
            if changed := source.changed():
                raise ValueError(
                    f"{changed}: changed since this run tokenized it; stopped at step {state.global_step} so that "
                    "nothing trains on the old rows. Start again (or resume from a checkpoint) to tokenize the new data"
                )
