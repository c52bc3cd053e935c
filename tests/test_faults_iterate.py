"""Faults of `dtrpo iterate` (issue 22): a round killed in its final save finishes, one run at a time per
folder, the reward's time limit, an edited prompts file, damaged stage files, settings checked before they
are recorded. On the tiny model of tests/test_iterate.py, whose uninterrupted run is the reference."""

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

import dtrpo.iterate
from dtrpo.base import DiffusionTrainer
from dtrpo.cli import main
from dtrpo.iterate import iterate
from tests.test_faults import dead_pid, live_pid, snapshot, write_lock
from tests.test_iterate import argv, comparable, config, copy_rounds, one_thread, setup, uninterrupted  # noqa: F401


def same_weights(a, b) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("when", ["during", "after"])
def test_a_round_killed_in_its_final_save_finishes(setup, uninterrupted, when, monkeypatch):  # noqa: F811
    """Round 2 killed while its model is written, or once it is written but before its checkpoints are deleted
    and the stage recorded: the rerun writes round 2's model from its last checkpoint and goes on, to the
    report and weights of an uninterrupted run."""
    out = setup / f"killed-{when}"
    copy_rounds(uninterrupted, out, 0, 1)
    with monkeypatch.context() as m:
        if when == "during":
            real = DiffusionTrainer.write_run_files

            def write_then_die(self, folder):
                if folder.name == ".partial-model" and folder.parent.parent.name == "round-2":
                    raise KeyboardInterrupt("killed")
                return real(self, folder)

            m.setattr(DiffusionTrainer, "write_run_files", write_then_die)
        else:
            real_moved = dtrpo.iterate.Models.moved

            def moved_then_die(self, path):
                real_moved(self, path)
                if "round-2" in str(path):
                    raise KeyboardInterrupt("killed")

            m.setattr(dtrpo.iterate.Models, "moved", moved_then_die)
        with pytest.raises(KeyboardInterrupt):
            iterate(config(setup, out), log=lambda line: None)
    model = out / "round-2" / "model"
    assert (model / "checkpoint-2").is_dir() and not (out / "round-2" / "train.json").exists()
    assert (model / ".partial-model").is_dir() if when == "during" else (model / "model.safetensors").is_file()
    report = iterate(config(setup, out), log=lambda line: None)
    assert comparable(report) == comparable(json.loads((uninterrupted / "report.json").read_text()))
    assert same_weights(model, uninterrupted / "round-2" / "model")
    assert not list(model.glob("checkpoint-*")) and not (model / ".partial-model").exists()


def stuck(prompt: str, response: str) -> float:
    """A reward that never returns in time (and swallows exceptions)."""
    try:
        time.sleep(60)
    except Exception:  # noqa: BLE001, S110 - as a careless reward would
        pass
    return 1.0


def run(setup, out, *extra, capsys=None):  # noqa: F811
    """`dtrpo iterate` in this process: (exit code, stderr's message)."""
    try:
        main(["iterate", *argv(setup, out, *extra)])
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 1), str(e.code)
    return 0, ""


def test_a_second_iterate_into_a_running_ones_folder_is_refused(setup, uninterrupted, tmp_path):  # noqa: F811
    out = tmp_path / "running"
    shutil.copytree(uninterrupted, out)
    lock = out / ".dtrpo-run.lock"
    holder = live_pid()
    try:
        write_lock(lock, holder.pid)
        before = snapshot(out)
        code, message = run(setup, out, "--overwrite_output_dir", "true")
        assert code != 0 and f"error: --output_dir {out} is in use by another run (pid {holder.pid} on " in message
        assert snapshot(out) == before  # the running run's folder is intact: nothing deleted nor written
    finally:
        holder.kill()
        holder.wait()
    write_lock(lock, dead_pid())  # the first run was killed: its lock is stale, taken over
    assert run(setup, out, "--rounds", 1) == (0, "") and not lock.exists()


def test_iterate_honours_reward_timeout_and_it_may_change_on_a_rerun(setup, uninterrupted, tmp_path):  # noqa: F811
    start = time.monotonic()
    code, message = run(setup, tmp_path / "stuck", "--reward", "tests.test_faults_iterate:stuck", "--reward_timeout", 1)
    assert time.monotonic() - start < 30 and code != 0
    assert f"error: {setup / 'prompts.jsonl'}: scoring item id='p20' (prompt '20+20=') did not return within 1.0 s " \
           "(--reward_timeout)" in message  # fmt: skip
    out = tmp_path / "moved"
    shutil.copytree(uninterrupted, out)
    assert run(setup, out, "--reward_timeout", 30) == (0, "")  # changes no result: accepted, nothing runs again
    assert json.loads((out / "iterate_config.json").read_text())["task"]["reward_timeout"] == 30.0
    code, message = run(setup, out, "--reward_timeout", 0)
    assert "error: --reward_timeout must be a positive number of seconds, got 0.0" in message


def test_an_edited_prompts_file_is_refused_naming_task(setup, uninterrupted, tmp_path):  # noqa: F811
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "run"
    shutil.copy(setup / "prompts.jsonl", prompts)
    shutil.copytree(uninterrupted, out)
    recorded = json.loads((out / "iterate_config.json").read_text())
    recorded["task"]["task"] = str(prompts)  # the run as started with this copy of the file
    (out / "iterate_config.json").write_text(json.dumps(recorded))
    lines = prompts.read_text().splitlines()
    prompts.write_text("\n".join([lines[0].replace('"answer": "20"', '"answer": "21"'), *lines[1:]]) + "\n")
    before = snapshot(out)
    code, message = run(setup, out, "--task", prompts, "--rounds", 3)
    assert code != 0 and f"error: --task {prompts}: the prompts file was edited since the run in {out} started" in (
        message
    )
    assert snapshot(out) == before  # no round 3 trained on the other file
    prompts.write_text("\n".join(lines) + "\n")  # restored: the run goes on
    assert run(setup, out, "--task", prompts) == (0, "")


def test_iterate_refuses_a_folder_holding_a_train_run(setup, tmp_path):  # noqa: F811
    from dtrpo.models import init_tiny

    out = tmp_path / "trained"
    init_tiny(out, block_size=4)  # a model and its files, as a finished `train` leaves them
    (out / "checkpoint-2").mkdir()
    before = snapshot(out)
    code, message = run(setup, out)
    assert code != 0 and f"error: --output_dir {out} holds a training run or a model (checkpoint-2, " in message
    assert "not an iterate run; choose another --output_dir" in message and snapshot(out) == before
    assert run(setup, out, "--rounds", 1, "--overwrite_output_dir", "true") == (0, "")  # deleted when asked
    assert not (out / "checkpoint-2").exists() and not (out / "model.safetensors").exists()
    assert (out / "round-1" / "model" / "model.safetensors").is_file()


def test_settings_are_checked_before_they_are_recorded(setup, tmp_path):  # noqa: F811
    out = tmp_path / "nan"
    code, message = run(setup, out, "--eval_temperature", "nan")
    assert code != 0 and "error: --eval_temperature must be a finite number, 0 or more, got nan" in message
    assert not (out / "iterate_config.json").exists()
    code, message = run(setup, out, "--model_name_or_path", setup / "nowhere")
    assert code != 0 and f"error: --model_name_or_path {setup / 'nowhere'}: no such model folder" in message
    assert not (out / "iterate_config.json").exists()


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("round-1/train.json", "", "not valid JSON (Expecting value: line 1 column 1 (char 0)); delete it to redo"),
        ("round-1/train.json", "{}", "has no trained, training_passes, steps, seconds; delete it to redo that stage"),
        ("round-1/pairs.json", "[1, 2]", "holds a list, not a JSON object; delete it to redo that stage"),
        ("round-1/eval.json", '{"accuracy": 0.5, "n": 4, "nfe_per_batch": 8, "seconds": 1}',
         "has no ci95; delete it to redo that stage"),
        ("round-0/eval.json", '{"accuracy": 0.5, "ci95": 0.1, "n": 4, "nfe_per_batch": 8, "seconds": 1}',
         "ci95 is 0.1, not a [low, high] pair; delete it to redo that stage"),
        ("iterate_config.json", '{"task": {}, "loop": [3]}',
         "section 'loop' is a list, not an object; restore it, or pass --overwrite_output_dir true"),
        ("iterate_config.json", "[]", "holds a list, not a JSON object; restore it, or pass --overwrite_output_dir"),
    ],
)  # fmt: skip
def test_a_damaged_stage_file_is_one_line_naming_it(setup, uninterrupted, tmp_path, name, text, problem):  # noqa: F811
    out = tmp_path / "damaged"
    shutil.copytree(uninterrupted, out)
    (out / name).write_text(text)
    code, message = run(setup, out)
    assert code != 0 and message.startswith(f"error: {out / name}: {problem}"), message
    assert "\n" not in message
