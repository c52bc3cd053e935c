"""Faults and bad input, third round (issue 22): a run killed in its final save finishes, `iterate` is one run
at a time, edited task files are caught, a full disk is one line, and the smaller cases of that issue.

Each test asserts the one-line message (or the correct outcome) and that nothing was lost or mixed."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dtrpo.base import RESUME_FREE, DiffusionTrainer
from tests.test_cli import cli
from tests.test_faults import done_run, setup, snapshot, train, weights  # noqa: F401 - fixtures

# ----------------------------------------------------------------------------- a kill during the final save


def kill_in_final_save(monkeypatch):
    """Stands for a kill while the final model is written: its weights are in `.partial-model`, its other
    files are not yet."""
    real = DiffusionTrainer.write_run_files

    def write_then_die(self, out):
        if out.name == ".partial-model":
            raise KeyboardInterrupt("killed")
        return real(self, out)

    monkeypatch.setattr(DiffusionTrainer, "write_run_files", write_then_die)


def test_a_run_killed_in_its_final_save_resumes_by_writing_it(setup, done_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        kill_in_final_save(m)
        with pytest.raises(KeyboardInterrupt):
            train(setup, out, capsys=capsys)
    assert (out / ".partial-model" / "model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert (out / "checkpoint-2").is_dir()
    res = train(setup, out, "--resume_from_checkpoint", "last", capsys=capsys)
    assert "already finished" not in res.stdout and f"saved model to {out}" in res.stdout
    assert not (out / ".partial-model").exists() and not (out / ".dtrpo-run.lock").exists()
    got, want = weights(out), weights(done_run)  # the model the uninterrupted run saved
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for name in ("config.json", "tokenizer.json", "dtrpo_config.json"):
        saved, expected = (json.loads((d / name).read_text()) for d in (out, done_run))
        for config in (saved, expected):  # the settings a resume may change
            for key in RESUME_FREE:
                config.get("args", {}).pop(key, None)
        assert saved == expected, name
    res = cli("generate", "--model_name_or_path", out, "--prompt", "1+1=", "--gen_length", 4, capsys=capsys)
    assert "NFE" in res.stdout
    before = snapshot(out)  # now finished and saved: a rerun trains and saves nothing
    res = train(setup, out, "--resume_from_checkpoint", "last", capsys=capsys)
    assert "the run is already finished (step 2 of 2)" in res.stdout and snapshot(out) == before


def test_an_sft_run_killed_in_its_final_save_resumes_by_writing_it(setup, tmp_path, monkeypatch, capsys):  # noqa: F811
    train(setup, tmp_path / "whole", command="sft", capsys=capsys)
    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        kill_in_final_save(m)
        with pytest.raises(KeyboardInterrupt):
            train(setup, out, command="sft", capsys=capsys)
    train(setup, out, "--resume_from_checkpoint", "last", command="sft", capsys=capsys)
    got, want = weights(out), weights(tmp_path / "whole")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_run_with_no_final_model_at_all_writes_it_from_its_last_checkpoint(setup, done_run, tmp_path, capsys):  # noqa: F811
    """Killed before a file of the final save was written (or the model deleted): the same outcome."""
    out = tmp_path / "bare"
    shutil.copytree(done_run, out, ignore=lambda d, names: [] if "checkpoint" in d else
                    [n for n in names if not n.startswith("checkpoint")])  # fmt: skip
    train(setup, out, "--resume_from_checkpoint", "last", capsys=capsys)
    got, want = weights(out), weights(done_run)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- an edited prompts file


@pytest.mark.parametrize("command", ["eval", "pairs"])
def test_answers_changed_between_a_kill_and_its_rerun_are_refused(setup, command, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Killed after the first chunk; the answers are then edited (prompts and ids unchanged): the rerun is
    refused naming --task, the items kept; with the file restored it resumes."""
    import dtrpo.evaluate
    import dtrpo.pairs

    monkeypatch.syspath_prepend(str(setup))
    prompts = tmp_path / "p.jsonl"
    shutil.copy(setup / "p.jsonl", prompts)
    extra = ["--samples", 2, "--temperature", 1, "--reward", "faults_rewards:length"] if command == "pairs" else []
    flags = [command, "--model_name_or_path", setup / "tiny", "--task", prompts, "--gen_length", 4, "--batch_size",
             2 if command == "eval" else 4, "--split", "train", "--output", tmp_path / "out.json", *extra]  # fmt: skip
    module, name = (dtrpo.evaluate, "eval_chunk") if command == "eval" else (dtrpo.pairs, "sample_chunk")
    real, calls = getattr(module, name), []

    def killed_at_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(module, name, killed_at_the_second_chunk)
        with pytest.raises(KeyboardInterrupt):
            cli(*flags)
    items = tmp_path / f"out.{'items' if command == 'eval' else 'samples'}.jsonl"
    kept, original = items.read_bytes(), prompts.read_text()
    prompts.write_text(original.replace('"answer": "0"', '"answer": "1"'))
    res = cli(*flags, ok=False, capsys=capsys)
    assert f"error: {items}: chunk 0 was made from another version of the prompts file --task {prompts} " in (
        res.stderr
    )
    assert items.read_bytes() == kept and not (tmp_path / "out.json").exists()
    prompts.write_text(original)
    cli(*flags, capsys=capsys)
    assert (tmp_path / "out.json").is_file()


# ----------------------------------------------------------------------------- no room left at a save

NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"
TOO_LARGE = "Error while serializing: I/O error: File too large (os error 27)"
UNEXPECTED_POS = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
IOSTREAM = "basic_ios::clear: iostream error"


def safetensors_fails(monkeypatch, message: str) -> None:
    """Every safetensors write raises what safetensors raises on a full disk (not an OSError)."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(message)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)


@pytest.mark.parametrize("message", [NO_SPACE, TOO_LARGE])
def test_no_room_for_the_final_model_without_checkpoints_says_the_weights_are_lost(setup, tmp_path, monkeypatch,  # noqa: F811
                                                                                   capsys, message):  # fmt: skip
    out = tmp_path / "full"
    safetensors_fails(monkeypatch, message)
    res = train(setup, out, "--save_strategy", "no", ok=False, capsys=capsys)
    line = res.stderr.strip().splitlines()[-1]
    assert line == (
        f"error: writing the final model to {out} failed ({message}); is the disk full? It is not saved: no "
        "checkpoint holds the trained weights (--save_strategy no), so they could not be saved and are lost; free "
        "space and train again"
    )
    assert "Traceback" not in res.stderr and not (out / ".partial-model").exists()


@pytest.mark.parametrize("message", [UNEXPECTED_POS, IOSTREAM])
def test_no_room_at_a_checkpoint_is_one_line_and_the_resume_is_exact(setup, done_run, tmp_path, monkeypatch,  # noqa: F811
                                                                     capsys, message):  # fmt: skip
    """torch's writer fails on checkpoint-2's optimizer state: one line naming checkpoint-1, which is whole;
    once there is room, the resume gives the uninterrupted run's model."""
    real, out = torch.save, tmp_path / "full"

    def full_at_step_2(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and "checkpoint-2" in str(f):
            raise RuntimeError(message)
        return real(obj, f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_at_step_2)
        res = train(setup, out, ok=False, capsys=capsys)
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: writing checkpoint-2 failed at step 2 ({message}); is the disk full? The run stopped; "
        f"{out / 'checkpoint-1'} is complete: resume with --resume_from_checkpoint last"
    )
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [".partial-checkpoint-2", "checkpoint-1"]
    train(setup, out, "--resume_from_checkpoint", "last", capsys=capsys)
    got, want = weights(out), weights(done_run)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_no_room_for_the_final_model_after_checkpoints_resumes_to_it(setup, done_run, tmp_path, monkeypatch,  # noqa: F811
                                                                     capsys):  # fmt: skip
    out = tmp_path / "full"
    with monkeypatch.context() as m:
        real = DiffusionTrainer.save_model

        def final_save_fails(self, output_dir=None, _internal_call=False):
            if not _internal_call:
                safetensors_fails(m, TOO_LARGE)
            return real(self, output_dir, _internal_call)

        m.setattr(DiffusionTrainer, "save_model", final_save_fails)
        res = train(setup, out, ok=False, capsys=capsys)
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: writing the final model to {out} failed ({TOO_LARGE}); is the disk full? It is not saved: "
        f"{out / 'checkpoint-2'} is complete; free space and resume with --resume_from_checkpoint last"
    )
    res = train(setup, out, "--resume_from_checkpoint", "last", capsys=capsys)
    got, want = weights(out), weights(done_run)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
@pytest.mark.parametrize(("where", "share"), [("final", 0.5), ("checkpoint", 1.5)])
def test_a_real_file_size_limit_is_one_line(setup, done_run, tmp_path, where, share):  # noqa: F811
    """`ulimit -f` for real, in a subprocess: below the model's size the final save fails in safetensors; between
    the model's size and its optimizer state's (twice as large), checkpoint-1 fails in torch's writer."""
    import resource
    import subprocess
    import sys

    limit = int((done_run / "model.safetensors").stat().st_size * share)
    out = tmp_path / "limited"
    strategy = ["--save_strategy", "no"] if where == "final" else ["--save_strategy", "steps", "--save_steps", 1]
    argv = ["train", "--model_name_or_path", setup / "tiny", "--dataset_name", setup / "pairs.jsonl", "--output_dir",
            out, "--per_device_train_batch_size", 4, "--max_steps", 2, "--learning_rate", 1e-2, "--use_cpu", "true",
            "--disable_tqdm", "true", "--report_to", "none", *strategy]  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "dtrpo.cli", *map(str, argv)],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    if where == "final":
        assert last.startswith(f"error: writing the final model to {out} failed (Error while serializing: I/O error: ")
        assert "File too large" in last and "so they could not be saved and are lost" in last
    else:
        assert last.startswith("error: writing checkpoint-1 failed at step 1 ([enforce fail at inline_container.cc")
        assert "unexpected pos" in last and last.endswith("is the disk full? The run stopped; resume with "
                                                          "--resume_from_checkpoint last")  # fmt: skip


# ----------------------------------------------------------------------------- the smaller cases


def test_a_reward_calling_sys_exit_is_one_line_naming_it(setup, tmp_path, monkeypatch, capsys):  # noqa: F811
    (tmp_path / "exit_rewards.py").write_text("import sys\n\ndef exits(prompt, response):\n    sys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = cli("eval", "--model_name_or_path", setup / "tiny", "--task", setup / "p.jsonl", "--gen_length", 4,
              "--split", "train", "--reward", "exit_rewards:exits", ok=False, capsys=capsys)  # fmt: skip
    assert res.returncode != 3 and (
        f"error: {setup / 'p.jsonl'}: scoring item id='q0' (prompt '0+0=') called sys.exit(3); a reward returns a "
        "number" in res.stderr
    )


def test_an_export_killed_mid_write_is_finished_by_its_rerun(setup, done_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    import dtrpo.families

    out, real = tmp_path / "export", dtrpo.families.export_checkpoint

    def write_part_then_die(model, tokenizer, adapter, output, *args, **kwargs):
        Path(output).mkdir(parents=True, exist_ok=True)
        (Path(output) / "config.json").write_text("{}")
        (Path(output) / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(dtrpo.families, "export_checkpoint", write_part_then_die)
        with pytest.raises(KeyboardInterrupt):
            cli("export", "--model_name_or_path", done_run, "--output", out)
    assert real is dtrpo.families.export_checkpoint
    cli("export", "--model_name_or_path", done_run, "--output", out, capsys=capsys)  # its own export: finished
    got, want = weights(out), weights(done_run)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_generate_refuses_a_cache_with_use_cache_false(setup, capsys):  # noqa: F811
    res = cli("generate", "--model_name_or_path", setup / "tiny", "--prompt", "1+1=", "--gen_length", 4, "--cache",
              "prefix", "--use_cache", "false", ok=False, capsys=capsys)  # fmt: skip
    assert "error: --use_cache false is --cache none, yet --cache prefix was given: pass one of them" in res.stderr


def test_a_prompt_longer_than_the_positions_names_it_and_max_prompt_length(setup, capsys):  # noqa: F811
    prompt = "1+" * 2050 + "="  # 4101 characters, one token each; the tiny model has 4096 positions
    res = cli("generate", "--model_name_or_path", setup / "tiny", "--prompt", prompt, "--gen_length", 4,
              "--max_prompt_length", 10000, ok=False, capsys=capsys)  # fmt: skip
    assert (
        "error: the prompt '1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+'... is 4101 tokens, which "
        "leaves no room for --gen_length 4 within the model's max_position_embeddings=4096: pass "
        "--max_prompt_length 4092 or less"
    ) in res.stderr
    res = cli("generate", "--model_name_or_path", setup / "tiny", "--prompt", prompt, "--gen_length", 4,
              "--max_prompt_length", 4092, capsys=capsys)  # fmt: skip
    assert "NFE" in res.stdout  # the suggested limit works


def test_ref_log_probs_file_equal_to_the_training_data_is_refused(setup, tmp_path, capsys):  # noqa: F811
    data = setup / "pairs.jsonl"
    before = data.read_bytes()
    res = train(setup, tmp_path / "out", "--precompute_ref_log_probs", "true", "--ref_log_probs_file", data,
                ok=False, capsys=capsys)  # fmt: skip
    assert (
        f"error: --ref_log_probs_file {data} is the training data --dataset_name {data}: it names the file the "
        f"reference scores are kept in; name another one (default: {data}.ref_logps.json)"
    ) in res.stderr
    assert data.read_bytes() == before


@pytest.mark.parametrize("command", ["eval", "train"])
def test_an_integer_of_5000_digits_names_the_file_and_line(setup, tmp_path, command, capsys):  # noqa: F811
    huge = "9" * 5000
    if command == "eval":
        path = tmp_path / "p.jsonl"
        path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4", "extra": ' + huge + "}\n")
        res = cli("eval", "--model_name_or_path", setup / "tiny", "--task", path, ok=False, capsys=capsys)
    else:
        path = tmp_path / "pairs.jsonl"
        path.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3", "extra": ' + huge + "}\n")
        res = train(setup, tmp_path / "out", "--dataset_name", path, ok=False, capsys=capsys)
    line = 2 if command == "eval" else 1
    assert (
        f"error: {path}: line {line}: unreadable JSON (Exceeds the limit (4300 digits) for integer string "
        "conversion: value has 5000 digits)"
    ) in res.stderr


def test_compare_on_one_item_has_no_interval(tmp_path, capsys):
    for name, score in (("a", 0), ("b", 1)):
        (tmp_path / f"{name}.json").write_text(
            json.dumps({"samples": [{"id": "q0", "prompt": "1+1=", "score": score}]})
        )
    res = cli("eval", "--compare", tmp_path / "a.json", tmp_path / "b.json", capsys=capsys)
    assert "+1.000 (n = 1: no interval; n=1 paired items" in res.stdout and "nan" not in res.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("gen_length=abc", "dtrpo model_args: gen_length must be a positive integer, got 'abc'"),
        ("gen_length=7", "dtrpo model_args: gen_length=7 is not a multiple of the block size 4"),
        ("mc_samples=0", "dtrpo model_args: mc_samples must be a positive integer, got 0"),
        ("temperature=hot", "dtrpo model_args: temperature must be a finite number, got 'hot'"),
        ("remasking=best", "dtrpo model_args: remasking must be one of ('low_confidence', 'random', 'margin', "
                           "'entropy'), got 'best'"),
        ("fix_first_token=1", "dtrpo model_args: fix_first_token must be one of (True, False), got 1"),
    ],
)  # fmt: skip
def test_lm_eval_model_args_of_the_wrong_kind_are_refused(setup, args, message):  # noqa: F811
    pytest.importorskip("lm_eval")
    from dtrpo.harness import DTRPOLM

    with pytest.raises(ValueError) as err:
        DTRPOLM.create_from_arg_string(f"pretrained={setup / 'tiny'},{args}")
    assert str(err.value) == message


class RunsCode:
    """Unpickling this calls `open(marker, "w")`: it stands for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "pytorch_model.bin"])
def test_a_checkpoint_file_holding_code_is_refused_in_one_line(setup, done_run, tmp_path, name, capsys):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(done_run, out)
    checkpoint, marker = out / "checkpoint-1", tmp_path / "ran"
    if name == "pytorch_model.bin":
        (checkpoint / "model.safetensors").unlink()
    torch.save({"state": RunsCode(marker)}, checkpoint / name)
    shutil.rmtree(out / "checkpoint-2")
    res = train(setup, out, "--resume_from_checkpoint", checkpoint, ok=False, capsys=capsys)
    last = res.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: {checkpoint / name}: refused: it holds objects other than tensors, which could run code "
        "(checkpoint files load only with weights_only=True); resume from a checkpoint this run wrote"
    )
    assert not marker.exists() and "Traceback" not in res.stderr


def test_more_samples_than_a_batch_are_sampled_in_batches(setup, tmp_path, monkeypatch, capsys):  # noqa: F811
    """--samples 8 --batch_size 4: every sampler call holds at most 4 sequences, each on a seed of its own."""
    import dtrpo.evaluate

    real, calls = dtrpo.evaluate.generate, []

    def counted(adapter, model, prompts, *args, seed, **kwargs):
        calls.append((len(prompts), seed))
        return real(adapter, model, prompts, *args, seed=seed, **kwargs)

    monkeypatch.setattr(dtrpo.evaluate, "generate", counted)
    monkeypatch.syspath_prepend(str(setup))
    out = tmp_path / "pairs.jsonl"
    cli("pairs", "--model_name_or_path", setup / "tiny", "--task", setup / "p.jsonl", "--samples", 8, "--temperature",
        1, "--gen_length", 4, "--batch_size", 4, "--split", "train", "--n", 3, "--reward", "faults_rewards:length",
        "--output", out, capsys=capsys)  # fmt: skip
    assert [size for size, _ in calls] == [4] * 6 and len({seed for _, seed in calls}) == 6
    items = [json.loads(line) for line in (tmp_path / "pairs.samples.jsonl").read_text().splitlines()]
    assert [len(item["responses"]) for item in items] == [8, 8, 8]
