"""Verifiable tasks: prompts with references, and a score for each response.

A task gives `prompts(split, n, seed)`, rows that are dicts with at least `id`, `prompt` and
`answer` (the reference), and `score(row, response) -> float`: 1.0 / 0.0 for a verifier, any float
for a reward function. Preference pairs come from scoring several generations of one prompt;
evaluation averages the scores on the `heldout` split. `score_batch` is the checked way to score: it
names the item when a scorer raises or returns something that is not a number.

`load_task` resolves a spec: a built-in name from `TASKS` with options (`"arithmetic:digits=3"`), or a
prompts file (.jsonl / .json) scored by exact or numeric match against each row's answer, by a
reward function `"module:function"`, or by a reward model folder (`dtrpo.reward_model`, scored in batches).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import numbers
import random
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dtrpo.data import json_rows, unicode_text
from dtrpo.families import ModelArgs

if TYPE_CHECKING:
    from dtrpo.reward_model import RewardModel

SPLITS = ("train", "heldout")
MATCHES = ("exact", "numeric")
HELDOUT_PER_MILLE = 100  # a tenth of all arithmetic problems is held out, chosen by a hash of the problem
NUMERIC_TOL = Decimal("1e-6")
# a number, with optional thousands separators ("1,080") as GSM8K-style answers write them
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")

Reward = Callable[[str, str, dict], float]


class Task(Protocol):
    name: str

    def prompts(self, split: str, n: int | None = None, seed: int = 0) -> list[dict]: ...

    def score(self, row: dict, response: str) -> float: ...


# ---------------------------------------------------------------------------------------------------
# Built-in: column arithmetic with the work written out


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def problem_split(problem: str) -> str:
    """The split a problem ("47+85") belongs to, fixed by a hash of its text whatever the seed or n."""
    h = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "big")
    return "heldout" if h % 1000 < HELDOUT_PER_MILLE else "train"


def distinct_problems(name: str, split: str, n: int | None, draw: Callable[[], tuple[str, str]]) -> list[str]:
    """`n` (default 100) distinct problems of `split`, in the order `draw` first gives them. `draw()` returns a
    problem and the text whose hash fixes its split (`problem_split`); draws of the other split or repeats are
    skipped, and 10,000 misses in a row mean the split has fewer distinct problems than asked."""
    _check_split(split)
    n = 100 if n is None else n
    problems: dict[str, None] = {}
    misses = 0
    while len(problems) < n:
        problem, hashed = draw()
        if problem in problems or problem_split(hashed) != split:
            misses += 1
            if misses > 10_000:
                raise ValueError(f"{name}: found only {len(problems)} distinct {split} problems, {n} asked")
            continue
        misses = 0
        problems[problem] = None
    return list(problems)


# one column, right to left: (x, y, carry in) -> (carry out, written digit); "-" borrows instead of carrying
_COLUMN = {
    "+": lambda x, y, c: divmod(x + y + c, 10),
    "-": lambda x, y, c: (int(x - y - c < 0), (x - y - c) % 10),
    "*": lambda x, y, c: divmod(x * y + c, 10),
}


def worked_answer(a: int, op: str, b: int, digits: int, forget_carry: bool = False) -> str:
    """The answer text of `a op b` in the format of `Arithmetic` (requires a >= b for "-").

    `forget_carry` writes the work of a pupil who never adds the carry into the next column (each column
    still shows its own carry): 47+85 -> "12,12=122" instead of "12,13=132"."""
    xs = str(a).zfill(digits)[::-1]
    ys = str(b) * digits if op == "*" else str(b).zfill(digits)[::-1]
    carry, entries, written = 0, [], []
    for x, y in zip(xs, ys, strict=True):
        carry, digit = _COLUMN[op](int(x), int(y), 0 if forget_carry else carry)
        entries.append(f"{carry}{digit}")
        written.append(str(digit))
    return ",".join(entries) + "=" + str(carry) + "".join(reversed(written))


def read_result(text: str) -> int | None:
    """The integer right after the first "=" (later text, EOS or junk, is ignored); without "=", the last
    integer of the text. None when there is none."""
    _, eq, tail = text.partition("=")
    if eq:
        m = re.match(r"\s*(\d+)", tail)
        return int(m.group(1)) if m else None
    found = re.findall(r"\d+", text)
    return int(found[-1]) if found else None


@dataclass(frozen=True)
class Arithmetic:
    """Multi-digit arithmetic whose answer writes out one column at a time, right to left.

    Prompt `"47+85="`, answer `"12,13=132"`: one two-character entry per column, the column's carry
    (the borrow for "-") then the digit written down, separated by ","; then "=" and the result with
    `digits + 1` digits, which is the last carry followed by the written digits read left to right (so
    it can start with 0). Every answer of a task has the same length, 4 * digits + 1 characters: two
    blocks of 8 for digits 2-3, three for 4-5, four for 6-7 (with EOS too).

        47+85=  ->  12,13=132   7+5 = 12: write 2, carry 1; 4+8+1 = 13
        85-47=  ->  18,03=038   5-7: borrow 1, write 8; 8-4-1 = 3
        47*6=   ->  42,28=282   7*6 = 42: write 2, carry 4; 4*6+4 = 28

    Operands have exactly `digits` digits (0-9 for one digit); "-" puts the larger operand first so the
    result is never negative; "*" uses a one-digit multiplier (2-9) so the work stays one row. The
    verifier compares the number right after the first "=" of the response with the exact result.
    A problem's split is fixed by a hash of its text, so `train` and `heldout` never share a problem.
    """

    digits: int = 2
    ops: str = "+"

    def __post_init__(self) -> None:
        if self.digits < 1:
            raise ValueError(f"arithmetic: digits must be >= 1, got {self.digits}")
        if not self.ops or set(self.ops) - set(_COLUMN):
            raise ValueError(f"arithmetic: ops must be a non-empty string of {''.join(_COLUMN)!r}, got {self.ops!r}")

    @property
    def name(self) -> str:
        return f"arithmetic:digits={self.digits},ops={self.ops}"

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        lo, hi = (0 if self.digits == 1 else 10 ** (self.digits - 1)), 10**self.digits - 1
        op, a = rng.choice(self.ops), rng.randint(lo, hi)
        if op == "*":
            return a, op, rng.randint(2, 9)
        b = rng.randint(lo, hi)
        return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)

    def prompts(self, split: str, n: int | None = None, seed: int = 0) -> list[dict]:
        """`n` distinct problems of `split` (default 100), the same for the same arguments."""
        rng = random.Random(f"arithmetic:{split}:{seed}")

        parts: dict[str, tuple[int, str, int]] = {}

        def draw() -> tuple[str, str]:
            a, op, b = self._draw(rng)
            parts[f"{a}{op}{b}"] = (a, op, b)
            return f"{a}{op}{b}", f"{a}{op}{b}"

        rows = []
        for problem in distinct_problems(self.name, split, n, draw):
            answer = worked_answer(*parts[problem], self.digits)
            rows.append({"id": problem, "prompt": problem + "=", "answer": answer})
        return rows

    def score(self, row: dict, response: str) -> float:
        got = read_result(response)
        return float(got is not None and got == read_result(row["answer"]))


@dataclass(frozen=True)
class NoisyArithmetic(Arithmetic):
    """`Arithmetic` taught by a noisy teacher: the task where preference signal is the right tool.

    Prompts, answers, splits and the verifier are those of `Arithmetic`; train rows also carry a
    `demonstration`, the teacher's worked answer, which on a problem with a carry forgets the carry
    (`worked_answer(..., forget_carry=True)`, wrong result, consistent work) with probability `drop`,
    drawn per problem and seed. With `drop > 0.5` the wrong answer is the *mode* of the SFT data on carry
    problems, so an SFT model that fits its data decodes it greedily, and more SFT only sharpens it; yet
    about `1 - drop` of its samples at temperature 1 are right, so the verifier finds pairs whose chosen
    side holds exactly what the SFT data lacks. Problems without a carry are always taught right.
    """

    drop: float = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.drop <= 1:
            raise ValueError(f"noisy_arithmetic: drop must be in [0, 1], got {self.drop}")

    @property
    def name(self) -> str:
        return f"noisy_arithmetic:digits={self.digits},ops={self.ops},drop={self.drop}"

    def prompts(self, split: str, n: int | None = None, seed: int = 0) -> list[dict]:
        rows = super().prompts(split, n, seed)
        for row in rows:
            a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", row["id"]).groups()
            wrong = worked_answer(int(a), op, int(b), self.digits, forget_carry=True)
            forget = wrong != row["answer"] and random.Random(f"teacher:{row['id']}:{seed}").random() < self.drop
            row["demonstration"] = wrong if forget else row["answer"]
        return rows


@dataclass(frozen=True)
class NoisySort:
    """Sort a string of digits, taught by a noisy teacher and scored with partial credit.

    Prompt `"52918>"`, answer `"12589"`: the prompt's `length` digits in ascending order. The score is the
    fraction of the answer's positions the response gets right (its first `length` characters against the
    answer's), so a response can be half right: a reward, not a verifier. Train rows carry the teacher's
    `demonstration`, which with probability `drop` (per problem and seed) writes the two largest digits in
    the wrong order whenever they differ (`"12598"`, score 0.6): a consistent mistake that SFT learns as the
    mode, as `NoisyArithmetic`'s forgotten carry is. A problem's split is fixed by a hash of its text.

        52918>  ->  12589   (the teacher, 60% of the time: 12598)
        33110>  ->  01133   (the two largest are equal: always taught right)
    """

    length: int = 5
    drop: float = 0.6

    def __post_init__(self) -> None:
        if not 2 <= self.length <= 20:
            raise ValueError(f"noisy_sort: length must be in [2, 20], got {self.length}")
        if not 0 <= self.drop <= 1:
            raise ValueError(f"noisy_sort: drop must be in [0, 1], got {self.drop}")

    @property
    def name(self) -> str:
        return f"noisy_sort:length={self.length},drop={self.drop}"

    def prompts(self, split: str, n: int | None = None, seed: int = 0) -> list[dict]:
        """`n` distinct problems of `split` (default 100), the same for the same arguments."""
        rng = random.Random(f"noisy_sort:{split}:{seed}")

        def draw() -> tuple[str, str]:
            digits = "".join(rng.choice("0123456789") for _ in range(self.length))
            return digits, "sort:" + digits

        rows = []
        for digits in distinct_problems(self.name, split, n, draw):
            answer = "".join(sorted(digits))
            wrong = answer[:-2] + answer[-1] + answer[-2]
            forget = wrong != answer and random.Random(f"sort-teacher:{digits}:{seed}").random() < self.drop
            demonstration = wrong if forget else answer
            rows.append({"id": digits, "prompt": digits + ">", "answer": answer, "demonstration": demonstration})
        return rows

    def score(self, row: dict, response: str) -> float:
        answer = row["answer"]
        return sum(a == b for a, b in zip(answer, response.strip(), strict=False)) / len(answer)


def demonstration(row: dict) -> str:
    """The SFT target of a task row: its teacher's `demonstration` when it has one, else its answer."""
    return row.get("demonstration", row["answer"])


TASKS = {"arithmetic": Arithmetic, "noisy_arithmetic": NoisyArithmetic, "noisy_sort": NoisySort}


def _parse_options(cls: type, text: str) -> dict:
    """Options text to keyword arguments, each value of the type of its default: "digits=3" -> {"digits": 3}."""
    known = {f.name: f.default for f in fields(cls)}
    options = {}
    for item in filter(None, text.split(",")):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in known:
            raise ValueError(f"task option {item!r}: expected key=value with key one of {sorted(known)}")
        try:
            options[key] = type(known[key])(value)
        except ValueError:
            raise ValueError(f"task option {key}={value!r}: expected {type(known[key]).__name__}") from None
    return options


# ---------------------------------------------------------------------------------------------------
# User tasks: a prompts file with references or a reward function


def last_number(text: str) -> Decimal | None:
    """The last number in `text` ("1,080" reads as 1080), exactly as written; None when there is none."""
    found = NUMBER.findall(text)
    return Decimal(found[-1].replace(",", "")) if found else None


@dataclass
class FileTask:
    """Rows of a prompts file, scored by `match` against `answer`, by a reward function or by a reward model.

    A row may carry `split` ("train" / "heldout"); a row without one is in every split. `match="exact"`
    compares stripped strings; `"numeric"` compares the last number of the response with the last
    number of the answer, within 1e-6. The file is read line by line each time prompts are drawn
    (a .json list is read whole), so a file of any size costs the memory of the rows drawn.
    """

    path: Path
    match: str = "exact"
    reward: Reward | None = None
    prompt_field: str = "prompt"
    reward_name: str | None = None  # "module:function", as given: what made a run's scores
    content: str | None = None  # a digest of the file's bytes (`file_digest`): an edited file is another task
    reward_model: RewardModel | None = None  # scores whole batches in `score_batch`

    @property
    def name(self) -> str:
        return str(self.path)

    def rows(self) -> Iterator[dict]:
        """Every row, checked, in file order; an error names the file, the line and the field."""
        for index, (line, row) in enumerate(json_rows(self.path)):
            yield _check_row(f"{self.path}: line {line}", row, index, self)

    def prompts(self, split: str, n: int | None = None, seed: int = 0) -> list[dict]:
        """The rows of `split`: all of them in file order, or at most `n` drawn with `seed` (kept in file order)."""
        return list(self.stream(split, n, seed))

    def stream(self, split: str, n: int | None = None, seed: int = 0) -> Iterator[dict]:
        """`prompts` one row at a time: without `n`, read lazily, so a consumer that keeps one chunk of rows
        holds one chunk of the file; with `n`, the n rows drawn (reservoir sampling keeps only those)."""
        _check_split(split)
        rows = (row for row in self.rows() if row.get("split", split) == split)
        return rows if n is None else iter(_reservoir(rows, n, seed))

    def score(self, row: dict, response: str) -> float:
        if self.reward_model is not None:
            return self.reward_model.score([row["prompt"]], [response])[0]
        if self.reward is not None:
            return self.reward(row["prompt"], response, row)
        if self.match == "exact":
            return float(response.strip() == row["answer"].strip())
        got = last_number(response)
        return float(got is not None and abs(got - last_number(row["answer"])) <= NUMERIC_TOL)


def _reservoir(rows: Iterator[dict], n: int, seed: int) -> list[dict]:
    """At most `n` of `rows` drawn uniformly with `seed`, in their original order; n rows in memory."""
    rng, kept = random.Random(seed), []
    for i, row in enumerate(rows):
        if i < n:
            kept.append((i, row))
        elif (j := rng.randrange(i + 1)) < n:
            kept[j] = (i, row)
    return [row for _, row in sorted(kept, key=lambda t: t[0])]


def stream_prompts(task: Task, split: str, n: int | None = None, seed: int = 0) -> Iterator[dict]:
    """A task's prompts one row at a time: a prompts file streams them (`FileTask.stream`); a task that only
    has `prompts` (the built-ins, which make their rows in memory) gives its list."""
    stream = getattr(task, "stream", None)
    return stream(split, n, seed) if stream is not None else iter(task.prompts(split, n, seed))


class RewardTimeout(BaseException):
    """A reward call ran past its time limit. Not an `Exception`, so that a reward's own `except Exception`
    does not swallow it."""


def timed(fn: Reward, seconds: float) -> Reward:
    """`fn`, stopped by `RewardTimeout` when one call runs longer than `seconds`: by SIGALRM in the main
    thread (which interrupts Python code and sleeps); elsewhere the call runs in a daemon thread that is
    abandoned when late."""

    def expire(signum, frame):
        raise RewardTimeout(seconds)

    def in_thread(*args):
        out = {}
        worker = threading.Thread(target=lambda: out.update(value=fn(*args)), daemon=True)
        worker.start()
        worker.join(seconds)
        if worker.is_alive():
            raise RewardTimeout(seconds)
        return out.get("value")  # None when fn raised: refused as not a number

    def call(*args):
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
            return in_thread(*args)
        before = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, before)

    return call


REWARD_SIGNATURE = "reward(prompt, response) -> float or reward(prompt, response, row) -> float"


def import_reward(spec: str) -> Reward:
    """The reward function named by "module:function", called as `reward(prompt, response, row)`."""
    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name and attr):
        raise ValueError(f"reward function {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ImportError(f"reward function {spec!r}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ImportError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr!r}")
    return as_reward(fn, spec)


def as_reward(fn, name: str = "") -> Reward:
    """`fn` as a three-argument reward: `reward(prompt, response)` and `reward(prompt, response, row)` are
    accepted (the row is the prompts-file row, with `id`, `prompt`, `answer` and any other field); any
    other signature is refused here, before a model is loaded, with the expected one."""
    name = name or getattr(fn, "__name__", repr(fn))
    if not callable(fn):
        raise ValueError(
            f"reward function {name!r} is a {type(fn).__name__}, not callable: expected {REWARD_SIGNATURE}"
        )
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins): called with three arguments
        return fn
    kinds = inspect.Parameter
    if any(p.kind == kinds.VAR_POSITIONAL for p in params):
        return fn
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    required += [p for p in params if p.kind == kinds.KEYWORD_ONLY and p.default is p.empty]
    if len(positional) >= 3 and len(required) <= 3:
        return fn
    if len(positional) == 2 and len(required) <= 2:
        return lambda prompt, response, row: fn(prompt, response)
    raise ValueError(
        f"reward function {name!r} takes ({', '.join(p.name for p in params)}); expected {REWARD_SIGNATURE}"
    )


def _check_row(where: str, row: object, index: int, task: FileTask) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt = row.get(task.prompt_field)
    if prompt is None:
        raise ValueError(f"{where}: field {task.prompt_field!r} is missing; the row has keys {sorted(row)}")
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: field {task.prompt_field!r} must be a string, got {type(prompt).__name__}")
    unicode_text(prompt, where, task.prompt_field)
    row = {**row, "prompt": prompt}
    has_reward = task.reward is not None or task.reward_model is not None
    if "answer" not in row and not has_reward:
        raise ValueError(
            f"{where}: field 'answer' is missing and no reward function (--reward module:function) or reward model "
            "(--reward_model PATH) given"
        )
    if row.get("split", "train") not in SPLITS:
        raise ValueError(f"{where}: field 'split' is {row['split']!r}, not one of {SPLITS}")
    answer = str(row.get("answer", ""))
    if task.match == "numeric" and not has_reward and last_number(answer) is None:
        raise ValueError(f"{where}: field 'answer' {answer!r} has no number to match numerically")
    return {**row, "id": str(row.get("id", index)), "answer": answer}


def load_prompts_file(
    path: str | Path,
    match: str = "exact",
    reward: str | Reward | None = None,
    prompt_field: str = "prompt",
    reward_timeout: float | None = None,
    reward_model: str | Path | RewardModel | None = None,
    reward_batch_size: int = 16,
    reward_dtype: str = "float32",
) -> FileTask:
    """A `FileTask` from a .jsonl / .json file of rows with `prompt` and `answer` (or a reward function,
    each call limited to `reward_timeout` seconds when given, or a reward model folder, loaded last with
    `reward_batch_size` and `reward_dtype`). `prompt_field` names another field to read prompts from
    (GSM8K's files call it `question`). Every row is checked here, one line at a time, so that a bad row
    stops the run before a model loads."""
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; expected one of {MATCHES}")
    if reward is not None and reward_model is not None:
        raise ValueError("--reward and --reward_model both given: score with one, a function or a model")
    if reward_timeout is not None and reward_model is not None:
        raise ValueError("--reward_timeout limits a reward function, not --reward_model")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    if isinstance(reward_model, str | Path):
        from dtrpo.reward_model import check_reward_model

        check_reward_model(reward_model)  # its config, before the rows are read and any weight loads
    fn = import_reward(reward) if isinstance(reward, str) else None if reward is None else as_reward(reward)
    if reward_timeout is not None:
        if fn is None:
            raise ValueError("--reward_timeout limits a reward function: give one with --reward module:function")
        fn = timed(fn, reward_timeout)
    name = reward if isinstance(reward, str) else None if reward is None else getattr(reward, "__qualname__", None)
    task = FileTask(path, match, fn, prompt_field, name, file_digest(path))
    task.reward_model = reward_model  # a folder's path while the rows are checked (rows then need no answer)
    if not sum(1 for _ in task.rows()):
        raise ValueError(f"{path}: no rows")
    if isinstance(reward_model, str | Path):
        from dtrpo.reward_model import RewardModel

        task.reward_model = RewardModel(reward_model, reward_batch_size, reward_dtype)
    return task


def file_digest(path: Path) -> str:
    """A digest of a file's bytes, read in pieces: prompts, answers and every other field of every row."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def load_task(
    spec: str,
    match: str | None = None,
    reward: str | Reward | None = None,
    prompt_field: str = "prompt",
    reward_timeout: float | None = None,
    reward_model: str | Path | RewardModel | None = None,
    reward_batch_size: int = 16,
    reward_dtype: str = "float32",
) -> Task:
    """A built-in task ("arithmetic", "arithmetic:digits=3,ops=+-") or a prompts file ("data.jsonl").

    `match` ("exact" by default, or "numeric"), `reward` ("module:function"), `reward_timeout` (seconds
    per reward call) and `reward_model` (a reward model folder, scored `reward_batch_size` texts at a time
    in `reward_dtype`) apply to prompts files.
    """
    if spec.endswith((".jsonl", ".json")):
        return load_prompts_file(
            spec, match or "exact", reward, prompt_field, reward_timeout, reward_model, reward_batch_size, reward_dtype
        )
    name, _, options = spec.partition(":")
    if name not in TASKS:
        raise ValueError(f"unknown task {spec!r}: not a built-in ({', '.join(TASKS)}) nor a .jsonl/.json prompts file")
    if match is not None or reward is not None or reward_timeout is not None:
        raise ValueError(f"task {spec!r}: match, reward and reward_timeout apply to prompts files, not to built-ins")
    if reward_model is not None:
        raise ValueError(f"task {spec!r}: reward_model applies to prompts files, not to built-ins")
    return TASKS[name](**_parse_options(TASKS[name], options))


# ---------------------------------------------------------------------------------------------------
# Checked scoring


def _describe(row: dict) -> str:
    return f"item id={row.get('id')!r} (prompt {str(row.get('prompt', ''))[:80]!r})"


def score_batch(task: Task, rows: list[dict], responses: list[str]) -> list[float]:
    """`task.score` of each (row, response) as floats. Anything that goes wrong in a scorer (an exception, a
    value that is not a number, NaN or infinite, a call past its time limit) is one `ValueError` that names
    the item."""
    if len(rows) != len(responses):
        raise ValueError(f"{task.name}: {len(rows)} rows but {len(responses)} responses")
    batched = _model_scores(task, rows, responses)
    scores = []
    for i, (row, response) in enumerate(zip(rows, responses, strict=True)):
        try:
            value = task.score(row, response) if batched is None else batched[i]
        except RewardTimeout as e:
            raise ValueError(
                f"{task.name}: scoring {_describe(row)} did not return within {e.args[0]} s (--reward_timeout)"
            ) from None
        except SystemExit as e:  # not an Exception: it would end the run with the reward's code and no word
            raise ValueError(
                f"{task.name}: scoring {_describe(row)} called sys.exit({e.code!r}); a reward returns a number"
            ) from None
        except Exception as e:
            raise ValueError(f"{task.name}: scoring {_describe(row)} raised {type(e).__name__}: {e}") from e
        if not isinstance(value, numbers.Real):
            raise ValueError(
                f"{task.name}: scoring {_describe(row)} returned {value!r} ({type(value).__name__}), not a number"
            )
        if not math.isfinite(value):
            raise ValueError(f"{task.name}: scoring {_describe(row)} returned {value}, not a finite number")
        scores.append(float(value))
    return scores


def _model_scores(task: Task, rows: list[dict], responses: list[str]) -> list[float] | None:
    """A reward model's scores of every (row, response), in its batches; None for a task scored item by item.
    An error names the first item of the batch and the reward model."""
    model = getattr(task, "reward_model", None)
    if model is None or not rows:
        return None
    try:
        return model.score([row["prompt"] for row in rows], responses)
    except Exception as e:
        raise ValueError(
            f"{task.name}: the reward model {model.path} scoring {len(rows)} items from {_describe(rows[0])} raised "
            f"{type(e).__name__}: {e}"
        ) from e


@dataclass
class TaskSpec(ModelArgs):
    """The model and the task it is scored on, as `eval`, `pairs` and `iterate` take them."""

    task: str = field(default="arithmetic", metadata={"help": "Built-in task (arithmetic:digits=3) or prompts file."})
    match: str | None = field(default=None, metadata={"help": "Prompts file answers: 'exact' or 'numeric' match."})
    reward: str | None = field(
        default=None,
        metadata={
            "help": "Reward function 'module:function' for a prompts file, called as reward(prompt, response) or "
            "reward(prompt, response, row) (row: the file's row as a dict) and returning a float."
        },
    )
    reward_timeout: float | None = field(
        default=None,
        metadata={"help": "Seconds one --reward call may take; past it the run stops, naming the item."},
    )
    reward_model: str | None = field(
        default=None,
        metadata={
            "help": "Reward model folder (transformers sequence-classification, one label) scoring a prompts file's "
            "responses instead of --reward: its own tokenizer and chat template, on the training device, in --dtype."
        },
    )
    reward_batch_size: int = field(default=16, metadata={"help": "Texts per --reward_model forward pass."})
    prompt_field: str = field(
        default="prompt", metadata={"help": "Field of a prompts file holding the prompt (GSM8K: question)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward is not None and self.reward_model is not None:
            raise ValueError("--reward and --reward_model both given: score with one, a function or a model")
        if self.reward_batch_size <= 0:
            raise ValueError(f"--reward_batch_size must be positive, got {self.reward_batch_size}")
        if self.reward_timeout is not None and not 0 < self.reward_timeout < float("inf"):
            raise ValueError(f"--reward_timeout must be a positive number of seconds, got {self.reward_timeout}")

    def load_task(self):
        """The task with its scorer (a reward model loaded last, after every check)."""
        return load_task(
            self.task,
            self.match,
            self.reward,
            self.prompt_field,
            self.reward_timeout,
            self.reward_model,
            self.reward_batch_size,
            self.dtype,
        )


@dataclass
class TaskArgs(TaskSpec):
    split: str | None = field(
        default=None,
        metadata={
            "help": "Split of the task's prompts: train or heldout (default: heldout for eval, train for pairs)."
        },
    )
    n: int | None = field(default=None, metadata={"help": "Number of prompts (default: the task's default / all)."})
    output: str = field(default=None, metadata={"help": "File to write (JSON report or JSONL)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n is not None and self.n <= 0:
            raise ValueError(f"--n must be positive, got {self.n}: no prompts, nothing to measure")

    def check_output(self, kind: str) -> None:
        """Before any work: `--output` (and its items file, `<output>.<kind>.jsonl`) is a file to write, not
        a folder nor the prompts file read."""
        if not self.output:
            return
        output = Path(self.output)
        if output.is_dir():
            raise ValueError(f"--output {output} is a folder; it names the file to write")
        task = Path(self.task)
        for path in (output, output.with_suffix(f".{kind}.jsonl")):
            if task.is_file() and path.exists() and path.samefile(task):  # also through a link
                raise ValueError(f"--output {output} would overwrite the prompts file --task {self.task}")
