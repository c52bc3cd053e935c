"""Peak memory of loading training data: a generated JSONL file of preference rows tokenized by
`build_preference_dataset` under the default limits (prompts 512, completions 256 tokens), in a fresh process.

    python scripts/data_memory.py --mb 40        # prints the file size, the RSS after imports and the peak RSS

Run it with another checkout first on PYTHONPATH to compare two versions of `dtrpo.data`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

CHILD = """
import resource, sys, time
from dtrpo.data import build_preference_dataset
from dtrpo.models import make_char_tokenizer
tok = make_char_tokenizer()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
ds, stats = build_preference_dataset(sys.argv[1], tok, 8, 512, 256)
seconds = time.perf_counter() - start
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(ds), seconds)
"""


def make_file(path: Path, megabytes: float, seed: int = 0) -> None:
    """Rows of a 2,000-character prompt and two 1,000-character responses until the file holds `megabytes`."""
    rng, size = random.Random(seed), 0
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(500)]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n // 6))[:n]

    with path.open("w") as f:
        while size < megabytes * 2**20:
            line = json.dumps({"prompt": text(2000), "chosen": text(1000), "rejected": text(1000)}) + "\n"
            f.write(line)
            size += len(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=40, help="Size of the generated JSONL file in MiB.")
    parser.add_argument("--file", default="/tmp/dtrpo_data_memory.jsonl", help="Where the file is written.")
    args = parser.parse_args()
    path = Path(args.file)
    if not path.is_file() or abs(path.stat().st_size - args.mb * 2**20) > 2**20:
        make_file(path, args.mb)
    out = subprocess.run(  # from another folder, so that PYTHONPATH decides which dtrpo is measured
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True, cwd=path.parent
    )
    base, peak, rows, seconds = out.stdout.split()
    kib = 1024  # ru_maxrss is in KiB on Linux
    mb = path.stat().st_size / 2**20
    print(
        f"file {mb:.1f} MiB, {rows} rows: RSS after imports {int(base) * kib / 2**20:.0f} MiB, peak "
        f"{int(peak) * kib / 2**20:.0f} MiB (+{(int(peak) - int(base)) * kib / 2**20:.0f} MiB = "
        f"{(int(peak) - int(base)) * kib / 2**20 / mb:.1f}x the file) in {float(seconds):.1f} s"
    )


if __name__ == "__main__":
    main()
