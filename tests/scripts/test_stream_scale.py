"""scripts/stream_scale.py at a tiny size: one streamed run in a fresh process reads its batches from the Trainer's
dataloader and reports its time to the first batch and its memory."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "stream_scale.py"


def test_one_streamed_run(tmp_path):
    spec = importlib.util.spec_from_file_location("stream_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["stream_scale"] = module
    spec.loader.exec_module(module)
    ds = module.data_scale()
    data = tmp_path / "rows.jsonl"
    ds.make_rows(data, 30)
    got = module.child(data, "char", "random", 4, ds.LIMITS)
    assert got["batches"] == 4 and got["pairs"] == 8 and 0 < got["first_batch_s"] < got["seconds"]
    assert got["peak_above_imports_mib"] >= got["first_batch_mib"] >= 0  # peaks: 0 when imports peaked higher
