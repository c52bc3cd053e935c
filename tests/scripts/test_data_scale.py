"""scripts/data_scale.py at a tiny size: the generated rows are valid preference rows of the intended lengths,
the trained BPE tokenizer has its special tokens, and one measured start makes a cache that holds every row."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "data_scale.py"


def load():
    spec = importlib.util.spec_from_file_location("data_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_scale"] = module
    spec.loader.exec_module(module)
    return module


def test_rows_tokenizer_and_one_measured_start(tmp_path):
    ds = load()
    data = tmp_path / "rows.jsonl"
    ds.make_rows(data, 30)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 30 and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    words = [len(r["prompt"].split()) for r in rows]
    assert 0.6 * ds.PROMPT_WORDS <= min(words) and max(words) < 1.4 * ds.PROMPT_WORDS
    ds.train_bpe(data, tmp_path / "bpe", rows=30, vocab=600)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "bpe"))
    assert tok.eos_token == "<|eos|>" and tok.mask_token == "<|mask|>" and 300 < len(tok) <= 600
    got = ds.child("after", data, str(tmp_path / "bpe"), tmp_path / "cache", 1)
    assert got["rows"] == 30 and got["cache"] == ["token cache made"] and got["seconds"] > 0
    assert ds.size_mib(tmp_path / "cache") > 0


@pytest.mark.slow
def test_whole_run_at_a_tiny_size(tmp_path, monkeypatch):
    """Every measurement of one tiny size with the char tokenizer: the torchrun pair makes the cache once (one
    process made it, the other reused it), and the second start reuses it."""
    ds = load()
    out = tmp_path / "out.json"
    argv = ["data_scale.py", "--rows", "40", "--tokenizers", "char", "--work", str(tmp_path / "w"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    ds.main()
    (run,) = json.loads(out.read_text())["runs"]
    assert sorted(r["cache"][0] for r in run["after_torchrun2"]) == ["token cache made", "token cache reused"]
    assert run["second_start"]["cache"] == ["token cache reused"] and run["second_start"]["rows"] == 40


def test_tables_by_hand():
    """One run's table rows: seconds with CPU, the maker first under torchrun, and open / first tokenization
    = 0.5 / 20 = 2.5%."""
    ds = load()

    def r(s, cpu, peak, cache="token cache made", workers=0.0):
        return {
            "seconds": s,
            "cpu_s": cpu,
            "peak_above_imports_mib": peak,
            "cache": [cache],
            "workers_peak_mib": workers,
        }

    run = {"rows": 1000, "tokenizer": "bpe", "tokens": {"prompt": 200.0, "chosen": 300.0, "rejected": 301.0},
           "file_mib": 4.2, "cache_mib": 3.0, "after_1worker": r(20, 10, 100),
           "after_2workers": r(12, 1, 50, workers=480),
           "after_torchrun2": [r(30, 0.1, 20, "token cache reused"), r(30, 15, 110)],
           "second_start": {"open_s": 0.5, "first_step_s": 1.5}}  # fmt: skip
    text = ds.tables([run])
    assert (
        "| 1,000 | bpe | 200/300/301 | - | not run | 20.0 (10.0) | 12.0 (1.0) | 30.0 (15.0) / 30.0 (0.1) | "
        "0.50 | 1.5 | 2.5% |" in text
    )
    assert "| 1,000 | bpe | 200/300/301 | - | not run | 100 | 50 / 480 | 110 / 20 | 4 | 3 |" in text
