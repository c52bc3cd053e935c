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
