"""Preference and SFT data: loading, validation, tokenization and collation.

Files: `.jsonl`, `.json` (a list of objects, or one object per line), `.parquet`, or a folder written
by `datasets.Dataset.save_to_disk`. The builders also take an in-memory `datasets.Dataset` or a list
of dicts, named "<memory>" in errors. Errors name the source, the row and the field as the data
wrote it; a row of a JSON file is named by the line it starts on ("line 6", counted from 1, as
editors count), any other row by its position counted from 1 ("row 3"). The `index` column counts
rows from 0 in file order (blank JSONL lines are skipped) and is kept when rows are dropped: it
seeds each example's draws.

Preference rows (TRL's formats):
- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of `{role, content}` messages, rendered with the tokenizer's chat
  template and a generation prompt; `chosen` and `rejected` each a list of one assistant message,
  whose content is the response;
- implicit prompt: only `chosen` and `rejected`, both strings or both message lists. For strings the
  prompt is their longest common prefix (character-wise, so "is 4." / "is 42." split after "is 4");
  for message lists it is all messages but the last, which must be the same in both, and the last
  message of each is the response.
A row whose chosen response equals its rejected one teaches nothing: it is dropped with one warning
that gives the count. Any other bad row (missing field, wrong type, empty prompt or response) raises
`ValueError` naming the source, the row and the field.

SFT rows: `prompt` with `completion` (alias `response`; `completion` wins when both are set), in
the standard or conversational form, or conversational `messages` whose last message is the
assistant response and whose earlier messages are the prompt.

Tokenization and limits:
- prompt: token ids without added special tokens. Longer than `max_prompt_length`: the LAST
  `max_prompt_length` tokens are kept (left truncation, counted in `prompts_truncated`).
- response: token ids, then EOS, then more EOS up to the end of a block (the padding the
  block-diffusion models are trained with; these EOS are real tokens, predicted like any other).
- `max_response_length` counts the response with its EOS and must be a positive multiple of
  `block_size`. A response whose ids plus one EOS exceed it is, under `truncation="truncate"`, cut
  to its first `max_response_length` ids with no EOS appended (counted in `responses_truncated`,
  once per chosen or rejected response), and under `truncation="error"` refused with the lengths.
- absolute block grid (`absolute=True`, SDAR/TraDo and Fast-dLLM v2, see `masking`): blocks count
  from the prompt's first token, so a response ends where `prompt + response` is a block multiple
  (its first block is `B - P % B` tokens). An over-long prompt loses a multiple of `B` tokens from its
  front (the fewest that fit `max_prompt_length`), so the kept tokens keep their place in their
  blocks and the tail that shares the first response block is unchanged. The longest response is the
  largest grid-aligned width within `max_response_length` (`max_response_length - P % B` when P % B
  is not 0): a longer one is cut there (no EOS) or refused, never left off the grid.

Collators pad prompts LEFT and responses RIGHT with the pad token; the `*_valid` tensors are True on real
tokens, EOS padding included.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from dtrpo.options import deprecated

logger = logging.getLogger(__name__)

TRUNCATIONS = ("truncate", "error")
MEMORY = "<memory>"
Rows = str | os.PathLike | datasets.Dataset | list[dict]

# ----------------------------------------------------------------------------- files


def load_rows(path: str | os.PathLike, splits: bool = False) -> datasets.Dataset | datasets.DatasetDict:
    """The rows of a .jsonl, .json or .parquet file, or of a `save_to_disk` folder, as a Dataset (a folder of
    several splits: its DatasetDict when `splits`)."""
    if splits and Path(path).is_dir():
        return load_dataset_folder(Path(path), splits=True)
    rows, _ = read_rows(Path(path))
    return rows if isinstance(rows, datasets.Dataset) else _to_dataset(rows, str(path))


def read_rows(path: Path) -> tuple[list[dict] | datasets.Dataset, list[int] | None]:
    """Rows, and the line of a JSON file each starts on (None for parquet and folders). JSON rows stay
    Python dicts so that validation sees them before Arrow unifies types."""
    if path.is_dir():
        return load_dataset_folder(path), None
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        lines, rows = [], []
        for line, row in json_rows(path):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {line}: expected a JSON object, got {type(row).__name__}")
            lines.append(line)
            rows.append(row)
        return rows, lines
    if suffix == ".parquet":
        try:
            return datasets.Dataset(pq.read_table(path)), None
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    raise ValueError(
        f"{path}: unknown data format {suffix or '(no extension)'!r}; "
        "expected .jsonl, .json, .parquet or a folder written by Dataset.save_to_disk"
    )


def json_rows(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line, value) of each row of a JSON file, lines counted from 1: a .jsonl file (or a .json file
    not starting with '[') is read one line at a time, so any file size keeps memory bounded; a .json
    list is read whole and each item is numbered by the line it starts on. Blank lines are skipped;
    an error names the file and the line."""
    path = Path(path)
    with path.open("rb") as f:
        first = f.read(4096).decode("utf-8", errors="replace").lstrip()
    if path.suffix.lower() == ".json" and first.startswith("["):
        yield from _json_list(path)
        return
    hint = json_hint(path)
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            line = _utf8(raw, path, number)
            if line.strip():
                yield number, parse_line(line, path, number, hint)


def json_hint(path: Path) -> str:
    """What a .json file that is not a list may hold, added to its errors."""
    return "; a .json file holds a list of objects or one object per line" if path.suffix.lower() == ".json" else ""


def parse_line(line: str | bytes, path: Path, number: int, hint: str = "") -> Any:
    """The JSON value of one line of a file; an error names the file and the line."""
    if isinstance(line, bytes):
        line = _utf8(line, path, number)
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {number}: not valid JSON ({e.msg} at column {e.colno}){hint}") from None
    except RecursionError:
        raise ValueError(f"{path}: line {number}: JSON nested too deeply to read") from None
    except ValueError as e:  # a number Python will not convert, such as an integer of 5000 digits
        raise ValueError(f"{path}: line {number}: unreadable JSON ({str(e).split(';')[0]})") from None


def _utf8(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
        ) from None


def _json_list(path: Path) -> Iterator[tuple[int, Any]]:
    raw = path.read_bytes()
    text = "\n".join(_utf8(line, path, i) for i, line in enumerate(raw.split(b"\n"), 1))
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # a number Python will not convert: the list is read whole, so no line is known
        raise ValueError(f"{path}: unreadable JSON ({str(e).split(';')[0]})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read") from None
    decoder, space = json.JSONDecoder(), re.compile(r"[\s,]*")
    pos, line, counted = space.match(text, text.index("[") + 1).end(), 1, 0
    for item in items:  # a second pass over valid JSON, for the line each item starts on
        line, counted = line + text.count("\n", counted, pos), pos
        _, end = decoder.raw_decode(text, pos)
        yield line, item
        pos = space.match(text, end).end()


def load_dataset_folder(path: Path, splits: bool = False) -> datasets.Dataset | datasets.DatasetDict:
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: a folder, but not one written by Dataset.save_to_disk") from None
    except (pa.ArrowException, OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable dataset folder (a damaged file? {type(e).__name__}: {e})") from None
    if isinstance(data, datasets.DatasetDict) and not splits:
        if len(data) != 1:
            raise ValueError(f"{path}: holds splits {sorted(data)}; pass one split's folder, e.g. {path / 'train'}")
        data = next(iter(data.values()))
    return data


def _to_dataset(rows: list[dict], source: str) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_list(rows)
    except pa.ArrowException as e:
        raise ValueError(f"{source}: rows do not fit one table (a field of several types?): {e}") from None


def _rows(data: Rows) -> tuple[Iterator[tuple[str, Any]], str]:
    """(where, row) of each row, where naming it as errors do, and the source's name. JSON files are read one
    line (or one list item) at a time, Datasets one row at a time: memory holds the rows being tokenized."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
            return ((f"{path}: line {line}", as_object(row, path, line)) for line, row in json_rows(path)), str(path)
        data, source = read_rows(path)[0], str(path)
    elif isinstance(data, datasets.Dataset):
        source = dataset_source(data)
    elif isinstance(data, list):
        source = MEMORY
    else:
        raise TypeError(f"data must be a path, a datasets.Dataset or a list of dicts, got {type(data).__name__}")
    return ((f"{source}: row {i + 1}", row) for i, row in enumerate(data)), source


def as_object(row: Any, path: Path, line: int) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{path}: line {line}: expected a JSON object, got {type(row).__name__}")
    return row


def dataset_source(data: datasets.Dataset) -> str:
    """How errors name a Dataset's rows: the folder of its Arrow files (or its name) and its split; "<memory>"
    for one built in memory."""
    files = [f["filename"] for f in data.cache_files]
    name = str(Path(files[0]).parent) if files else (data.info.dataset_name or MEMORY)
    return f"{name} (split {str(data.split)!r})" if data.split is not None else name


def _place(source: str, lines: list[int] | None, i: int) -> str:
    """Where row i is, as errors name it: the file line of a JSON file, else the row counted from 1."""
    return f"{source}: line {lines[i]}" if lines else f"{source}: row {i + 1}"


def _batched(rows: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- row validation


def _error(where: str, field: str, problem: str) -> ValueError:
    return ValueError(f"{where}: field '{field}' {problem}")


def _field(row: dict, field: str, where: str) -> Any:
    value = row.get(field) if isinstance(row, dict) else None
    if value is None:
        raise _error(where, field, "is missing")
    return value


def _kind(value: Any) -> str:
    return type(value).__name__


ROLES = ("system", "user", "assistant", "tool")  # a template may render any other role as some turn: refused


def _messages(value: Any, where: str, field: str) -> list[dict]:
    """A validated list of `{role, content}` string messages (keys Arrow filled with None dropped)."""
    if not isinstance(value, list):
        raise _error(where, field, f"must be a list of messages, got {_kind(value)}")
    out = []
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _error(where, f"{field}[{j}]", f"must be a message {{'role': str, 'content': str}}, got {m!r}")
        if m["role"] not in ROLES:
            raise _error(where, f"{field}[{j}]", f"has the unknown role {m['role']!r} (one of {', '.join(ROLES)})")
        unicode_text(m["content"], where, f"{field}[{j}]")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def unicode_text(text: str, where: str, field: str) -> str:
    """Text that can be encoded: a lone surrogate (JSON's "\\ud83d" without its pair) cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _error(where, field, f"holds a lone surrogate {text[e.start]!r} at character {e.start + 1}") from None
    return text


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str, field: str) -> str:
    if not messages:
        raise _error(where, field, "is empty")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: field '{field}' is a conversation but the tokenizer has no chat template")
    return render_chat(tokenizer, messages, where, field)


def _nonempty(text: str, where: str, field: str) -> str:
    if not text.strip():
        raise _error(where, field, "is empty")
    return unicode_text(text, where, field)


class Rendered(str):
    """A chat-template rendering: the template's own special tokens (turn markers, EOS) stay special when it is
    tokenized, while the messages' text cannot make one. `pieces` is the text cut into (text, is_template)."""

    pieces: tuple[tuple[str, bool], ...]


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    where: str = MEMORY,
    field: str = "prompt",
    generation_prompt: bool = True,
):
    """The chat template applied (with a generation prompt unless `generation_prompt` is False), as a `Rendered`
    text. A message holding a special token's text is rendered around a placeholder so that its content can be
    tokenized apart, as plain text."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    specials = [t for t in tokenizer.all_special_tokens if t]
    if not any(t in m["content"] for m in messages for t in specials):
        return _rendered(text, ((text, True),))
    marks = [f"\x00{j}\x00" for j in range(len(messages))]
    held = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
    template = tokenizer.apply_chat_template(held, add_generation_prompt=generation_prompt, tokenize=False)
    pieces = []
    for m, mark in zip(messages, marks, strict=True):
        before, found, template = template.partition(mark)
        if not found:
            raise _error(where, field, "holds a special token's text and the chat template changes message text")
        pieces += [(before, True), (m["content"], False)]
    pieces.append((template, True))
    if "".join(p for p, _ in pieces) != text:
        raise _error(where, field, "holds a special token's text and the chat template changes message text")
    return _rendered(text, tuple(p for p in pieces if p[0]))


def _rendered(text: str, pieces: tuple) -> Rendered:
    out = Rendered(text)
    out.pieces = pieces
    return out


def encode_text(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of user texts without added special tokens: a special token's text in plain text (a literal
    "<eos>") is tokenized as text, never as the token; a `Rendered` chat keeps only its template's specials."""
    out = [None] * len(texts)
    for template in (False, True):  # plain texts, then chats whose text is all template or clean content
        rows = [i for i, t in enumerate(texts) if isinstance(t, Rendered) == template and len(_pieces(t)) == 1]
        if rows:
            ids = tokenizer([texts[i] for i in rows], add_special_tokens=False, split_special_tokens=not template)
            for i, row_ids in zip(rows, ids["input_ids"], strict=True):
                out[i] = row_ids
    for i, text in enumerate(texts):
        if out[i] is None:  # a chat whose messages hold a special token's text: piece by piece
            out[i] = [t for piece, template in text.pieces for t in _encode_piece(tokenizer, piece, template)]
    return out


def _pieces(text: str) -> tuple:
    return text.pieces if isinstance(text, Rendered) else ((text, False),)


def _encode_piece(tokenizer: PreTrainedTokenizerBase, text: str, template: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=not template)["input_ids"]


def _prompt_text(value: Any, tokenizer: PreTrainedTokenizerBase, where: str, field: str = "prompt") -> str:
    if isinstance(value, str):
        return _nonempty(value, where, field)
    if isinstance(value, list):
        return _render(tokenizer, _messages(value, where, field), where, field)
    raise _error(where, field, f"must be a string or a list of messages, got {_kind(value)}")


def _assistant(message: dict, where: str, field: str) -> str:
    if message["role"] != "assistant":
        raise _error(where, field, f"must end with an assistant message, got role {message['role']!r}")
    return _nonempty(message["content"], where, field)


def _response_text(value: Any, conversational: bool, where: str, field: str) -> str:
    """The response string; for a conversational row, the content of its one assistant message."""
    if not conversational:
        if not isinstance(value, str):
            raise _error(where, field, f"must be a string (the prompt is a string), got {_kind(value)}")
        return _nonempty(value, where, field)
    messages = _messages(value, where, field)
    if len(messages) != 1:
        raise _error(where, field, f"must hold exactly one assistant message, got {len(messages)} messages")
    return _assistant(messages[0], where, field)


def _implicit(chosen: Any, rejected: Any, tokenizer: PreTrainedTokenizerBase, where: str) -> tuple[str, ...] | None:
    """Prompt = what chosen and rejected share: the longest common string prefix, or the leading messages."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        if chosen == rejected:
            return None
        prompt = os.path.commonprefix([chosen, rejected])
        if not prompt.strip():
            raise _error(where, "chosen", "shares no prefix with 'rejected': the implicit prompt is empty")
        rest = chosen[len(prompt) :], rejected[len(prompt) :]
        return prompt, _nonempty(rest[0], where, "chosen"), _nonempty(rest[1], where, "rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
        for field, messages in (("chosen", c), ("rejected", r)):
            if len(messages) < 2:
                raise _error(where, field, "needs prompt messages before the response (no 'prompt' field)")
        same = [(m["role"], m["content"]) for m in c[:-1]] == [(m["role"], m["content"]) for m in r[:-1]]
        if not same:
            raise _error(where, "rejected", "must repeat every message of 'chosen' but the last (the implicit prompt)")
        if c == r:
            return None
        prompt = _render(tokenizer, c[:-1], where, "chosen")
        return prompt, _assistant(c[-1], where, "chosen"), _assistant(r[-1], where, "rejected")
    raise _error(where, "rejected", f"must have the type of 'chosen' ({_kind(chosen)}), got {_kind(rejected)}")


def preference_texts(
    row: dict, tokenizer: PreTrainedTokenizerBase, where: str = f"{MEMORY}: row 1"
) -> tuple[str, str, str] | None:
    """(prompt, chosen, rejected) texts of a preference row in any TRL format; None if chosen equals rejected.
    `where` names the row in errors."""
    chosen, rejected = _field(row, "chosen", where), _field(row, "rejected", where)
    prompt = row.get("prompt")
    if prompt is None:
        return _implicit(chosen, rejected, tokenizer, where)
    conversational = isinstance(prompt, list)
    texts = (
        _prompt_text(prompt, tokenizer, where),
        _response_text(chosen, conversational, where, "chosen"),
        _response_text(rejected, conversational, where, "rejected"),
    )
    return None if texts[1] == texts[2] else texts


def _sft_row(
    row: dict, tokenizer: PreTrainedTokenizerBase, where: str, key: str = "completion"
) -> tuple[str, str, str]:
    """(prompt, response, the field that held the response); `key` is the response field the data uses,
    named when a row has neither `completion` nor `response`."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if messages is not None:
        messages = _messages(messages, where, "messages")
        if len(messages) < 2:
            raise _error(where, "messages", f"needs prompt messages and an assistant response, got {len(messages)}")
        prompt = _render(tokenizer, messages[:-1], where, "messages")
        return prompt, _assistant(messages[-1], where, "messages"), "messages"
    prompt = _field(row, "prompt", where)
    if row.get("completion") is not None or row.get("response") is not None:
        key = "completion" if row.get("completion") is not None else "response"
    completion = _field(row, key, where)
    response = _response_text(completion, isinstance(prompt, list), where, key)
    return _prompt_text(prompt, tokenizer, where), response, key


def _response_field(rows: list, key: str = "completion") -> str:
    """The SFT response field the data uses, as far as read: `response` once rows have it and none has
    `completion` (then named when a row has neither)."""
    names = {k for row in rows if isinstance(row, dict) for k in row if row[k] is not None}
    if "completion" in names:
        return "completion"
    return "response" if "response" in names else key


# ----------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class Limits:
    block_size: int
    max_prompt_length: int | None = None
    max_response_length: int | None = None
    truncation: str = "truncate"
    absolute: bool = False  # blocks counted from the prompt's first token (see the module docstring)

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.max_prompt_length is not None and self.max_prompt_length <= 0:
            raise ValueError(f"max_prompt_length must be positive or None, got {self.max_prompt_length}")
        m = self.max_response_length
        if m is not None and (m <= 0 or m % self.block_size):
            b = self.block_size
            raise ValueError(f"max_response_length must be a positive multiple of block_size={b}, got {m}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: responses end with EOS and are EOS-padded to the block size")
    return tokenizer.eos_token_id


_encode = encode_text


def keep_prompt_end(ids: list[int], max_len: int | None, grid: int | None = None) -> tuple[list[int], bool]:
    """The end of the prompt is what the response follows: keep its last tokens, at most `max_len`, and
    say whether it was cut. On an absolute block grid of `grid` tokens, drop a multiple of it, so every
    kept token stays in its block (the kept prompt is then up to grid - 1 tokens under the limit)."""
    if max_len is None or len(ids) <= max_len:
        return ids, False
    drop = len(ids) - max_len
    if grid:
        drop = -(-drop // grid) * grid
    return ids[drop:], True


def _fit_prompt(ids: list[int], limits: Limits) -> tuple[list[int], bool]:
    return keep_prompt_end(ids, limits.max_prompt_length, limits.block_size if limits.absolute else None)


def _fit_response(
    ids: list[int], eos: int, limits: Limits, where: str, field: str, prompt_len: int = 0
) -> tuple[list[int], bool]:
    """ids + EOS, EOS-padded to the end of a block; an over-long response is cut (no EOS) or refused.
    On the absolute grid the block ends are counted from the prompt's first token."""
    bs = limits.block_size
    lead = prompt_len % bs if limits.absolute else 0  # prompt tokens in the first response block
    m, n = limits.max_response_length, len(ids) + 1
    if m is not None:
        m -= (lead + m) % bs  # the longest response that ends on the grid
    if m is not None and n > m:
        if limits.truncation == "error":
            limit = f"max_response_length={m}"
            if lead:
                limit = (
                    f"the {m} that max_response_length={limits.max_response_length} leaves on the block grid "
                    f"after a prompt of {prompt_len}"
                )
            raise _error(where, field, f"is {n} tokens with its EOS, over {limit} (truncation='error')")
        return ids[:m], True
    width = -(-(lead + n) // bs) * bs - lead
    return ids + [eos] * (width - len(ids)), False


def tokenize_preference(
    prompt: str,
    chosen: str,
    rejected: str,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_prompt_length: int | None = None,
    max_response_length: int | None = None,
    truncation: str = "truncate",
    source: str = MEMORY,
    index: int = 0,
    absolute: bool = False,
) -> dict[str, Any]:
    """Token ids of one preference example under the module's limits, with what was truncated.

    Returns `prompt_ids`, `chosen_ids`, `rejected_ids`, `prompt_truncated` (bool) and
    `responses_truncated` (0, 1 or 2).
    """
    limits = Limits(block_size, max_prompt_length, max_response_length, truncation, absolute)
    p, c, r = _encode(tokenizer, [prompt, chosen, rejected])
    return _fit_preference(p, c, r, eos_id(tokenizer), limits, _place(source, None, index))


def _fit_preference(p, c, r, eos: int, limits: Limits, where: str) -> dict[str, Any]:
    prompt_ids, prompt_cut = _fit_prompt(p, limits)
    chosen_ids, chosen_cut = _fit_response(c, eos, limits, where, "chosen", len(prompt_ids))
    rejected_ids, rejected_cut = _fit_response(r, eos, limits, where, "rejected", len(prompt_ids))
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "prompt_truncated": prompt_cut,
        "responses_truncated": int(chosen_cut) + int(rejected_cut),
    }


def _fit_sft(p, r, eos: int, limits: Limits, where: str, field: str) -> dict[str, Any]:
    prompt_ids, prompt_cut = _fit_prompt(p, limits)
    response_ids, response_cut = _fit_response(r, eos, limits, where, field, len(prompt_ids))
    return {
        "prompt_ids": prompt_ids,
        "response_ids": response_ids,
        "prompt_truncated": prompt_cut,
        "response_truncated": response_cut,
    }


# ----------------------------------------------------------------------------- datasets


def preference_examples(
    rows: list[tuple[str, dict]], tokenizer: PreTrainedTokenizerBase, eos: int, limits: Limits
) -> tuple[list[dict], list[int]]:
    """The tokenized examples of `(where, row)` pairs (validated, `where` naming each in errors), and the
    positions in `rows` of those dropped because their chosen response equals the rejected one."""
    texts, places, dropped = [], [], []
    for j, (where, row) in enumerate(rows):
        t = preference_texts(row, tokenizer, where)
        if t is None:
            dropped.append(j)
        else:
            texts.append(t)
            places.append(where)
    p, c, r = (_encode(tokenizer, [t[k] for t in texts]) for k in range(3))
    return [_fit_preference(*ids, eos, limits, w) for *ids, w in zip(p, c, r, places, strict=True)], dropped


def sft_examples(
    rows: list[tuple[str, dict]], tokenizer: PreTrainedTokenizerBase, eos: int, limits: Limits, key: str
) -> tuple[list[dict], str]:
    """The tokenized SFT examples of `(where, row)` pairs, and the response field the data uses so far
    (`key` before these rows, see `_response_field`)."""
    key = _response_field([row for _, row in rows], key)
    texts = [(*_sft_row(row, tokenizer, where, key), where) for where, row in rows]
    p, r = (_encode(tokenizer, [t[k] for t in texts]) for k in range(2))
    return [_fit_sft(pi, ri, eos, limits, t[3], t[2]) for pi, ri, t in zip(p, r, texts, strict=True)], key


CHUNK = 64  # rows validated and tokenized at a time: memory holds one chunk's texts and the tokenized table


class _Table:
    """Tokenized columns grown one chunk at a time as int32 Arrow lists (about 4 bytes a token), never as the
    Python lists of every row (about 40 bytes a token)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names, self.chunks = names, {n: [] for n in (*names, "index")}

    def add(self, examples: list[dict], index: list[int]) -> None:
        for name in self.names:
            self.chunks[name].append(pa.array([e[name] for e in examples], type=pa.list_(pa.int32())))
        self.chunks["index"].append(pa.array(index, type=pa.int64()))

    def dataset(self) -> datasets.Dataset:
        return datasets.Dataset(pa.table({n: pa.chunked_array(c) for n, c in self.chunks.items()}))


def build_preference_dataset(
    data: Rows,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_prompt_length: int | None = None,
    max_response_length: int | None = None,
    truncation: str = "truncate",
    absolute: bool = False,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenized preference pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`, `index`) and counts.

    `data` is a path (see `load_rows`), a Dataset or a list of dicts, read and tokenized `CHUNK` rows at a
    time. The stats are `rows`, `kept`, `identical_dropped`, `prompts_truncated` and `responses_truncated`.
    """
    limits = Limits(block_size, max_prompt_length, max_response_length, truncation, absolute)
    eos = eos_id(tokenizer)
    rows, source = _rows(data)
    table, n, identical = _Table(("prompt_ids", "chosen_ids", "rejected_ids")), 0, []
    stats = dict.fromkeys(("prompts_truncated", "responses_truncated"), 0)
    for chunk in _batched(rows, CHUNK):
        examples, dropped = preference_examples(chunk, tokenizer, eos, limits)
        identical += [chunk[j][0] for j in dropped]
        index = [n + j for j in sorted(set(range(len(chunk))) - set(dropped))]
        n += len(chunk)
        stats["prompts_truncated"] += sum(e["prompt_truncated"] for e in examples)
        stats["responses_truncated"] += sum(e["responses_truncated"] for e in examples)
        table.add(examples, index)
    kept = n - len(identical)
    if identical:
        unit = "lines" if ": line " in identical[0] else "rows"
        shown = unit + " " + ", ".join(w.rpartition(" ")[2] for w in identical[:10])
        shown += ", ..." if len(identical) > 10 else ""
        warnings.warn(
            f"{source}: dropped {len(identical)} of {n} rows whose chosen equals rejected ({shown})", stacklevel=2
        )
    if not kept:
        raise ValueError(f"{source}: no usable rows ({n} rows, {len(identical)} with chosen equal to rejected)")
    stats = {"rows": n, "kept": kept, "identical_dropped": len(identical), **stats}
    logger.info("%s: preference data %s", source, stats)
    return table.dataset(), stats


def build_sft_dataset(
    data: Rows,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_prompt_length: int | None = None,
    max_response_length: int | None = None,
    truncation: str = "truncate",
    absolute: bool = False,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenized SFT examples (`prompt_ids`, `response_ids`, `index`) and counts (`rows`, `kept`,
    `prompts_truncated`, `responses_truncated`), read and tokenized `CHUNK` rows at a time."""
    limits = Limits(block_size, max_prompt_length, max_response_length, truncation, absolute)
    eos = eos_id(tokenizer)
    rows, source = _rows(data)
    table, n, key = _Table(("prompt_ids", "response_ids")), 0, "completion"
    stats = dict.fromkeys(("prompts_truncated", "responses_truncated"), 0)
    for chunk in _batched(rows, CHUNK):
        examples, key = sft_examples(chunk, tokenizer, eos, limits, key)
        stats["prompts_truncated"] += sum(e["prompt_truncated"] for e in examples)
        stats["responses_truncated"] += sum(e["response_truncated"] for e in examples)
        table.add(examples, list(range(n, n + len(chunk))))
        n += len(chunk)
    if not n:
        raise ValueError(f"{source}: no rows")
    stats = {"rows": n, "kept": n, **stats}
    logger.info("%s: SFT data %s", source, stats)
    return table.dataset(), stats


# ----------------------------------------------------------------------------- collation


def _pad(seqs: list, pad_token_id: int, width: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) ids filled with pad_token_id around each sequence, and (B, width) validity: real tokens."""
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        valid[row, cols] = True
    return ids, valid


def _index(features: list[dict]) -> torch.Tensor:
    if any("index" not in f for f in features):
        raise ValueError("features need an 'index' column: the row index seeds each example's draws")
    return torch.tensor([int(f["index"]) for f in features], dtype=torch.long)  # (B,)


def _responses(features: list[dict], key: str, block_size: int, absolute: bool) -> list:
    """The responses, each checked to end on the block grid."""
    seqs = [f[key] for f in features]
    for f, seq in zip(features, seqs, strict=True):
        lead = len(f["prompt_ids"]) % block_size if absolute else 0
        if (lead + len(seq)) % block_size:
            where = f"index {f.get('index')}: {key} has {len(seq)} tokens"
            problem = (
                f"after a prompt of {len(f['prompt_ids'])} it does not end a block of block_size={block_size} "
                "(absolute block grid)"
                if absolute
                else f"not a multiple of block_size={block_size}"
            )
            raise ValueError(f"{where}, {problem}; make the data with build_preference_dataset or build_sft_dataset")
    return seqs


def _prompts(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    seqs = [f["prompt_ids"] for f in features]
    ids, valid = _pad(seqs, pad_token_id, max(map(len, seqs)), left=True)
    return {"prompt_ids": ids, "prompt_valid": valid}  # (B, P)


@dataclass
class PreferenceCollator:
    """Pads prompts left to the longest, and chosen and rejected right to one common length R."""

    pad_token_id: int
    block_size: int
    absolute: bool = False  # the absolute block grid: responses end where prompt + response is a block multiple

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        chosen = _responses(features, "chosen_ids", self.block_size, self.absolute)
        rejected = _responses(features, "rejected_ids", self.block_size, self.absolute)
        width = max(map(len, chosen + rejected))  # R, shared so that chosen and rejected stack
        out = _prompts(features, self.pad_token_id)
        out["chosen_ids"], out["chosen_valid"] = _pad(chosen, self.pad_token_id, width, left=False)  # (B, R)
        out["rejected_ids"], out["rejected_valid"] = _pad(rejected, self.pad_token_id, width, left=False)  # (B, R)
        out["index"] = _index(features)
        return out


@dataclass
class SFTCollator:
    """Pads prompts left to the longest, and responses right to the longest."""

    pad_token_id: int
    block_size: int
    absolute: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        responses = _responses(features, "response_ids", self.block_size, self.absolute)
        out = _prompts(features, self.pad_token_id)
        out["response_ids"], out["response_valid"] = _pad(responses, self.pad_token_id, max(map(len, responses)), False)
        out["index"] = _index(features)
        return out


@dataclass
class DataArgs:
    """Training data as TRL's scripts name it."""

    dataset_name: str = field(
        default=None,
        metadata={
            "help": "Training data: a .jsonl/.json/.parquet file, a folder written by save_to_disk, or a datasets "
            "name already in the local cache (nothing is downloaded; with --streaming, streamed from the hub)."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split of --dataset_name to evaluate on (a dataset with splits)."}
    )
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data file or folder for evaluation."})
    data: str | None = field(default=None, metadata={"help": "Deprecated: use --dataset_name."})

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        deprecated(self, "data", "dataset_name")

    def datasets(self, streaming: bool = False):
        """(train, eval): paths for local files and folders, Dataset objects for cached datasets names (with
        `streaming`, the training split of a datasets name is read from the hub as an IterableDataset)."""
        train = _dataset(self.dataset_name, self.dataset_train_split, streaming)
        if streaming and self.dataset_test_split and not Path(self.dataset_name).exists():
            raise ValueError(
                f"--dataset_test_split {self.dataset_test_split} with --streaming: evaluation reads its data at every "
                "evaluation, so it is not streamed, and this split would be downloaded whole; pass --eval_data FILE"
            )
        test = _dataset(self.dataset_name, self.dataset_test_split) if self.dataset_test_split else None
        return train, self.eval_data or test


def _dataset(name: str, split: str, streaming: bool = False):
    path = Path(name)
    if path.is_file() or (path.is_dir() and not (path / "dataset_dict.json").is_file()):
        return name  # read by dtrpo.data, which names file, line and field in its errors
    if path.is_dir():
        dd = load_rows(path, splits=True)  # a damaged file is named, not a pyarrow traceback
        if split not in dd:
            raise ValueError(f"{name}: no split {split!r} (it has {sorted(dd)})")
        return dd[split]
    if streaming:
        try:
            return datasets.load_dataset(name, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - any failure to open the stream is one message
            raise ValueError(
                f"--dataset_name {name!r} --streaming: not a local file or folder, and no dataset to stream "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
    try:
        return datasets.load_dataset(name, split=split, download_mode="reuse_cache_if_exists")
    except Exception as e:  # noqa: BLE001 - any failure to find it locally is one message
        raise ValueError(
            f"--dataset_name {name!r}: not a local file or folder, and not a dataset in the local datasets cache "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
