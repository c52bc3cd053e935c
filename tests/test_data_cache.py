"""The token cache (`dtrpo.data_cache`): the same rows as the in-memory builders from every on-disk format,
with one and two workers; made once and then reused; made again when what decides it changes, or when
damaged; refused in one line when the folder cannot be written or the data changes under a run."""

import json
import logging
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dtrpo.data import Limits, build_preference_dataset, build_sft_dataset
from dtrpo.data_cache import DataWatch, cached, default_cache_dir

pytestmark = pytest.mark.filterwarnings("ignore:.*rows whose chosen equals rejected")
LIMITS = Limits(4, 12, 8, "truncate", False)
ROWS = [{"prompt": "q" * (1 + i % 17), "chosen": "ab" * (1 + i % 5), "rejected": "c" * (1 + i % 9)} for i in range(600)]
ROWS[7] = {"prompt": "same", "chosen": "x", "rejected": "x"}  # dropped, named by its line


def write_jsonl(path, rows, blank_after=3):
    lines = [json.dumps(r) for r in rows]
    lines.insert(blank_after, "")  # a blank line: skipped, later rows keep their file line
    path.write_text("\n".join(lines) + "\n")
    return path


def plain(ds) -> dict:
    return ds.to_dict()


@pytest.mark.parametrize("num_proc", [None, 2])
def test_cached_rows_equal_the_in_memory_builder(tmp_path, tokenizer, num_proc):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.warns(UserWarning, match=r"dropped 1 of 600 rows whose chosen equals rejected \(lines 9\)"):
        want, want_stats = build_preference_dataset(str(data), tokenizer, 4, 12, 8)
    with pytest.warns(UserWarning, match=r"dropped 1 of 600 rows .*\(lines 9\)"):
        got, stats, source = cached(
            build_preference_dataset, str(data), tokenizer, LIMITS, "tiny", tmp_path / "c", num_proc
        )
    assert plain(got) == plain(want) and stats == want_stats
    assert got.cache_files and got.features["prompt_ids"].feature.dtype == "int32"  # memory-mapped, 4 bytes a token
    assert source.files == (str(data.absolute()),)


def test_every_file_format_and_sft(tmp_path, tokenizer):
    rows = ROWS[:40]
    (tmp_path / "l.json").write_text(json.dumps(rows, indent=1))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    conv = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
        for r in rows
    ]
    write_jsonl(tmp_path / "sft.jsonl", conv)
    for name, builder in [("l.json", build_preference_dataset), ("p.parquet", build_preference_dataset),
                          ("folder", build_preference_dataset), ("sft.jsonl", build_sft_dataset)]:  # fmt: skip
        path = str(tmp_path / name)
        with pytest.warns(UserWarning) if builder is build_preference_dataset else _nothing():
            want, want_stats = builder(path, tokenizer, 4, 12, 8)
            got, stats, _ = cached(builder, path, tokenizer, LIMITS, "tiny", tmp_path / "c")
        assert plain(got) == plain(want) and stats == want_stats, name


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_errors_name_file_line_and_field_from_a_worker(tmp_path, tokenizer):
    rows = [dict(r) for r in ROWS]
    rows[500]["chosen"] = 5
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    want = r"bad.jsonl: line 502: field 'chosen' must be a string \(the prompt is a string\), got int"
    with pytest.raises(ValueError, match=want):
        cached(build_preference_dataset, str(data), tokenizer, LIMITS, "tiny", tmp_path / "c", 2)
    assert not list((tmp_path / "c").iterdir())  # no cache, no staging folder left
    (tmp_path / "bad2.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad2.jsonl: line 2: not valid JSON"):
        cached(build_preference_dataset, str(tmp_path / "bad2.jsonl"), tokenizer, LIMITS, "tiny", tmp_path / "c")


def test_reused_then_made_again_with_the_reason(tmp_path, tokenizer, caplog, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[10:60])
    caplog.set_level(logging.WARNING, "dtrpo.data_cache")
    first, _, _ = cached(build_preference_dataset, str(data), tokenizer, LIMITS, "tiny", tmp_path / "c")
    assert (
        "token cache made" in caplog.text and "(50 rows" in caplog.text and "no cache of this data yet" in caplog.text
    )
    caplog.clear()
    import dtrpo.data as D

    monkeypatch.setattr(D, "preference_examples", None)  # a reuse tokenizes nothing
    again, _, _ = cached(build_preference_dataset, str(data), tokenizer, LIMITS, "tiny", tmp_path / "c")
    assert "token cache reused" in caplog.text and plain(again) == plain(first)
    monkeypatch.undo()
    caplog.clear()
    cached(build_preference_dataset, str(data), tokenizer, Limits(4, 8, 8), "tiny", tmp_path / "c")
    assert "differs in limits (max_prompt_length 12 -> 8)" in caplog.text
    caplog.clear()
    write_jsonl(data, ROWS[11:61])
    changed, _, _ = cached(build_preference_dataset, str(data), tokenizer, LIMITS, "tiny", tmp_path / "c")
    assert "differs in data" in caplog.text and plain(changed) != plain(first)
    caplog.clear()
    tokenizer2 = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<pad>", pad_token="<pad>")
    cached(build_preference_dataset, str(data), tokenizer2, LIMITS, "tiny", tmp_path / "c")
    assert "differs in tokenizer, chat_template" in caplog.text


def test_a_damaged_cache_is_made_again_never_read(tmp_path, tokenizer, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:100])
    first, _, _ = cached(build_preference_dataset, str(data), tokenizer, LIMITS, "tiny", tmp_path / "c")
    want = plain(first)
    arrow = first.cache_files[0]["filename"]
    del first
    size = os.path.getsize(arrow)
    with open(arrow, "r+b") as f:
        f.truncate(size // 2)
    caplog.set_level(logging.WARNING, "dtrpo.data_cache")
    again, _, _ = cached(build_preference_dataset, str(data), tokenizer, LIMITS, "tiny", tmp_path / "c")
    assert f"is {size // 2} bytes, written as {size} bytes" in caplog.text and "making it again" in caplog.text
    assert plain(again) == want


def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:20])
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(
        ValueError, match=r"^--dataset_cache_dir .*file/c: not writable \(.*\); pass a writable folder$"
    ):
        cached(build_preference_dataset, str(data), tokenizer, LIMITS, "tiny", tmp_path / "file" / "c")


def test_a_data_file_changed_during_the_run_stops_it(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:20])
    rows, _, source = cached(build_preference_dataset, str(data), tokenizer, LIMITS, "tiny", tmp_path / "c")
    rows.dtrpo_source = source
    watch = DataWatch([rows, None])

    class State:
        global_step = 3

    watch.on_step_begin(None, State(), None)  # unchanged: nothing happens
    write_jsonl(data, ROWS[1:21])
    with pytest.raises(ValueError, match=r"d.jsonl: changed since this run tokenized it; stopped at step 3"):
        watch.on_step_begin(None, State(), None)


def test_rows_in_memory_are_not_cached(tmp_path, tokenizer):
    rows, stats, source = cached(build_preference_dataset, ROWS[:5], tokenizer, LIMITS, "tiny", tmp_path / "c")
    assert source is None and len(rows) == 5 and not (tmp_path / "c").exists()


def test_a_hub_style_dataset_is_keyed_by_its_datasets_fingerprint(tmp_path, tokenizer, caplog):
    """A Dataset read by load_dataset (as --dataset_name NAME reads a hub dataset from the local cache) is cached
    by its datasets fingerprint and split: the same rows as the builder, then reused."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:50])
    hub = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "hf"))
    want, _ = build_preference_dataset(hub, tokenizer, 4, 12, 8)
    caplog.set_level(logging.WARNING, "dtrpo.data_cache")
    got, _, source = cached(build_preference_dataset, hub, tokenizer, LIMITS, "tiny", tmp_path / "c")
    assert plain(got) == plain(want) and source.digest.startswith(f"datasets:{hub._fingerprint}:train")
    again, _, _ = cached(build_preference_dataset, hub, tokenizer, LIMITS, "tiny", tmp_path / "c")
    assert "token cache reused" in caplog.text and plain(again) == plain(want)


def test_dataset_num_proc_must_be_positive(tmp_path):
    from dtrpo import DTRPOConfig

    with pytest.raises(ValueError, match=r"^--dataset_num_proc must be at least 1, got 0$"):
        DTRPOConfig(output_dir=str(tmp_path), dataset_num_proc=0, use_cpu=True, report_to=[])


def test_a_file_in_many_parts_equals_one_part(tmp_path, tokenizer, monkeypatch):
    """Parts of a few KiB (the mapped raw rows bounded whatever the file's size): the same rows, indices and
    counts as the in-memory builder, and the dropped rows named by line, with one and two workers."""
    import dtrpo.data_cache as C

    rows = [dict(r) for r in ROWS]
    for i in (50, 420, 599):
        rows[i] = {"prompt": "p", "chosen": "same", "rejected": "same"}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    want, want_stats = build_preference_dataset(str(data), tokenizer, 4, 12, 8)
    monkeypatch.setattr(C, "RAW_PART_BYTES", 4000)
    monkeypatch.setattr(C, "RAW_BATCH", 16)
    for num_proc in (None, 2):
        with pytest.warns(UserWarning, match=r"dropped 4 of 600 rows .*\(lines 9, 52, 422, 601\)"):
            got, stats, _ = cached(
                build_preference_dataset, str(data), tokenizer, LIMITS, "tiny", tmp_path / f"c{num_proc}", num_proc
            )
        assert plain(got) == plain(want) and stats == want_stats
        assert len(got.cache_files) > 5


def test_dtrpo_train_uses_the_cache_and_names_a_bad_folder(tmp_path, capsys, caplog):
    """Through the CLI: a cache folder that cannot be written is one `error:` line before any training; a good one
    is made with 2 workers by the first run and reused by the second."""
    from dtrpo.models import init_tiny
    from tests.test_cli import cli

    init_tiny(tmp_path / "tiny", block_size=4)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:40])
    (tmp_path / "file").write_text("x")
    common = ("train", "--model_name_or_path", tmp_path / "tiny", "--dataset_name", data, "--max_steps", 1,
              "--per_device_train_batch_size", 2, "--report_to", "none", "--save_strategy", "no")  # fmt: skip
    res = cli(
        *common, "--output_dir", tmp_path / "a", "--dataset_cache_dir", tmp_path / "file" / "c", ok=False, capsys=capsys
    )
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: --dataset_cache_dir {tmp_path / 'file' / 'c'}: not writable") and res.returncode
    assert not (tmp_path / "a" / "model.safetensors").exists()
    caplog.set_level(logging.WARNING, "dtrpo.data_cache")
    for out in ("b", "c"):
        cli(
            *common,
            "--output_dir",
            tmp_path / out,
            "--dataset_cache_dir",
            tmp_path / "cache",
            "--dataset_num_proc",
            2,
            capsys=capsys,
        )
    made = [r.getMessage() for r in caplog.records if r.getMessage().startswith("token cache")]
    assert [m.split(":")[0] for m in made] == ["token cache for " + str(data), "token cache made", "token cache reused"]


def test_the_tests_keep_their_caches_out_of_the_users_datasets_cache():
    """conftest points HF_DATASETS_CACHE at a folder of the session's own before datasets is imported: the
    default cache folder of every test (and of the commands they start) lies there."""
    from tests.conftest import DATASETS_CACHE

    assert default_cache_dir() == Path(DATASETS_CACHE) / "dtrpo"
    assert os.environ["HF_DATASETS_CACHE"] == DATASETS_CACHE


def test_dtrpo_train_stops_when_its_data_file_changes_and_resumes_on_the_new_rows(
    tmp_path, capsys, caplog, monkeypatch
):
    """Through the CLI: the data file is rewritten after step 2 (its checkpoint written): the run stops at the
    next step with one `error:` line and no final model; resumed from that checkpoint, it tokenizes the new
    rows (a new cache, "differs in data") and trains to its last step."""
    from transformers import TrainerCallback

    from dtrpo.base import DiffusionTrainer
    from dtrpo.models import init_tiny
    from tests.test_cli import cli

    init_tiny(tmp_path / "tiny", block_size=4)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:40])
    out = tmp_path / "run"
    common = ("train", "--model_name_or_path", tmp_path / "tiny", "--dataset_name", data, "--max_steps", 4,
              "--per_device_train_batch_size", 2, "--report_to", "none", "--save_steps", 2, "--output_dir", out,
              "--dataset_cache_dir", tmp_path / "cache")  # fmt: skip

    class Rewrite(TrainerCallback):  # the file is rewritten by someone else once step 2 is saved
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                write_jsonl(data, ROWS[40:80])

    real_init = DiffusionTrainer.__init__

    def with_rewrite(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.add_callback(Rewrite())

    with monkeypatch.context() as m:
        m.setattr(DiffusionTrainer, "__init__", with_rewrite)
        res = cli(*common, ok=False, capsys=capsys)
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert line == (f"error: {data}: changed since this run tokenized it; stopped at step 2 so that nothing trains "
                    "on the old rows. Start again (or resume from a checkpoint) to tokenize the new data")  # fmt: skip
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert not (out / "model.safetensors").exists()
    caplog.set_level(logging.WARNING, "dtrpo.data_cache")
    caplog.clear()
    res = cli(*common, "--resume_from_checkpoint", "last", capsys=capsys)
    assert f"saved model to {out}" in res.stdout and (out / "checkpoint-4").is_dir()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("token cache")]
    assert "differs in data" in said[0] and said[1].startswith("token cache made")
