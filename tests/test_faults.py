"""Faults, second round (issue 17, first half): no NaN model saved, no run's output mixed or overwritten.

Each test asserts the one-line message (or the refusal) and that nothing was lost: the first run's files,
the items and samples files (still resumable), the checkpoint folder (still usable)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtrpo.models import init_tiny
from tests.test_cli import cli
from tests.test_trainer import PAIRS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults2")
    init_tiny(tmp / "tiny", block_size=4)
    init_tiny(tmp / "other", block_size=4, seed=1)  # another base model of the same shape
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    (tmp / "faults_rewards.py").write_text(
        "import time\n\n"
        "def two(prompt, response):\n    return float(len(response) > 2)\n\n"
        "def length(prompt, response):\n    return float(len(response))\n\n"
        "def infinite(prompt, response):\n    return float('inf') if prompt.startswith('2+') else 1.0\n\n"
        "def stuck(prompt, response):\n"
        "    if prompt.startswith('1+'):\n"
        "        try:\n            time.sleep(60)\n        except Exception:\n            pass  # it swallows errors\n"
        "    return 1.0\n"
    )
    (tmp / "p.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(6))
    )
    return tmp


def train(setup, out, *extra, model="tiny", ok=True, capsys=None, command="train"):
    data = ["--dataset_name", setup / "pairs.jsonl"]
    if command == "sft":
        (setup / "sft.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                                                 for r in PAIRS))  # fmt: skip
        data = ["--dataset_name", setup / "sft.jsonl"]
    return cli(command, "--model_name_or_path", setup / model, *data, "--output_dir", out,
               "--per_device_train_batch_size", 4, "--max_steps", 2, "--save_strategy", "steps", "--save_steps", 1,
               "--learning_rate", 1e-2, "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none",
               *extra, ok=ok, capsys=capsys)  # fmt: skip


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), to show that nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def done_run(setup):
    """A finished 2-step run with checkpoints 1 and 2 and its final model."""
    train(setup, setup / "done")
    return setup / "done"


def live_pid():
    """A process that stays alive for the test (the holder of a lock), and its pid."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(path: Path, pid: int) -> None:
    import socket

    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "2026-01-01 00:00:00"}))


# ----------------------------------------------------------------------------- settings and divergence


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        ("train", ["--beta", "nan"], "error: --beta must be a finite number, got nan"),
        ("train", ["--beta", "inf"], "error: --beta must be a finite number, got inf"),
        ("train", ["--rpo_alpha", "nan"], "error: --rpo_alpha must be a finite number, got nan"),
        ("train", ["--loss_type", "sigmoid", "ipo", "--loss_weights", 1, "nan"],
         "error: --loss_weights must be a finite number, got 1.0 nan"),
        ("train", ["--learning_rate", "inf"], "error: --learning_rate must be a finite number, got inf"),
        ("train", ["--max_grad_norm", "nan"], "error: --max_grad_norm must be a finite number, got nan"),
        ("sft", ["--learning_rate", "nan"], "error: --learning_rate must be a finite number, got nan"),
        ("sft", ["--weight_decay=-inf"], "error: --weight_decay must be a finite number, got -inf"),
        ("eval", ["--temperature", "nan"], "error: --temperature must be a finite number, got nan"),
        ("pairs", ["--temperature", "inf"], "error: --temperature must be a finite number, got inf"),
    ],
)  # fmt: skip
def test_non_finite_settings_are_refused(setup, command, flags, message, capsys):
    if command in ("train", "sft"):
        res = train(setup, setup / "never", *flags, command=command, ok=False, capsys=capsys)
    else:
        res = cli(command, "--model_name_or_path", setup / "tiny", "--output", setup / "never", *flags,
                  ok=False, capsys=capsys)  # fmt: skip
    assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr
    assert not (setup / "never").exists()


def test_a_diverging_run_stops_without_saving_nan_weights(setup, capsys):
    """lr 1e30: step 1 moves every weight by about 1e30 (finite), so the loss of step 2 overflows. The run
    stops at its next check (step 2's save), names the step and checkpoint-1, saves nothing after it."""
    out = setup / "diverged"
    res = train(setup, out, "--learning_rate", 1e30, "--logging_steps", 10, ok=False, capsys=capsys)
    assert res.returncode != 0 and "Traceback" not in res.stderr and "saved model" not in res.stdout
    assert (
        "error: training diverged: the training loss was not finite (NaN or inf) at step 2 (--learning_rate 1e+30); "
        f"stopped without saving it. The last complete checkpoint is {out / 'checkpoint-1'}"
    ) in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # no final model, no checkpoint-2
    assert all(torch.isfinite(w).all() for w in weights(out / "checkpoint-1").values())


def test_nan_weights_are_never_saved(setup, tmp_path):
    """A finite loss but a weight turned NaN by step 2's update: the save of step 2 is refused (the weights
    check before every save), checkpoint-1 stays the last and is whole."""
    from transformers import TrainerCallback

    from dtrpo.base import Diverged
    from dtrpo.trainer import DTRPOConfig, DTRPOTrainer

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.model.norm.weight[0] = float("nan")

    args = DTRPOConfig(output_dir=str(tmp_path / "out"), max_steps=3, save_strategy="steps", save_steps=1,
                       per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=True, report_to=[],
                       disable_tqdm=True)  # fmt: skip
    trainer = DTRPOTrainer(str(setup / "tiny"), args=args, train_dataset=str(setup / "pairs.jsonl"), callbacks=[Poison])
    message = r"the weights hold NaN or inf after step 2 \(1 tensors: model.norm.weight, ...\) .*/checkpoint-1$"
    with pytest.raises(Diverged, match=message):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-1"]


# ----------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("command", ["eval", "pairs"])
def test_an_infinite_reward_is_refused_with_its_item(setup, command, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(setup))
    extra = ["--samples", 2, "--temperature", 1] if command == "pairs" else []
    out = setup / f"inf-{command}.json"
    res = cli(command, "--model_name_or_path", setup / "tiny", "--task", setup / "p.jsonl", "--gen_length", 4,
              "--split", "train", "--reward", "faults_rewards:infinite", "--output", out, *extra,
              ok=False, capsys=capsys)  # fmt: skip
    assert f"error: {setup / 'p.jsonl'}: scoring item id='q2' (prompt '2+2=') returned inf, not a finite number" in (
        res.stderr
    )
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "pairs"])
def test_a_reward_past_its_timeout_names_the_item(setup, command, monkeypatch, capsys):
    """The reward sleeps 60 s on item q1 and swallows `Exception`: the timeout still stops it, in about 1 s."""
    import time

    monkeypatch.syspath_prepend(str(setup))
    extra = ["--samples", 2, "--temperature", 1] if command == "pairs" else []
    start = time.monotonic()
    res = cli(command, "--model_name_or_path", setup / "tiny", "--task", setup / "p.jsonl", "--gen_length", 4,
              "--split", "train", "--reward", "faults_rewards:stuck", "--reward_timeout", 1, "--output",
              setup / f"stuck-{command}.json", *extra, ok=False, capsys=capsys)  # fmt: skip
    assert time.monotonic() - start < 30
    assert (
        f"error: {setup / 'p.jsonl'}: scoring item id='q1' (prompt '1+1=') did not return within 1.0 s "
        "(--reward_timeout)"
    ) in res.stderr
    res = cli(command, "--model_name_or_path", setup / "tiny", "--task", "arithmetic", "--reward_timeout", 1,
              *extra, "--output", setup / "x.json", ok=False, capsys=capsys)  # fmt: skip
    assert "error: task 'arithmetic': match, reward and reward_timeout apply to prompts files" in res.stderr
    res = cli(command, "--model_name_or_path", setup / "tiny", "--reward_timeout", 0, "--output", setup / "x.json",
              ok=False, capsys=capsys)  # fmt: skip
    assert "error: --reward_timeout must be a positive number of seconds, got 0.0" in res.stderr


def test_the_timeout_works_off_the_main_thread():
    import threading
    import time

    from dtrpo.tasks import RewardTimeout, timed

    fn = timed(lambda p, r, row: time.sleep(10), 0.2)
    caught = []

    def run():
        try:
            fn("p", "r", {})
        except RewardTimeout as e:
            caught.append(e.args[0])

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(5)
    assert caught == [0.2]
    assert timed(lambda p, r, row: 3.0, 0.2)("p", "r", {}) == 3.0  # a quick call returns its value


# ----------------------------------------------------------------------------- items files record what made them


def pairs(setup, out, *extra, model="tiny", ok=True, capsys=None):
    return cli("pairs", "--model_name_or_path", setup / model, "--task", setup / "p.jsonl", "--samples", 2,
               "--temperature", 1, "--gen_length", 4, "--batch_size", 4, "--split", "train",
               "--reward", "faults_rewards:length", "--output", out, *extra, ok=ok, capsys=capsys)  # fmt: skip


def test_a_pairs_rerun_with_other_settings_is_refused_naming_them(setup, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(setup))
    out = setup / "made.jsonl"
    pairs(setup, out)
    samples = setup / "made.samples.jsonl"
    before = samples.read_bytes(), out.read_bytes()
    first = json.loads(samples.read_text().splitlines()[0])["made_by"]
    assert first["gen_length"] == 4 and len(first["model_weights"]) == 64
    assert first["reward_name"] == "faults_rewards:length" and first["temperature"] == 1.0
    cases = [
        (["--gen_length", 8], "gen_length: 4 -> 8"),
        (["--temperature", 0.5], "temperature: 1.0 -> 0.5"),
        (["--reward", "faults_rewards:two"], "reward_name: 'faults_rewards:length' -> 'faults_rewards:two'"),
        (["--samples", 3], "samples: 2 -> 3"),
    ]
    for flags, changed in cases:
        res = pairs(setup, out, *flags, ok=False, capsys=capsys)
        assert f"error: {samples}: chunk 0 was made by another run ({changed}); delete the file" in res.stderr
    res = pairs(setup, out, model="other", ok=False, capsys=capsys)
    assert f"error: {samples}: chunk 0 was made by another run (model_weights: '" in res.stderr
    assert (samples.read_bytes(), out.read_bytes()) == before  # nothing mixed in
    pairs(setup, out, capsys=capsys)  # the same settings: resumed (nothing left to sample), the same pairs
    assert (samples.read_bytes(), out.read_bytes()) == before
    assert json.loads(out.read_text().splitlines()[0])["provenance"]["model_weights"] == first["model_weights"]


def test_what_made_an_items_file_names_the_prompts_file_however_it_is_written(setup, monkeypatch):
    from dtrpo.evaluate import SamplingArgs, made_by
    from dtrpo.tasks import load_task

    model, s = torch.nn.Linear(2, 2), SamplingArgs()
    absolute = made_by(model, load_task(str(setup / "p.jsonl")), s)
    monkeypatch.chdir(setup)
    assert made_by(model, load_task("p.jsonl"), s) == absolute
    assert made_by(model, load_task("p.jsonl", match="numeric"), s) != absolute
    assert made_by(torch.nn.Linear(2, 2), load_task("p.jsonl"), s) != absolute  # other weights


def test_an_eval_resumed_with_another_model_is_refused(setup, monkeypatch, capsys):
    """A kill after the first chunk, then a resume with another model: refused, the items kept; the resume
    with the first model gives the report of an uninterrupted run."""
    import dtrpo.evaluate

    flags = ["--task", setup / "p.jsonl", "--gen_length", 4, "--batch_size", 2, "--split", "train"]
    cli("eval", "--model_name_or_path", setup / "tiny", *flags, "--output", setup / "whole.json")
    real, calls = dtrpo.evaluate.eval_chunk, []

    def killed_at_the_second_chunk(*args):
        calls.append(args[-1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(dtrpo.evaluate, "eval_chunk", killed_at_the_second_chunk)
    out = setup / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        cli("eval", "--model_name_or_path", setup / "tiny", *flags, "--output", out)
    monkeypatch.undo()
    items = setup / "cut.items.jsonl"
    kept = items.read_bytes()
    assert len(kept.splitlines()) == 2
    res = cli("eval", "--model_name_or_path", setup / "other", *flags, "--output", out, ok=False, capsys=capsys)
    assert f"error: {items}: chunk 0 was made by another run (model_weights: '" in res.stderr
    assert items.read_bytes() == kept and not out.exists()
    cli("eval", "--model_name_or_path", setup / "tiny", *flags, "--output", out)
    got, want = (json.loads((setup / name).read_text()) for name in ("cut.json", "whole.json"))
    assert got["samples"] == want["samples"] and got["made_by"] == want["made_by"]


def test_a_second_pairs_run_into_one_output_is_refused(setup, monkeypatch, capsys):
    """A live run holds the lock: the second gets one line and the first's samples stay resumable. A lock
    whose process is gone is taken over."""
    monkeypatch.syspath_prepend(str(setup))
    out = setup / "locked.jsonl"
    pairs(setup, out)
    samples = setup / "locked.samples.jsonl"
    lines = samples.read_text().splitlines()
    samples.write_text("\n".join(lines[:3]) + "\n")  # the first run, alive, has written chunk 0 and part of 1
    lock = Path(f"{samples}.lock")
    holder = live_pid()
    try:
        write_lock(lock, holder.pid)
        res = pairs(setup, out, ok=False, capsys=capsys)
        assert (
            f"error: --output {out} is in use by another run (pid {holder.pid} on " in res.stderr
            and f"lock file {lock})" in res.stderr
        )
        assert samples.read_text().splitlines() == lines[:3] and lock.is_file()
    finally:
        holder.kill()
        holder.wait()
    write_lock(lock, dead_pid())  # the first run was killed: its lock is stale
    pairs(setup, out, capsys=capsys)
    assert samples.read_text().splitlines() == lines and not lock.exists()  # resumed to the whole file


# ----------------------------------------------------------------------------- training runs


def test_a_second_run_into_one_output_dir_is_refused(setup, done_run, capsys):
    before = snapshot(done_run)
    lock = done_run / ".dtrpo-run.lock"
    holder = live_pid()
    try:
        write_lock(lock, holder.pid)
        for command in ("train", "sft"):
            res = train(setup, done_run, "--overwrite_output_dir", "true", command=command, ok=False, capsys=capsys)
            assert f"error: --output_dir {done_run} is in use by another run (pid {holder.pid} on " in res.stderr
        assert snapshot(done_run) == {**before, ".dtrpo-run.lock": lock.read_bytes()}  # nothing overwritten
    finally:
        holder.kill()
        holder.wait()
        lock.unlink()


def test_a_stale_lock_is_taken_over(setup, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    write_lock(out / ".dtrpo-run.lock", dead_pid())
    train(setup, out, "--max_steps", 1, capsys=capsys)
    assert (out / "model.safetensors").is_file() and not (out / ".dtrpo-run.lock").exists()


def test_resuming_with_another_base_model_is_refused(setup, done_run, tmp_path, capsys):
    out = tmp_path / "resume"
    shutil.copytree(done_run, out)
    before = snapshot(out)
    res = train(setup, out, "--resume_from_checkpoint", out / "checkpoint-1", model="other", ok=False, capsys=capsys)
    assert (
        f"error: --resume_from_checkpoint {out / 'checkpoint-1'}: its run started from another model, "
        f"{setup / 'tiny'} (weights "
        in res.stderr
        and f"and this run from {setup / 'other'} (weights " in res.stderr
    )
    assert snapshot(out) == before
    shutil.rmtree(out / "checkpoint-2")
    res = train(setup, out, "--resume_from_checkpoint", out / "checkpoint-1", capsys=capsys)  # the right base
    assert "saved model" in res.stdout
    for name in ("model.safetensors", "checkpoint-2/model.safetensors"):  # the run, as the uninterrupted one
        a, b = weights((out / name).parent), weights((done_run / name).parent)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_finished_run_trains_and_saves_nothing(setup, done_run, capsys):
    before = snapshot(done_run)
    res = train(setup, done_run, "--resume_from_checkpoint", "last", capsys=capsys)
    assert (
        f"{done_run / 'checkpoint-2'}: the run is already finished (step 2 of 2); nothing to train, and the final "
        f"model in {done_run} is kept"
    ) in res.stdout
    assert "saved model" not in res.stdout
    assert snapshot(done_run) == before


# ----------------------------------------------------------------------------- files overwritten


@pytest.mark.parametrize("command", ["eval", "pairs"])
def test_output_onto_the_prompts_file_is_refused(setup, command, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(setup / "p.jsonl", prompts)
    (tmp_path / "link.jsonl").symlink_to(prompts)
    shutil.copy(prompts, tmp_path / "x.samples.jsonl")
    shutil.copy(prompts, tmp_path / "x.items.jsonl")
    kind = "samples" if command == "pairs" else "items"
    extra = ["--samples", 2, "--temperature", 1] if command == "pairs" else []
    for task, output in [(prompts, prompts), (prompts, tmp_path / "link.jsonl"), (tmp_path / f"x.{kind}.jsonl",
                                                                                   tmp_path / "x.jsonl")]:  # fmt: skip
        before = Path(task).read_bytes()
        res = cli(command, "--model_name_or_path", setup / "tiny", "--task", task, "--output", output, *extra,
                  ok=False, capsys=capsys)  # fmt: skip
        assert f"error: --output {output} would overwrite the prompts file --task {task}" in res.stderr
        assert Path(task).read_bytes() == before


@pytest.mark.parametrize("command", ["eval", "pairs", "bench"])
def test_output_that_is_a_folder_fails_before_any_work(setup, command, tmp_path, monkeypatch, capsys):
    import dtrpo.evaluate

    monkeypatch.setattr(dtrpo.evaluate, "generate", None)  # any sampling would fail otherwise
    model = [] if command == "bench" else ["--model_name_or_path", setup / "tiny"]
    res = cli(command, *model, "--output", tmp_path, ok=False, capsys=capsys)
    assert f"error: --output {tmp_path} is a folder;" in res.stderr and "Traceback" not in res.stderr


def test_export_refuses_another_model_unless_overwrite(setup, done_run, tmp_path, capsys):
    out = tmp_path / "exported"
    shutil.copytree(setup / "other", out)
    (out / "model-00002-of-00002.safetensors").write_bytes(b"a stale shard")
    before = snapshot(out)
    res = cli("export", "--model_name_or_path", done_run, "--output", out, ok=False, capsys=capsys)
    assert f"error: --output {out} holds another model (chat_template.jinja, config.json, " in res.stderr
    assert "; pass --overwrite true to replace it, or export elsewhere" in res.stderr and snapshot(out) == before
    cli("export", "--model_name_or_path", done_run, "--output", out, "--overwrite", "true", capsys=capsys)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]  # the stale shard is gone
    a, b = weights(out), weights(done_run)
    assert all(torch.equal(a[k], b[k]) for k in b)
    cli("export", "--model_name_or_path", done_run, "--output", out, capsys=capsys)  # its own export: replaced
    for output, message in [(done_run, "is the model folder --model_name_or_path reads"),
                            (setup / "p.jsonl", "is a file; export writes a folder")]:  # fmt: skip
        res = cli("export", "--model_name_or_path", done_run, "--output", output, ok=False, capsys=capsys)
        assert f"error: --output {output} {message}" in res.stderr


def test_init_tiny_refuses_a_folder_holding_a_run(setup, done_run, capsys):
    before = snapshot(done_run)
    res = cli("init-tiny", "--output_dir", done_run, ok=False, capsys=capsys)
    assert f"error: --output_dir {done_run} holds a model or a run (checkpoint-1, checkpoint-2, " in res.stderr
    assert snapshot(done_run) == before


def test_compare_refuses_reports_on_other_prompts(tmp_path, capsys):
    def report(prompts, scores):
        rows = enumerate(zip(prompts, scores, strict=True))
        return {"samples": [{"id": f"q{i}", "prompt": p, "score": s} for i, (p, s) in rows]}

    (tmp_path / "a.json").write_text(json.dumps(report(["1+1=", "2+2="], [1, 1])))
    (tmp_path / "b.json").write_text(json.dumps(report(["1+1=", "3+3="], [0, 0])))
    res = cli("eval", "--compare", tmp_path / "a.json", tmp_path / "b.json", ok=False, capsys=capsys)
    assert (
        f"error: {tmp_path / 'a.json'} and {tmp_path / 'b.json'} were made on different prompts: 1 items differ, "
        "such as id 'q1' ('2+2=' vs '3+3=')"
    ) in res.stderr
    (tmp_path / "c.json").write_text(json.dumps(report(["1+1=", "2+2="], [0, 1])))
    res = cli("eval", "--compare", tmp_path / "a.json", tmp_path / "c.json", capsys=capsys)
    assert "-0.500 (95% CI" in res.stdout  # the same prompts: compared (differences -1 and 0)
