"""Faults and bad input. First the trainer base's checkpoints (base.py): a kill or a write error while
saving, corrupt checkpoints, a reused output folder; then hostile model folders and bad user input through
every command. Each test asserts the one-line message and that no data was lost, mixed in or read stale."""

import json
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtrpo.base import DiffusionTrainer
from dtrpo.cli import main
from dtrpo.models import init_tiny
from dtrpo.tasks import load_task
from tests.test_cli import cli
from tests.test_trainer import PAIRS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    init_tiny(tmp / "tiny", block_size=4)
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return tmp


def train(setup, out, *extra, ok=True, capsys=None):
    return cli(
        "train",
        "--model_name_or_path",
        setup / "tiny",
        "--dataset_name",
        setup / "pairs.jsonl",
        "--output",
        out,
        "--steps_per_block",
        2,
        "--per_device_train_batch_size",
        4,
        "--max_steps",
        4,
        "--save_strategy",
        "steps",
        "--save_steps",
        2,
        "--learning_rate",
        1e-2,
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
        *extra,
        ok=ok,
        capsys=capsys,
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def truncate(file: Path) -> None:
    with file.open("r+b") as f:
        f.truncate(file.stat().st_size // 2)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def full_run(setup):
    """An uninterrupted run of 4 steps with checkpoints at steps 2 and 4: the result every resume must match."""
    train(setup, setup / "full")
    return setup / "full"


def test_checkpoints_are_complete_and_no_staging_folder_is_left(full_run):
    assert sorted(p.name for p in full_run.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((full_run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert (full_run / "checkpoint-4" / "optimizer.pt").is_file()
    assert_same_weights(full_run, full_run / "checkpoint-4")


def test_kill_during_save_then_resume_last_skips_the_partial_checkpoint(setup, full_run, capsys):
    """A kill while checkpoint-4 was written: an old-style half-written checkpoint-4 (only config.json, as
    transformers leaves it) and a staging folder of this code; `last` resumes from checkpoint-2, names the
    checkpoint it skipped, and ends bit-for-bit where the uninterrupted run ended."""
    out = setup / "killed"
    shutil.copytree(full_run, out)
    for path in out.iterdir():
        if path.is_file():
            path.unlink()  # the final model was never written
    for path in (out / "checkpoint-4").iterdir():
        if path.name != "config.json":
            path.unlink()
    (out / ".partial-checkpoint-6" / "checkpoint-6").mkdir(parents=True)
    res = train(setup, out, "--resume_from_checkpoint", "last", capsys=capsys)
    assert f"skipping incomplete checkpoint {out / 'checkpoint-4'} (no trainer_state.json)" in res.stderr
    assert f"resuming from {out / 'checkpoint-2'}" in res.stderr
    assert_same_weights(out, full_run)
    assert_same_weights(out / "checkpoint-4", full_run / "checkpoint-4")  # the partial one was replaced whole


def test_truncated_safetensors_is_refused_with_its_path(setup, full_run, capsys):
    out = setup / "corrupt"
    shutil.copytree(full_run, out)
    truncate(out / "checkpoint-4" / "model.safetensors")
    res = train(setup, out, "--resume_from_checkpoint", out / "checkpoint-4", ok=False, capsys=capsys)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"error: {out / 'checkpoint-4'}: not a complete checkpoint (model.safetensors is truncated (" in res.stderr
    res = cli("generate", "--model_name_or_path", out / "checkpoint-4", "--prompt", "1+1=", ok=False, capsys=capsys)
    assert f"error: {out / 'checkpoint-4'}: model.safetensors is truncated" in res.stderr
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": ')
    res = train(setup, out, "--resume_from_checkpoint", "last", ok=False, capsys=capsys)
    assert f"skipping incomplete checkpoint {out / 'checkpoint-4'} (model.safetensors is truncated" in res.stderr
    assert f"skipping incomplete checkpoint {out / 'checkpoint-2'} (trainer_state.json is not valid JSON)" in res.stderr
    assert "error: --resume_from_checkpoint last: no complete checkpoint-* folder" in res.stderr


def test_write_error_while_saving(setup, monkeypatch, capsys):
    """A disk-full error: in a checkpoint save, no checkpoint-N appears (its staging folder stays aside);
    in the final save, the model is not reported as saved and the message says how to continue."""
    out = setup / "diskfull"
    real = DiffusionTrainer._save_optimizer_and_scheduler

    def fail_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(28, "No space left on device")
        real(self, output_dir)

    monkeypatch.setattr(DiffusionTrainer, "_save_optimizer_and_scheduler", fail_at_step_4)
    res = train(setup, out, ok=False, capsys=capsys)
    assert res.returncode != 0 and "error: writing checkpoint-4 failed at step 4 ([Errno 28] No space" in res.stderr
    assert f"{out / 'checkpoint-2'} is complete: resume with --resume_from_checkpoint last" in res.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [".partial-checkpoint-4", "checkpoint-2"]
    assert "saved model" not in res.stdout
    monkeypatch.undo()

    save_model = DiffusionTrainer.save_model

    def no_space_for_the_final_model(self, output_dir=None, _internal_call=False):
        if not _internal_call:  # checkpoints are saved, the final model is not
            raise OSError(28, "No space left on device")
        save_model(self, output_dir, _internal_call)

    monkeypatch.setattr(DiffusionTrainer, "save_model", no_space_for_the_final_model)
    res = train(setup, out, "--resume_from_checkpoint", "last", ok=False, capsys=capsys)
    assert f"error: saving the final model to {out} failed ([Errno 28] No space left on device)" in res.stderr
    assert "saved model" not in res.stdout and not (out / "model.safetensors").exists()
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()  # the checkpoint before it is whole


def test_resume_last_skips_a_truncated_optimizer_or_an_empty_state_naming_why(setup, full_run, capsys):
    out = setup / "damaged"
    shutil.copytree(full_run, out)
    truncate(out / "checkpoint-4" / "optimizer.pt")
    res = train(setup, out, "--resume_from_checkpoint", "last", capsys=capsys)
    assert (
        f"skipping incomplete checkpoint {out / 'checkpoint-4'} (optimizer.pt is truncated or damaged (" in res.stderr
    )
    assert f"resuming from {out / 'checkpoint-2'}" in res.stderr
    assert_same_weights(out, full_run)  # checkpoint-2 resumed to the same end
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    res = train(setup, out, "--resume_from_checkpoint", out / "checkpoint-4", ok=False, capsys=capsys)
    assert res.stderr.rstrip().endswith(
        f"error: {out / 'checkpoint-4'}: not a complete checkpoint (trainer_state.json has no integer global_step "
        "(it holds {}))"
    )


def test_disk_full_in_torch_save_mid_run_is_one_line_and_resumable(setup, full_run, monkeypatch, capsys):
    """torch.save reports a full disk as a RuntimeError from its zip writer, after writing part of the file: the
    run stops with one line, checkpoint-4 never appears, and `last` resumes from checkpoint-2 to the same end. The
    final model is written aside and moved in once whole, so no staging folder remains."""
    out = setup / "torchsave"
    real = torch.save

    def fills_the_disk(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                "data/3: file write failed"
            )
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    res = train(setup, out, ok=False, capsys=capsys)
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert (
        line.startswith("error: writing checkpoint-4 failed at step 4 ([enforce fail") and "Traceback" not in res.stderr
    )
    assert "file write failed); is the disk full?" in line and line.endswith(
        "resume with --resume_from_checkpoint last"
    )
    assert not (out / "checkpoint-4").exists() and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    res = train(setup, out, "--resume_from_checkpoint", "last", capsys=capsys)
    assert f"resuming from {out / 'checkpoint-2'}" in res.stderr
    assert_same_weights(out, full_run)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]


def test_resume_from_a_checkpoint_of_another_width_is_one_line(setup, full_run, tmp_path, capsys):
    out = tmp_path / "wider"
    shutil.copytree(full_run, out)
    init_tiny(tmp_path / "narrow", block_size=4, hidden_size=32)
    shutil.copy(tmp_path / "narrow" / "model.safetensors", out / "checkpoint-2" / "model.safetensors")
    before = weights(out / "checkpoint-2")
    res = train(setup, out, "--resume_from_checkpoint", out / "checkpoint-2", ok=False, capsys=capsys)
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert line == (
        f"error: {out / 'checkpoint-2'}: its weights do not fit this model (lm_head.weight is [100, 32] in "
        "model.safetensors, [100, 64] in the model)"
    )
    assert_same_weights(out, full_run)  # nothing written
    assert all(torch.equal(before[k], v) for k, v in weights(out / "checkpoint-2").items())


def test_reused_output_folder_is_refused_or_replaced_whole(setup, capsys, caplog):
    out = setup / "reused"
    train(setup, out, "--save_steps", 1)
    before = {p.name: (p / "model.safetensors").read_bytes() for p in out.glob("checkpoint-*")}
    res = train(setup, out, "--learning_rate", 1e-3, ok=False, capsys=capsys)
    assert f"error: --output_dir {out} holds an earlier run (checkpoint-1, checkpoint-2, checkpoint-3" in res.stderr
    assert "--overwrite_output_dir true" in res.stderr and "--resume_from_checkpoint last" in res.stderr
    assert {p.name: (p / "model.safetensors").read_bytes() for p in out.glob("checkpoint-*")} == before

    (out / "notes.txt").write_text("mine")  # not a file a run writes: kept
    train(setup, out, "--learning_rate", 1e-3, "--max_steps", 2, "--save_steps", 1, "--overwrite_output_dir", "true")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # 3 and 4 are gone
    assert (out / "notes.txt").read_text() == "mine"
    for folder in (out, out / "checkpoint-2"):
        assert json.loads((folder / "dtrpo_config.json").read_text())["args"]["learning_rate"] == 1e-3
    res = train(setup, out, "--learning_rate", 1e-3, "--resume_from_checkpoint", "last", capsys=capsys)
    assert f"resuming from {out / 'checkpoint-2'}" in res.stderr and "skipping" not in res.stderr
    assert "learning_rate" not in caplog.text  # the checkpoint is of this run, with its learning rate
    train(setup, out, "--resume_from_checkpoint", out / "checkpoint-2", "--max_steps", 3)
    assert f"resuming {out / 'checkpoint-2'} with a different setting: learning_rate: 0.001 -> 0.01" in caplog.text


def test_best_checkpoint_is_the_renamed_one(tmp_path, tokenizer):
    """load_best_model_at_end still finds the best checkpoint although each is written in a staging folder."""
    from dtrpo.models import make_tiny_model
    from tests.test_trainer import make_args, train

    args = make_args(
        tmp_path,
        max_steps=3,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        per_device_eval_batch_size=4,
    )
    trainer = train(make_tiny_model(tokenizer, block_size=4), tokenizer, args, eval_data=PAIRS[:4])
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == tmp_path / "out" and best.is_dir()
    assert json.loads((best / "trainer_state.json").read_text())["best_model_checkpoint"] in (str(best), None)
    assert not list((tmp_path / "out").glob(".partial-*"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--learning_rate", 0], "error: --learning_rate must be positive, got 0.0: the run would train nothing"),
        (["--max_steps", 0], "error: --max_steps=0 with --num_train_epochs=3.0: the run would train nothing"),
        (["--lerning_rate", 1e-3], "error: dtrpo train: unknown flag --lerning_rate; did you mean --learning_rate?"),
    ],
)
def test_meaningless_or_misspelled_training_flags(setup, flags, message, capsys):
    res = train(setup, setup / "never", *flags, ok=False, capsys=capsys)
    assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr
    assert not (setup / "never").exists()


# ----------------------------------------------------------------------------- loading never runs code


def test_loading_never_executes_code_from_the_model_folder(setup, tmp_path, capsys):
    from dtrpo.families import load_model
    from tests.families.test_loading import write_sdar

    marker = tmp_path / "code_ran"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nclass X: pass\n"
    native = tmp_path / "native"
    shutil.copytree(setup / "tiny", native)
    config = json.loads((native / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.X", "AutoModelForCausalLM": "modeling_x.X"}
    (native / "config.json").write_text(json.dumps(config))
    tok = json.loads((native / "tokenizer_config.json").read_text())
    (native / "tokenizer_config.json").write_text(
        json.dumps({**tok, "auto_map": {"AutoTokenizer": ["tokenization_x.X", None]}})
    )
    sdar = write_sdar(tmp_path / "sdar")  # its config.json names modeling_sdar.SDARForCausalLM in auto_map
    for folder, names in ((native, ("modeling_x", "configuration_x", "tokenization_x")), (sdar, ("modeling_sdar",))):
        for name in names:
            (folder / f"{name}.py").write_text(code)
        load_model(folder)
    assert not marker.exists()

    pickled = tmp_path / "pickled"
    shutil.copytree(setup / "tiny", pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"x": Exploit(str(marker))}, pickled / "pytorch_model.bin")
    res = cli("generate", "--model_name_or_path", pickled, "--prompt", "1+1=", ok=False, capsys=capsys)
    assert f"error: {pickled}: its pickled weights (*.bin) hold objects other than tensors" in res.stderr
    assert not marker.exists()


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


# ----------------------------------------------------------------------------- eval, pairs, generate input


@pytest.fixture(scope="module")
def prompts(setup):
    (setup / "rewards.py").write_text(
        "def two(prompt, response):\n    return float(len(response) > 2)\n\n"
        "def three(prompt, response, row):\n    return float(row['answer'] in response)\n\n"
        "def boom(prompt, response, row):\n    raise KeyError('no score')\n\n"
        "def four(prompt, response, row, extra):\n    return 0.0\n"
    )
    path = setup / "p.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(12))
    )
    return path


def test_reward_functions_of_two_or_three_arguments(setup, prompts, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(setup))
    base = ["eval", "--model_name_or_path", setup / "tiny", "--task", prompts, "--gen_length", 4]
    for name in ("two", "three"):
        res = cli(*base, "--reward", f"rewards:{name}", "--output", setup / f"{name}.json", capsys=capsys)
        assert "accuracy" in res.stdout
    res = cli(*base, "--reward", "rewards:four", ok=False, capsys=capsys)
    assert (
        "error: reward function 'rewards:four' takes (prompt, response, row, extra); expected "
        "reward(prompt, response) -> float or reward(prompt, response, row) -> float"
    ) in res.stderr
    res = cli(*base, "--reward", "rewards:boom", ok=False, capsys=capsys)
    assert f"error: {prompts}: scoring item id='q0' (prompt '0+0=') raised KeyError: 'no score'" in res.stderr
    assert "Traceback" not in res.stderr
    for command in ("eval", "pairs"):
        assert "reward(prompt, response) or reward(prompt, response, row)" in " ".join(help_of(command, capsys).split())


def test_pairs_keep_every_prompt_with_its_id(setup, prompts, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(setup))
    out = setup / "pairs_out.jsonl"
    flags = ["--samples", 3, "--temperature", 1, "--gen_length", 4, "--reward", "rewards:two", "--output", out]
    res = cli("pairs", "--model_name_or_path", setup / "tiny", "--task", prompts, *flags, capsys=capsys)
    items = [json.loads(line) for line in (setup / "pairs_out.samples.jsonl").read_text().splitlines()]
    assert [i["id"] for i in items] == [f"q{i}" for i in range(12)]  # every prompt, with or without pairs
    assert all(len(i["responses"]) == len(i["scores"]) == 3 for i in items)
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    for item in items:  # best_worst: one pair exactly when the non-empty responses' scores differ
        scores = [sc for t, sc in zip(item["responses"], item["scores"], strict=True) if t.strip()]
        want = int(bool(scores) and max(scores) > min(scores))
        assert sum(p["id"] == item["id"] for p in pairs) == want, item
    assert f"wrote {len(pairs)} pairs to {out}" in res.stdout


def help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def test_eval_keeps_every_item_with_its_id_and_compares_two_runs(setup, prompts, capsys):
    cli(
        "eval",
        "--model_name_or_path",
        setup / "tiny",
        "--task",
        prompts,
        "--gen_length",
        4,
        "--output",
        setup / "e.json",
    )
    report = json.loads((setup / "e.json").read_text())
    assert [s["id"] for s in report["samples"]] == [f"q{i}" for i in range(12)]  # all 12 items, not the first 10
    a = {"samples": [{"id": i, "prompt": f"{i}?", "score": s} for i, s in zip("wxyz", [1, 0, 1, 0], strict=True)]}
    b = {"samples": [{"id": i, "prompt": f"{i}?", "score": s} for i, s in zip("zyxw", [0, 1, 1, 1], strict=True)]}
    (setup / "a.json").write_text(json.dumps(a))
    (setup / "b.json").write_text(json.dumps(b))
    res = cli("eval", "--compare", setup / "a.json", setup / "b.json", capsys=capsys)
    # differences b - a per item: w 0, x +1, y 0, z 0 -> mean 0.25, sd 0.5, se 0.25, half-width 1.96 * 0.25
    assert "+0.250 (95% CI -0.240 to +0.740, n=4 paired items; 0.500 -> 0.750; better in B: 1, better in A: 0)" in (
        res.stdout
    )
    (setup / "c.json").write_text(json.dumps({"samples": a["samples"][:3]}))
    res = cli("eval", "--compare", setup / "a.json", setup / "c.json", ok=False, capsys=capsys)
    assert f"error: {setup / 'a.json'} and {setup / 'c.json'} hold different items: 1 only in" in res.stderr


def test_eval_input_errors_are_one_line(setup, prompts, capsys):
    base = ["eval", "--model_name_or_path", setup / "tiny", "--gen_length", 4]
    cases = [
        (
            '{"prompt": "1+1=", "answer": "2"}\n{"prompt": 7, "answer": "4"}\n',
            "line 2: field 'prompt' must be a string, got int",
        ),
        (
            b'{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "\xff", "answer": "4"}\n',
            "line 3: not UTF-8 text (byte 0xff at column 13)",
        ),
        (
            '[{"prompt": "1+1=", "answer": "2"},\n {"question": "2+2=", "answer": "4"}]',
            "line 2: field 'prompt' is missing",
        ),
    ]
    for i, (content, message) in enumerate(cases):
        path = setup / f"bad{i}.{'json' if i == 2 else 'jsonl'}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        res = cli(*base, "--task", path, ok=False, capsys=capsys)
        assert f"error: {path}: {message}" in res.stderr
    res = cli(*base, "--task", prompts, "--n", 0, ok=False, capsys=capsys)
    assert "error: --n must be positive, got 0" in res.stderr
    res = cli(*base, "--task", prompts, "--gen_lenght", 8, ok=False, capsys=capsys)
    assert "error: dtrpo eval: unknown flag --gen_lenght; did you mean --gen_length?" in res.stderr


def test_a_very_long_prompt_is_cut_to_max_prompt_length(setup, monkeypatch, capsys):
    import dtrpo.evaluate

    path = setup / "long.jsonl"
    path.write_text(json.dumps({"id": "long", "prompt": "1" * 100_000 + "+1=", "answer": "2"}) + "\n")
    widths, real = [], dtrpo.evaluate.generate

    def spy(adapter, model, prompts, *args, **kwargs):
        widths.extend(len(p) for p in prompts)
        return real(adapter, model, prompts, *args, **kwargs)

    monkeypatch.setattr(dtrpo.evaluate, "generate", spy)
    start = time.perf_counter()
    res = cli(
        "eval",
        "--model_name_or_path",
        setup / "tiny",
        "--task",
        path,
        "--gen_length",
        4,
        "--max_prompt_length",
        64,
        capsys=capsys,
    )
    assert widths == [64] and time.perf_counter() - start < 30
    assert "1 prompts kept their last 64 tokens (--max_prompt_length)" in res.stdout


def test_a_very_long_prompts_file_is_read_in_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    row = {"prompt": "x" * 200, "answer": "1"}
    with path.open("w") as f:
        for i in range(20_000):
            f.write(json.dumps({**row, "id": i}) + "\n")
    size = path.stat().st_size  # about 5 MB
    tracemalloc.start()
    task = load_task(str(path))
    rows = task.prompts("heldout", 5, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(rows) == 5 and rows == task.prompts("heldout", 5, seed=0)
    assert peak < size / 10, (peak, size)


def test_data_errors_name_the_file_line_and_field(tmp_path, capsys):
    """One convention: the 1-based line of the file, the field as the user wrote it."""
    init_tiny(tmp_path / "tiny", block_size=4)
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')
    res = cli(
        "sft",
        "--model_name_or_path",
        tmp_path / "tiny",
        "--dataset_name",
        sft,
        "--output",
        tmp_path / "o",
        "--use_cpu",
        "true",
        ok=False,
        capsys=capsys,
    )
    assert f"error: {sft}: line 3: field 'response' is missing" in res.stderr
    pairs = tmp_path / "pairs.json"
    pairs.write_text(
        '[\n  {"prompt": "a", "chosen": "x", "rejected": "y"},\n  {"prompt": "b", "chosen": 5, "rejected": "y"}\n]'
    )
    res = cli(
        "train",
        "--model_name_or_path",
        tmp_path / "tiny",
        "--dataset_name",
        pairs,
        "--output",
        tmp_path / "o",
        "--use_cpu",
        "true",
        ok=False,
        capsys=capsys,
    )
    assert f"error: {pairs}: line 3: field 'chosen' must be a string" in res.stderr
