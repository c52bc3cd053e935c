"""`--streaming` at scale: time to the first batch and peak memory of a streamed run's data, at several file sizes,
each in a fresh process; nothing of the file is held whole, so both stay flat as the file grows.

    python scripts/stream_scale.py --rows 10000 100000 --out docs/results/stream_scale.json

The rows and tokenizers are those of `scripts/data_scale.py` (preference rows of UltraFeedback-like lengths; a
byte-level BPE tokenizer trained on the first rows, or dtrpo's character tokenizer). Each run builds a
DTRPOTrainer on the tiny model with `streaming=True`, shuffled in the buffer (random) or in file order (sequential),
and reads `--batches` batches of 2 pairs from the Trainer's own training dataloader (what training steps would
take, without the steps, whose logits at 32k tokens of vocabulary would dwarf the data); memory is the peak resident
set (`ru_maxrss`) above the process's own after its imports, at the first batch and after the last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
data, tok_path, order, batches, out_dir = sys.argv[1:6]
import datasets, torch  # noqa: F401
from transformers import PreTrainedTokenizerFast
from dtrpo import DTRPOConfig, DTRPOTrainer
from dtrpo.models import make_char_tokenizer, make_tiny_model
L = json.loads(os.environ["SCALE_LIMITS"])
tok = make_char_tokenizer() if tok_path == "char" else PreTrainedTokenizerFast.from_pretrained(tok_path)
model = make_tiny_model(tok, block_size=L["block_size"], hidden_size=32, num_layers=1, num_heads=2)
args = DTRPOConfig(output_dir=out_dir, max_steps=int(batches), per_device_train_batch_size=2, use_cpu=True,
                   report_to=[], save_strategy="no", disable_tqdm=True, streaming=True, train_sampling_strategy=order,
                   max_prompt_length=L["max_prompt_length"], max_completion_length=L["max_completion_length"])
args.world_size  # sets the device up: not data
def kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
out = {"base_mib": kib() / 1024}
start, cpu0 = time.perf_counter(), cpu()
trainer = DTRPOTrainer(model, args=args, train_dataset=data, processing_class=tok)
loader = iter(trainer.get_train_dataloader())  # the Trainer's own, prepared by accelerate
first = next(loader)
out["first_batch_s"], out["first_batch_mib"] = time.perf_counter() - start, kib() / 1024 - out["base_mib"]
n, rows = 1, len(first["index"])
for batch in loader:
    n, rows = n + 1, rows + len(batch["index"])
    if n == int(batches):
        break
out["batches"], out["pairs"] = n, rows
out["seconds"], out["cpu_s"] = time.perf_counter() - start, cpu() - cpu0
out["peak_above_imports_mib"] = kib() / 1024 - out["base_mib"]
print("RESULT " + json.dumps(out))
"""


def data_scale():
    """scripts/data_scale.py, for its rows, tokenizer and limits."""
    spec = importlib.util.spec_from_file_location("data_scale", Path(__file__).with_name("data_scale.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_scale"] = module
    spec.loader.exec_module(module)
    return module


def child(data: Path, tok: str, order: str, batches: int, limits: dict) -> dict:
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1", "SCALE_LIMITS": json.dumps(limits)}
    out = data.with_name(f"{data.stem}-run")
    cmd = [sys.executable, "-c", CHILD, str(data), tok, order, str(batches), str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(data.parent))
    if run.returncode:
        raise SystemExit(f"streamed run failed:\n{run.stderr[-3000:]}")
    return json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000], help="File sizes in rows.")
    parser.add_argument("--tokenizers", nargs="+", default=["bpe", "char"], help="bpe and/or char.")
    parser.add_argument("--batches", type=int, default=2500, help="Batches of 2 pairs each run reads.")
    parser.add_argument("--bpe_rows", type=int, default=10_000, help="Rows the BPE tokenizer is trained on.")
    parser.add_argument("--work", default="/tmp/dtrpo_stream_scale", help="Folder of the data files.")
    parser.add_argument("--out", default=None, help="JSON file of the results (printed too).")
    args = parser.parse_args()
    ds, work = data_scale(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"limits": ds.LIMITS, "cpus": os.cpu_count(), "batches": args.batches, "runs": []}
    for n in args.rows:
        data = work / f"rows-{n}.jsonl"
        if not data.is_file():
            ds.make_rows(data, n)
        bpe = work / f"bpe-{args.bpe_rows}"
        if "bpe" in args.tokenizers and not bpe.is_dir():
            ds.train_bpe(data, bpe, min(args.bpe_rows, n))
        for name in args.tokenizers:
            for order in ("random", "sequential"):
                t = time.perf_counter()
                run = child(data, str(bpe) if name == "bpe" else "char", order, args.batches, ds.LIMITS)
                run |= {"rows": n, "tokenizer": name, "order": order, "file_mib": data.stat().st_size / 2**20}
                print(json.dumps(run), f"({time.perf_counter() - t:.0f} s)", flush=True)
                results["runs"].append(run)
                if args.out:
                    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
