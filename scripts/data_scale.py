"""Data at scale: tokenization time, peak memory per process, cache size and second-start time of the
token cache (`dtrpo.data_cache`), against the in-memory builder every process ran before it.

    python scripts/data_scale.py --rows 10000 100000 --out docs/results/data_scale.json
    python scripts/data_scale.py --rows 10000 --before /work/main   # also the old path, from that checkout

Preference rows of realistic lengths (prompts of about 200 byte-level BPE tokens, responses of about
300, as in UltraFeedback) are generated from a Zipf-distributed vocabulary; the BPE tokenizer (about
32k tokens) is trained with `tokenizers` on the first rows, and the character tokenizer is dtrpo's
(`make_char_tokenizer`: every character a token, so prompts and responses reach the limits of 512).
Every measurement runs in a fresh process; memory is the peak resident set (`ru_maxrss`) above the
process's own after its imports, for the process and for its map workers (forked, so their figure
counts pages shared with the parent). For each size and tokenizer:
- first start, 1 and 2 workers (`--dataset_num_proc`): time to tokenize into an empty cache;
- two processes under `torchrun` making the cache together: each one's peak and the CPU seconds it spent
  on data (the process that waits reads the cache the other made);
- second start: a DTRPOTrainer on the same file and cache: seconds to open the data, and from the start of
  the trainer's construction to its first training step (tiny model);
- cache size on disk; and with `--before DIR`, the in-memory builder of that checkout (`dtrpo.data` of
  DIR), once per process (1, and 2 under torchrun), which every start repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LIMITS = {"block_size": 32, "max_prompt_length": 512, "max_completion_length": 512}
PROMPT_WORDS, RESPONSE_WORDS = 160, 240  # about 200 and 300 BPE tokens (measured: `tokens` in the results)

CHILD = r"""
import json, os, resource, sys, time
mode, data, tok_path, cache, num_proc = sys.argv[1:6]
import datasets, torch  # noqa: F401
from transformers import PreTrainedTokenizerFast
from dtrpo.models import make_char_tokenizer
tok = make_char_tokenizer() if tok_path == "char" else PreTrainedTokenizerFast.from_pretrained(tok_path)
L = json.loads(os.environ["SCALE_LIMITS"])
from dtrpo.models import adapter_from_config, make_tiny_model
model = make_tiny_model(tok, block_size=L["block_size"], hidden_size=32, num_layers=1, num_heads=2)
adapter = adapter_from_config(model.config, tok)  # the trainer's block grid and family, so the second start reuses
import logging
class Said(logging.Handler):
    said = []
    def emit(self, record):
        self.said.append(record.getMessage())
logging.getLogger("dtrpo.data_cache").addHandler(Said())
def kib(who=resource.RUSAGE_SELF):
    return resource.getrusage(who).ru_maxrss
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
out = {"base_mib": kib() / 1024}
start, cpu0 = time.perf_counter(), cpu()
if mode == "before":
    from dtrpo.data import build_preference_dataset
    ds, stats = build_preference_dataset(data, tok, L["block_size"], L["max_prompt_length"], L["max_completion_length"])
    out["rows"] = len(ds)
elif mode in ("after", "torchrun"):
    from dtrpo.data import Limits, build_preference_dataset
    from dtrpo.data_cache import cached
    first = __import__("contextlib").nullcontext
    if mode == "torchrun":
        from accelerate import PartialState
        state = PartialState(cpu=True, backend="gloo")
        first = state.local_main_process_first
        start, cpu0 = time.perf_counter(), cpu()
    lim = Limits(adapter.block_size, L["max_prompt_length"], L["max_completion_length"], "truncate",
                  adapter.absolute_grid)
    ds, stats, _ = cached(build_preference_dataset, data, tok, lim, adapter.family, cache, int(num_proc) or None, first)
    out["rows"] = len(ds)
    if mode == "torchrun":
        out["world"] = state.num_processes
elif mode == "second":
    from transformers import TrainerCallback
    from dtrpo import DTRPOConfig, DTRPOTrainer
    import dtrpo.data_cache as C
    opened = {}
    real = C.cached
    def timed(*a, **k):
        t = time.perf_counter(); r = real(*a, **k); opened["s"] = time.perf_counter() - t; return r
    C.cached = timed
    class First(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            opened.setdefault("first_step", time.perf_counter() - start)
            control.should_training_stop = True
    args = DTRPOConfig(output_dir=cache + "-run", max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                       report_to=[], save_strategy="no", disable_tqdm=True, dataset_cache_dir=cache,
                       max_prompt_length=L["max_prompt_length"], max_completion_length=L["max_completion_length"])
    args.world_size  # sets the device up: not data, and paid by every start
    start, cpu0 = time.perf_counter(), cpu()
    trainer = DTRPOTrainer(model, args=args, train_dataset=data, processing_class=tok, callbacks=[First()])
    trainer.train()
    out["rows"], out["open_s"], out["first_step_s"] = len(trainer.train_dataset), opened["s"], opened["first_step"]
out["cache"] = [m.split(":")[0] for m in Said.said if m.startswith(("token cache made", "token cache reused"))]
out["seconds"] = time.perf_counter() - start
out["cpu_s"] = cpu() - cpu0
out["peak_above_imports_mib"] = (kib() / 1024) - out["base_mib"]
out["workers_peak_mib"] = kib(resource.RUSAGE_CHILDREN) / 1024
if "RANK" in os.environ:
    out["rank"] = int(os.environ["RANK"])
    with open(os.path.join(os.environ["SCALE_OUT"], f"rank{out['rank']}.json"), "w") as f:
        json.dump(out, f)
    from dtrpo.teardown import end_process, leave_process_group
    leave_process_group()
    end_process(0)  # a gloo rank left to the interpreter's exit can abort (dtrpo.teardown)
else:
    print("RESULT " + json.dumps(out))
"""


# ----------------------------------------------------------------------------- data and tokenizers


def make_rows(path: Path, n: int, seed: int = 0) -> None:
    """`n` preference rows of Zipf-distributed pseudo-words: a prompt of about PROMPT_WORDS words, a chosen
    and a rejected response of about RESPONSE_WORDS each; written in blocks of 10,000 rows."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    lengths = rng.integers(2, 10, size=60_000)
    vocab = np.array(["".join(rng.choice(letters, size=k)) for k in lengths])
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    weights /= weights.sum()

    def texts(count: int, words: int) -> list[str]:
        sizes = rng.integers(int(words * 0.6), int(words * 1.4), size=count)
        picks = vocab[rng.choice(len(vocab), size=int(sizes.sum()), p=weights)]
        cuts = np.cumsum(sizes)[:-1]
        return [" ".join(part) + "." for part in np.split(picks, cuts)]

    tmp = path.with_suffix(".partial")
    with tmp.open("w") as f:
        for start in range(0, n, 10_000):
            k = min(10_000, n - start)
            rows = zip(texts(k, PROMPT_WORDS), texts(k, RESPONSE_WORDS), texts(k, RESPONSE_WORDS), strict=True)
            f.writelines(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows)
    tmp.rename(path)


def train_bpe(data: Path, folder: Path, rows: int = 20_000, vocab: int = 32_000) -> None:
    """A byte-level BPE tokenizer of `vocab` tokens trained on the first `rows` rows, with pad, EOS and mask."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def text():
        with data.open() as f:
            for i, line in enumerate(f):
                if i == rows:
                    return
                row = json.loads(line)
                yield from (row["prompt"], row["chosen"], row["rejected"])

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|pad|>", "<|eos|>", "<|mask|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=special[0], eos_token=special[1], mask_token=special[2]
    )
    fast.save_pretrained(str(folder))


def mean_tokens(data: Path, tokenizer_path: str, rows: int = 1000) -> dict:
    """Mean prompt and response lengths in tokens over the first rows (before limits)."""
    from transformers import PreTrainedTokenizerFast

    from dtrpo.models import make_char_tokenizer

    tok = make_char_tokenizer() if tokenizer_path == "char" else PreTrainedTokenizerFast.from_pretrained(tokenizer_path)
    with data.open() as f:
        sample = [json.loads(line) for _, line in zip(range(rows), f, strict=False)]
    count = {
        k: float(np.mean([len(tok(r[k], add_special_tokens=False)["input_ids"]) for r in sample])) for k in sample[0]
    }
    return {k: round(v, 1) for k, v in count.items()}


# ----------------------------------------------------------------------------- measurements


def child(mode: str, data: Path, tok: str, cache: Path, num_proc: int = 0, pythonpath: str | None = None) -> dict:
    env = _env(pythonpath)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(data), tok, str(cache), str(num_proc)],
        capture_output=True, text=True, env=env, cwd=str(data.parent),
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def torchrun(mode: str, data: Path, tok: str, cache: Path, pythonpath: str | None = None) -> list[dict]:
    """Two processes under torchrun (gloo, CPU); each one's result."""
    out = cache.with_name(cache.name + "-ranks")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    script = out / "child.py"
    script.write_text(CHILD)
    env = {**_env(pythonpath), "SCALE_OUT": str(out)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(script), "torchrun" if mode == "after" else mode, str(data), tok,
           str(cache), "0"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(data.parent))
    if run.returncode:
        raise SystemExit(f"torchrun {mode} failed:\n{run.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def _env(pythonpath: str | None) -> dict:
    repo = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": pythonpath or repo, "OMP_NUM_THREADS": "1", "SCALE_LIMITS": json.dumps(LIMITS)}


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def measure(n: int, tok_name: str, tok: str, data: Path, work: Path, before: str | None, log, skip: tuple = ()) -> dict:
    """Every measurement of one size and tokenizer."""
    result = {"rows": n, "tokenizer": tok_name, "file_mib": round(data.stat().st_size / 2**20, 1)}
    caches = {k: work / f"cache-{n}-{tok_name}-{k}" for k in ("w1", "w2", "tr")}
    for c in caches.values():
        shutil.rmtree(c, ignore_errors=True)
    if before:
        result["before_1proc"] = child("before", data, tok, work / "unused", 0, before)
        log(f"  before, 1 process: {_short(result['before_1proc'])}")
        if "before_torchrun2" not in skip:
            result["before_torchrun2"] = torchrun("before", data, tok, work / "unused", before)
            log(f"  before, torchrun 2: {[_short(r) for r in result['before_torchrun2']]}")
    result["after_1worker"] = child("after", data, tok, caches["w1"], 1)
    log(f"  after, 1 worker: {_short(result['after_1worker'])}")
    result["cache_mib"] = round(size_mib(caches["w1"]), 1)
    result["after_2workers"] = child("after", data, tok, caches["w2"], 2)
    log(f"  after, 2 workers: {_short(result['after_2workers'])}")
    shutil.rmtree(caches["w2"], ignore_errors=True)
    result["after_torchrun2"] = torchrun("after", data, tok, caches["tr"])
    log(f"  after, torchrun 2: {[_short(r) for r in result['after_torchrun2']]}")
    shutil.rmtree(caches["tr"], ignore_errors=True)
    result["second_start"] = child("second", data, tok, caches["w1"])
    log(f"  second start: {_short(result['second_start'])}")
    shutil.rmtree(caches["w1"], ignore_errors=True)
    shutil.rmtree(str(caches["w1"]) + "-run", ignore_errors=True)
    return result


def _short(r: dict) -> str:
    keys = ("seconds", "cpu_s", "peak_above_imports_mib", "workers_peak_mib", "open_s", "first_step_s")
    return ", ".join(f"{k} {r[k]:.2f}" for k in keys if k in r)


def tables(runs: list[dict]) -> str:
    """The results as two markdown tables: seconds (wall, with CPU seconds), and MiB above imports."""
    runs = sorted(runs, key=lambda r: (r["rows"], r["tokenizer"]))

    def t(r: dict) -> str:
        return f"{r['seconds']:.1f} ({r['cpu_s']:.1f})"

    def m(r: dict) -> str:
        return f"{r['peak_above_imports_mib']:.0f}"

    def ranks(rs: list[dict], f) -> str:
        return " / ".join(f(r) for r in sorted(rs, key=lambda r: r["cache"] != ["token cache made"]))

    def worker(r: dict) -> str:  # a forked worker's whole peak: it shares its imports' pages with the main process
        return f"{r['workers_peak_mib']:.0f}"

    head = "| rows | tokenizer | tokens p/c/r |"
    out = [
        "Seconds, wall (CPU); torchrun: the process that made the cache / the one that waited:",
        "",
        head + " before, 1 process | before, torchrun 2 | after, 1 worker | after, 2 workers | after, torchrun 2 | "
        "second start: open data | to first step | open / first tokenization |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        tok, second = "/".join(f"{v:.0f}" for v in r["tokens"].values()), r["second_start"]
        before = t(r["before_1proc"]) if "before_1proc" in r else "-"
        each = " / ".join(t(x) for x in r["before_torchrun2"]) if "before_torchrun2" in r else "not run"
        out.append(
            f"| {r['rows']:,} | {r['tokenizer']} | {tok} | {before} | {each} | {t(r['after_1worker'])} | "
            f"{t(r['after_2workers'])} | {ranks(r['after_torchrun2'], t)} | {second['open_s']:.2f} | "
            f"{second['first_step_s']:.1f} | {100 * second['open_s'] / r['after_1worker']['seconds']:.1f}% |"
        )
    out += [
        "",
        "Peak resident memory above imports, MiB (2 workers: the main process above its imports / a forked "
        "worker's whole peak, imports included); cache on disk:",
        "",
        head + " before, 1 process | before, each of torchrun 2 | after, 1 worker | after, 2 workers | "
        "after, torchrun 2 | file MiB | cache MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        tok = "/".join(f"{v:.0f}" for v in r["tokens"].values())
        before = m(r["before_1proc"]) if "before_1proc" in r else "-"
        each = " / ".join(m(x) for x in r["before_torchrun2"]) if "before_torchrun2" in r else "not run"
        two = f"{m(r['after_2workers'])} / {worker(r['after_2workers'])}"
        out.append(
            f"| {r['rows']:,} | {r['tokenizer']} | {tok} | {before} | {each} | {m(r['after_1worker'])} | {two} | "
            f"{ranks(r['after_torchrun2'], m)} | {r['file_mib']:.0f} | {r['cache_mib']:.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000], help="Dataset sizes in rows.")
    parser.add_argument("--tokenizers", nargs="+", default=["bpe", "char"], help="bpe and/or char.")
    parser.add_argument("--before", default=None, help="A checkout whose dtrpo.data is measured as the old path.")
    parser.add_argument("--work", default="/tmp/dtrpo_data_scale", help="Folder of the data files and caches.")
    parser.add_argument("--out", default=None, help="JSON file of the results (printed too).")
    parser.add_argument(
        "--bpe_rows", type=int, default=10_000, help="Rows the BPE tokenizer is trained on (the first ones)."
    )
    parser.add_argument("--skip", nargs="*", default=[], help="Measurements left out: before_torchrun2.")
    parser.add_argument("--keep_data", action="store_true", help="Keep the generated data files.")
    parser.add_argument("--table", nargs="*", default=None, help="Print the tables of these result files and stop.")
    args = parser.parse_args()
    if args.table is not None:
        print(tables([run for f in args.table for run in json.loads(Path(f).read_text())["runs"]]))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(text, flush=True)

    results = {"limits": LIMITS, "cpus": os.cpu_count(), "runs": []}
    for n in args.rows:
        data = work / f"rows-{n}.jsonl"
        if not data.is_file():
            t = time.perf_counter()
            make_rows(data, n)
            log(f"{n} rows: wrote {data} ({data.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s")
        bpe = work / f"bpe-{args.bpe_rows}"
        if "bpe" in args.tokenizers and not bpe.is_dir():
            train_bpe(work / f"rows-{n}.jsonl", bpe, min(args.bpe_rows, n))
        for name in args.tokenizers:
            tok = str(bpe) if name == "bpe" else "char"
            log(f"{n} rows, {name} tokenizer:")
            run = measure(n, name, tok, data, work, args.before, log, tuple(args.skip))
            run["tokens"] = mean_tokens(data, tok)
            results["runs"].append(run)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        if not args.keep_data:
            data.unlink()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
