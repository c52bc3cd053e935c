"""`--streaming` (`dtrpo.streaming`): the same rows as the token cache, read lazily; a streamed run trains as the cached
one does on the same rows; a resumed stream continues on the rows of the uninterrupted run; bad rows are named when
reached; what needs the whole data up front is refused; two processes split each global batch."""

import copy
import json
import os
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dtrpo.data import Limits, build_preference_dataset, build_sft_dataset
from dtrpo.data_cache import cached
from dtrpo.models import init_tiny, make_tiny_model
from dtrpo.streaming import refusal, streamed
from tests.test_trainer import StopAt, free_port, make_args, train

pytestmark = pytest.mark.filterwarnings("ignore:.*rows whose chosen equals rejected")
LIMITS = Limits(4, 12, 8, "truncate", False)
ROWS = [{"prompt": "q" * (1 + i % 17), "chosen": "ab" * (1 + i % 5), "rejected": "c" * (1 + i % 9)} for i in range(150)]
ROWS[7] = {"prompt": "same", "chosen": "x", "rejected": "x"}  # dropped by both paths


def write_jsonl(path, rows, extra=()):
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "")  # a blank line: skipped, later rows keep their file line
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


def stream_args(tmp_path, **kw):
    return make_args(tmp_path, streaming=True, train_sampling_strategy="sequential", **kw)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "folder", "sft"])
def test_streamed_rows_equal_the_token_cache_in_order(tmp_path, tokenizer, fmt):
    """Sequential order: every row the cache holds (file order, identical pair dropped, `index` kept), none more."""
    builder = build_sft_dataset if fmt == "sft" else build_preference_dataset
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ROWS] if fmt == "sft" else ROWS
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    if fmt == "parquet":
        data = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), data)
    elif fmt == "folder":
        data = tmp_path / "folder"
        datasets.Dataset.from_list(rows).save_to_disk(str(data))
    want, _, _ = cached(builder, data, tokenizer, LIMITS, "native", tmp_path / "cache")
    got = list(streamed(builder, data, tokenizer, LIMITS, stream_args(tmp_path)))
    assert got == want.to_list() and len(got) == len(rows) - (fmt != "sft")


def test_identical_pairs_are_named_and_eval_data_goes_through_the_cache(tmp_path, tokenizer, caplog):
    """The dropped pair is named by its line; evaluation reads its (small) data at every evaluation: from the cache."""
    data = str(write_jsonl(tmp_path / "d.jsonl", ROWS[:40]))
    args = stream_args(tmp_path, eval_strategy="steps", eval_steps=2, dataset_cache_dir=str(tmp_path / "cache"))
    t = train(make_tiny_model(tokenizer, block_size=4), tokenizer, args, data=data, eval_data=data)
    assert isinstance(t.eval_dataset, datasets.Dataset) and len(t.eval_dataset) == 39
    assert 2 in [h["step"] for h in t.state.log_history if "eval_loss" in h]
    assert f"{data}: dropped 1 rows whose chosen equals rejected (line 9)" in caplog.text


def test_a_streamed_file_changed_during_the_run_stops_it(tmp_path, tokenizer):
    from tests.test_trainer import DTRPOTrainer

    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:40])
    trainer = DTRPOTrainer(make_tiny_model(tokenizer, block_size=4), args=stream_args(tmp_path),
                           processing_class=tokenizer, train_dataset=str(data))  # fmt: skip
    with data.open("a") as f:
        f.write(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(ValueError, match=rf"^{data}: changed since this run tokenized it; stopped at step 0"):
        trainer.train()


def test_the_shuffle_buffer_mixes_every_row_once_by_seed(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    order = [
        [r["index"] for r in streamed(build_preference_dataset, data, tokenizer, LIMITS, make_args(tmp_path, **kw))]
        for kw in ({"streaming": True, "data_seed": 0},) * 2 + ({"streaming": True, "data_seed": 1},)
    ]
    assert order[0] == order[1] != order[2]
    assert sorted(order[0]) == sorted(order[2]) == sorted(set(range(150)) - {7}) and order[0] != sorted(order[0])


def test_a_streamed_run_trains_as_the_cached_one_on_the_same_rows(tmp_path, tokenizer):
    """Sequential sampling on both: the same batches, so the same per-step losses and rewards."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:40])
    init = make_tiny_model(tokenizer, block_size=4)

    def logged(streaming):
        args = make_args(tmp_path / str(streaming), streaming=streaming, train_sampling_strategy="sequential",
                         dataset_cache_dir=str(tmp_path / "cache"))  # fmt: skip
        t = train(copy.deepcopy(init), tokenizer, args, data=str(data))
        return [x for h in t.state.log_history if "loss" in h for x in (h["loss"], h["rewards/margins"])]

    want, got = logged(False), logged(True)
    assert len(want) == 6 and got == pytest.approx(want, abs=1e-6) and want[0] != pytest.approx(want[2], abs=1e-4)


def test_a_resumed_stream_trains_on_the_rows_of_the_uninterrupted_run(tmp_path, tokenizer):
    """Shuffled stream: the Trainer skips the batches trained before the checkpoint by reading them again."""
    data = str(write_jsonl(tmp_path / "d.jsonl", ROWS[:40]))
    init = make_tiny_model(tokenizer, block_size=4)
    kw = dict(streaming=True, max_steps=4, save_strategy="steps", save_steps=2)
    full = train(copy.deepcopy(init), tokenizer, make_args(tmp_path / "a", **kw), data=data)
    part = make_args(tmp_path / "b", **kw)
    train(copy.deepcopy(init), tokenizer, part, data=data, callbacks=[StopAt(2)])
    resumed = train(
        copy.deepcopy(init), tokenizer, part, data=data, resume=str(tmp_path / "b" / "out" / "checkpoint-2")
    )

    def losses(t):
        return {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}

    want, got = losses(full), losses(resumed)
    assert {3, 4} <= set(got) and [got[s] for s in (3, 4)] == pytest.approx([want[3], want[4]], abs=1e-6)


def test_data_that_runs_out_before_max_steps_stops_in_one_line(tmp_path, tokenizer):
    data = str(write_jsonl(tmp_path / "d.jsonl", ROWS[:6]))  # 6 rows, 4 a step: steps 1 and 2, then nothing
    with pytest.raises(ValueError, match=r"^--streaming: the training data ran out at step 2 of --max_steps 3 "):
        train(make_tiny_model(tokenizer, block_size=4), tokenizer, stream_args(tmp_path), data=data)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    (tmp_path / "same.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"^--streaming: the training data holds no usable rows$"):
        train(
            make_tiny_model(tokenizer, block_size=4),
            tokenizer,
            stream_args(tmp_path / "b"),
            data=tmp_path / "same.jsonl",
        )


def test_rows_are_read_lazily_and_a_bad_row_is_named_when_reached(tmp_path, tokenizer):
    """Row 300 lacks 'chosen' and the last line is not JSON: 3 steps of 4 rows reach neither (the run trains); 80
    steps reach the first (tokenized in chunks of 64 rows), and stop there."""
    rows = [*ROWS, *ROWS, *ROWS, *ROWS]
    rows[299] = {"prompt": "p", "rejected": "r"}
    data = str(write_jsonl(tmp_path / "d.jsonl", rows, extra=["{not json"]))
    train(make_tiny_model(tokenizer, block_size=4), tokenizer, stream_args(tmp_path / "a"), data=data)
    with pytest.raises(ValueError, match=rf"^{data}: line 301: field 'chosen' is missing$"):
        train(make_tiny_model(tokenizer, block_size=4), tokenizer, stream_args(tmp_path / "b", max_steps=80), data=data)


def test_hub_style_rows_are_named_by_their_row(tmp_path, tokenizer):
    rows = [dict(r) for r in ROWS[:20]]
    del rows[12]["rejected"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    hub = datasets.load_dataset("parquet", data_files=str(tmp_path / "train.parquet"), split="train", streaming=True)
    stream = streamed(build_preference_dataset, hub, tokenizer, LIMITS, stream_args(tmp_path))
    with pytest.raises(ValueError, match=r"^parquet \(split 'train'\): row 13: field 'rejected' is missing$"):
        list(stream)


def gen_rows():
    yield from ROWS[:12]


def test_an_iterable_dataset_of_unknown_columns_trains(tmp_path, tokenizer):
    hub = datasets.IterableDataset.from_generator(gen_rows)
    assert hub.column_names is None  # features unknown until read
    t = train(make_tiny_model(tokenizer, block_size=4), tokenizer, stream_args(tmp_path, max_steps=2), data=hub)
    assert t.state.global_step == 2


@pytest.mark.parametrize(
    "kw,flags",
    [
        ({"max_steps": -1, "num_train_epochs": 2}, ("--streaming", "--max_steps", "--num_train_epochs")),
        ({"precompute_ref_log_probs": True}, ("--streaming", "--precompute_ref_log_probs")),
        ({"train_sampling_strategy": "group_by_length"}, ("--streaming", "--train_sampling_strategy")),
    ],
)
def test_what_needs_the_whole_data_is_refused_naming_the_flags(tmp_path, kw, flags):
    with pytest.raises(ValueError) as e:
        make_args(tmp_path, **{"streaming": True, **kw})
    assert all(f in str(e.value) for f in flags) and "\n" not in str(e.value)
    assert refusal(make_args(tmp_path, streaming=True)) is None


def test_dispatched_batches_are_refused_with_a_stream(tmp_path, tokenizer):
    args = stream_args(tmp_path, accelerator_config={"dispatch_batches": True})
    with pytest.raises(ValueError, match="^--streaming cannot run with dispatch_batches true in --accelerator_config"):
        train(make_tiny_model(tokenizer, block_size=4), tokenizer, args, data=ROWS[:8])


def test_an_iterable_dataset_needs_streaming_and_a_json_list_is_refused(tmp_path, tokenizer):
    hub = datasets.Dataset.from_list(ROWS[:8]).to_iterable_dataset()
    with pytest.raises(ValueError, match="IterableDataset is read as training data only, with --streaming true"):
        train(make_tiny_model(tokenizer, block_size=4), tokenizer, make_args(tmp_path), data=hub)
    (tmp_path / "list.json").write_text(json.dumps(ROWS[:8]))
    with pytest.raises(ValueError, match=r"list.json: a JSON list is read whole; --streaming reads one object a line"):
        streamed(build_preference_dataset, tmp_path / "list.json", tokenizer, LIMITS, stream_args(tmp_path))


def test_dtrpo_train_and_sft_stream_and_errors_are_one_line(tmp_path, capsys):
    from tests.test_cli import cli

    init_tiny(tmp_path / "tiny", block_size=4)
    rows = [*ROWS[:70], {"prompt": "p", "chosen": 3, "rejected": "r"}]  # line 72: after the first chunk
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common = ("--model_name_or_path", tmp_path / "tiny", "--dataset_name", data, "--per_device_train_batch_size", 2,
              "--report_to", "none", "--save_strategy", "no", "--streaming", "true",
              "--train_sampling_strategy", "sequential", "--disable_tqdm", "true")  # fmt: skip
    cli("train", *common, "--output_dir", tmp_path / "a", "--max_steps", 2, capsys=capsys)
    assert (tmp_path / "a" / "model.safetensors").is_file()
    sft = write_jsonl(tmp_path / "s.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ROWS[:20]])
    cli("sft", *common[:3], sft, *common[4:], "--output_dir", tmp_path / "s", "--max_steps", 2, capsys=capsys)
    assert (tmp_path / "s" / "model.safetensors").is_file()
    for extra, want in [
        (("--max_steps", 40), f"error: {data}: line 72: field 'chosen' must be a string"),
        (("--num_train_epochs", 1), "error: --streaming needs --max_steps > 0 (got -1)"),
    ]:
        res = cli("train", *common, "--output_dir", tmp_path / "b", *extra, ok=False, capsys=capsys)
        (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
        assert res.returncode and line.startswith(want) and "Traceback" not in res.stderr
    assert not (tmp_path / "b" / "model.safetensors").exists()


def test_a_datasets_name_that_cannot_stream_is_one_line_and_its_test_split_is_refused(tmp_path, monkeypatch):
    from dtrpo.data import DataArgs, _dataset

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network try
    with pytest.raises(ValueError, match=r"^--dataset_name 'no-such/dataset-xyz' --streaming: not a local file"):
        _dataset("no-such/dataset-xyz", "train", streaming=True)
    monkeypatch.setattr("dtrpo.data._dataset", lambda name, split, streaming=False: f"{name}:{split}:{streaming}")
    args = DataArgs(dataset_name="org/prefs", dataset_test_split="test")
    assert args.datasets() == ("org/prefs:train:False", "org/prefs:test:False")
    with pytest.raises(ValueError, match=r"^--dataset_test_split test with --streaming: evaluation reads its data"):
        args.datasets(streaming=True)


@pytest.mark.slow
def test_two_processes_split_a_stream_as_one_process_at_the_same_global_batch(tmp_path):
    """torchrun, 2 gloo ranks of 2 rows a step, shuffled stream: each rank keeps its half of each global batch of 4
    (accelerate's IterableDatasetShard; batches are not dispatched: their widths differ), so the losses are those of
    one process with 4 rows a step (to float32 rounding: the ranks pad to their own longest rows and the gradients
    are summed in another order)."""
    init_tiny(tmp_path / "tiny", block_size=4)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:40])
    flags = ["--model_name_or_path", str(tmp_path / "tiny"), "--dataset_name", str(data), "--use_cpu", "true",
             "--max_steps", "3", "--logging_steps", "1", "--steps_per_block", "2", "--learning_rate", "1e-2",
             "--disable_tqdm", "true", "--report_to", "none", "--streaming", "true", "--seed", "0",
             "--save_steps", "3"]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), "-m", "dtrpo.cli", "train"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    one = [sys.executable, "-m", "dtrpo.cli", "train"]
    for name, cmd, batch in (("ddp", [*launch, "--ddp_backend", "gloo"], "2"), ("one", one, "4")):
        out = tmp_path / name
        args = [*cmd, *flags, "--output_dir", str(out), "--per_device_train_batch_size", batch]
        res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
        runs[name] = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(runs["one"]) == 3 and runs["ddp"] == pytest.approx(runs["one"], rel=1e-5)
    assert runs["one"][0] != pytest.approx(runs["one"][1], abs=1e-4)
