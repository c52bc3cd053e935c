"""`dtrpo iterate` on the tiny model (64 wide, 2 layers, block 4): two rounds end to end, resume after kills in
round 2's sampling and training equal to an uninterrupted run, refusal of changed settings, the RFT path, and
the reference of round 2 (its weights, from the precomputed scores' fingerprint)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import dtrpo.pairs
from dtrpo.cli import main
from dtrpo.evaluate import SamplingArgs
from dtrpo.families import load_model
from dtrpo.iterate import IterateArgs, IterateConfig, examples_seen, iterate, round_prompts
from dtrpo.options import parse
from dtrpo.pairs import PairArgs
from dtrpo.reference import weights_fingerprint
from dtrpo.tasks import TaskSpec, load_task
from dtrpo.trainer import DTRPOConfig

PAIRS = 4  # prompts per round: one best-worst pair each (digit shares of 4 random samples always differ here)


def digit_share(prompt: str, response: str) -> float:
    """The reward of the test task: the share of digits in the response (partial credit, so samples differ)."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny model gains nothing from two, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from dtrpo.models import init_tiny

    tmp = tmp_path_factory.mktemp("iterate")
    init_tiny(tmp / "tiny", block_size=4, hidden_size=64, num_layers=2)
    rows = [
        {"id": f"p{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i), "split": "train" if i < 20 else "heldout"}
        for i in range(10, 26)
    ]
    (tmp / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp


def argv(setup, out, *extra) -> list[str]:
    flags = {
        "--model_name_or_path": setup / "tiny",
        "--task": setup / "prompts.jsonl",
        "--reward": "tests.test_iterate:digit_share",
        "--output_dir": out,
        "--rounds": 2,
        "--prompts_per_round": PAIRS,
        "--samples": 4,
        "--eval_n": 4,
        "--gen_length": 8,
        "--temperature": 1.0,
        "--batch_size": 8,  # 2 prompts x 4 samples per chunk: 2 chunks per round
        "--seed": 0,
        "--max_steps": 2,
        "--per_device_train_batch_size": 2,
        "--learning_rate": 1e-3,
        "--save_steps": 1,
        "--precompute_ref_log_probs": "true",
        "--max_completion_length": 8,
        "--max_prompt_length": 16,
        "--use_cpu": "true",
        "--disable_tqdm": "true",
        "--report_to": "none",
    }
    return [str(x) for kv in flags.items() for x in kv] + [str(x) for x in extra]


def config(setup, out, *extra) -> IterateConfig:
    """The config `dtrpo iterate` builds from these flags."""
    types = [TaskSpec, PairArgs, SamplingArgs, IterateArgs, DTRPOConfig]
    return IterateConfig(*parse(types, argv(setup, out, *extra), "dtrpo iterate", "", shared=True))


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup / "run"
    main(["iterate", *argv(setup, out)])
    return out


def comparable(report: dict) -> list[dict]:
    """A report's rounds without what differs between equal runs (seconds, folders)."""
    drop = {"seconds", "start_model", "model"}
    return [{k: v for k, v in r.items() if k not in drop} for r in report["rounds"]]


def reference_weights(round_dir, data: str = "pairs.jsonl") -> str:
    """The reference a round trained against, as the fingerprint its precomputed scores were made with."""
    return json.loads((round_dir / f"{data}.ref_logps.json").read_text())["fingerprint"]["reference_weights"]


def fingerprint(folder) -> str:
    return weights_fingerprint(load_model(folder)[0])


def copy_rounds(src, dst, *rounds: int) -> None:
    for r in rounds:
        shutil.copytree(src / f"round-{r}", dst / f"round-{r}")


def test_two_rounds_end_to_end(setup, uninterrupted):
    out = uninterrupted
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2] and (out / "rounds.png").stat().st_size > 0
    for r in (1, 2):
        for name in ("pairs.jsonl", "pairs.samples.jsonl", "eval.json", "model/model.safetensors"):
            assert (out / f"round-{r}" / name).is_file(), name
        assert not list((out / f"round-{r}" / "model").glob("checkpoint-*"))  # removed once the round trained
    one, two = report["rounds"]
    assert two["start_model"] == one["model"] == str(out / "round-1" / "model")
    # round 2 started from round 1's output: under reference=previous its reference is a copy of its start model
    assert reference_weights(out / "round-2") == fingerprint(out / "round-1" / "model")
    assert reference_weights(out / "round-1") == fingerprint(setup / "tiny")
    assert fingerprint(out / "round-1" / "model") != fingerprint(out / "round-2" / "model")
    assert "fresh (prompts 1-4" in one["prompts_from"] and "fresh (prompts 5-8" in two["prompts_from"]
    for r in (one, two):
        assert r["pairs"] == PAIRS and r["n"] == 4 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        # 2 steps of 2 pairs, 2 passes per pair with the reference precomputed, plus its 4 pairs x 1 epoch x 2
        assert r["training_passes"] == 2 * 2 * 2 + PAIRS * 1 * 2
        assert r["generation_passes"] > 0 and r["generation_passes"] % (PAIRS * 4) == 0
    assert two["cumulative_passes"] == sum(r["generation_passes"] + r["training_passes"] for r in (one, two))


class KillAtSave(TrainerCallback):
    """Stands for a kill of the process right after round 2's first checkpoint is written."""

    def on_save(self, args, state, control, **kwargs):
        if "round-2" in args.output_dir and state.global_step == 1:
            raise KeyboardInterrupt("killed")


def test_resume_after_kills_in_round_2_equals_an_uninterrupted_run(setup, uninterrupted, monkeypatch):
    out = setup / "resumed"
    copy_rounds(uninterrupted, out, 0, 1)  # the same finished stages; their files say so
    real, calls = dtrpo.pairs.sample_chunk, []

    def sample_then_die(*args, **kwargs):
        calls.append(args[-1])  # the chunk
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(dtrpo.pairs, "sample_chunk", sample_then_die)
    with pytest.raises(KeyboardInterrupt):  # killed while sampling round 2's second chunk
        iterate(config(setup, out), log=lambda line: None)
    assert len((out / "round-2" / "pairs.samples.jsonl").read_text().splitlines()) == 2  # chunk 0's prompts
    logs = []
    with pytest.raises(KeyboardInterrupt):  # resumed, then killed after round 2's first checkpoint
        iterate(config(setup, out), log=logs.append, callbacks=[KillAtSave()])
    assert calls == [0, 1, 1]  # only the chunk not yet sampled was sampled again
    assert "round 1 pairs: done earlier" in "\n".join(logs) and (out / "round-2" / "model" / "checkpoint-1").is_dir()
    logs.clear()
    report = iterate(config(setup, out), log=logs.append)
    assert f"resuming from {out / 'round-2' / 'model' / 'checkpoint-1'}" in "\n".join(logs)
    assert comparable(report) == comparable(json.loads((uninterrupted / "report.json").read_text()))
    final, expected = (load_file(d / "round-2" / "model" / "model.safetensors") for d in (out, uninterrupted))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def test_changed_setting_is_refused_and_rounds_may_change(setup, uninterrupted, capsys):
    out = setup / "moved"
    shutil.copytree(uninterrupted, out)  # a run folder may move: its files name no folder
    with pytest.raises(SystemExit) as err:
        main(["iterate", *argv(setup, out, "--beta", 0.2)])
    assert "--beta (0.1 then, 0.2 now)" in str(err.value) and "--rounds" in str(err.value)
    main(["iterate", *argv(setup, out, "--rounds", 1)])  # fewer rounds: all done already, nothing runs
    printed = capsys.readouterr().out
    assert "round 1 training: done earlier" in printed and "round 2" not in printed
    assert len(json.loads((out / "report.json").read_text())["rounds"]) == 1


def test_rft_takes_the_sft_path(setup, uninterrupted, monkeypatch):
    out = setup / "rft"
    copy_rounds(uninterrupted, out, 0)
    monkeypatch.setattr("dtrpo.trainer.DTRPOTrainer.__init__", lambda *a, **k: pytest.fail("dTRPO trainer built"))
    report = iterate(config(setup, out, "--method", "rft", "--rounds", 1), log=lambda _: None)
    pairs = [json.loads(line) for line in (out / "round-1" / "pairs.jsonl").read_text().splitlines()]
    chosen = [json.loads(line) for line in (out / "round-1" / "chosen.jsonl").read_text().splitlines()]
    assert chosen == [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    saved = json.loads((out / "round-1" / "model" / "dtrpo_config.json").read_text())["args"]
    assert "objective" in saved and "beta" not in saved  # a DiffusionSFTConfig
    assert report["rounds"][0]["training_passes"] == 2 * 2  # 2 steps of 2 examples, one pass each


def test_reference_initial_and_keep_pairs(setup, uninterrupted):
    out = setup / "initial"
    copy_rounds(uninterrupted, out, 0, 1)  # round 1 is the same under either reference, with or without keep_pairs
    report = iterate(config(setup, out, "--reference", "initial", "--keep_pairs", "true"), log=lambda _: None)
    assert reference_weights(out / "round-2", "train_pairs.jsonl") == fingerprint(setup / "tiny")
    assert reference_weights(uninterrupted / "round-2") != fingerprint(setup / "tiny")
    lines = [(out / f"round-{r}" / "pairs.jsonl").read_text().splitlines() for r in (1, 2)]
    assert (out / "round-2" / "train_pairs.jsonl").read_text().splitlines() == lines[0] + lines[1]
    assert report["rounds"][1]["training_passes"] == 2 * 2 * 2 + 2 * PAIRS * 1 * 2  # both rounds' pairs precomputed


def test_round_prompts_fresh_while_the_split_lasts_then_the_same_again():
    task = load_task("arithmetic:digits=1")  # 100 problems, about 90 in the train split
    first, second, third = (round_prompts(task, r, 40, seed=0) for r in (1, 2, 3))
    assert [r["id"] for r in first[0] + second[0]] == [r["id"] for r in task.prompts("train", 80, seed=0)]
    assert "fresh" in first[1] and "fresh" in second[1] and "re-sampled (prompts 1-40" in third[1]
    assert third[0] == first[0]


def test_examples_seen_by_hand():
    assert examples_seen(20, 4, 8) == 8 + 8 + 4 + 8  # batches 8, 8, 4 per epoch
    assert examples_seen(20, 3, 8, accumulation=2) == 16 + 4 + 16  # steps of 16 and 4 per epoch
    assert examples_seen(20, 3, 8, drop_last=True) == 8 + 8 + 8


def test_flags_preset_and_shared_flags(setup, tmp_path):
    """A preset sets any section's field, flags win, and a flag both the sampler and the trainer have is one flag
    that both receive (the estimator's T_B is the sampler's steps per block)."""
    (tmp_path / "preset.yaml").write_text("keep_pairs: true\nbeta: 0.3\nseed: 9\nsteps_per_block: 2\n")
    c = config(setup, tmp_path / "out", "--config", tmp_path / "preset.yaml", "--seed", 4)
    assert (c.loop.keep_pairs, c.train.beta) == (True, 0.3) and c.sampling.seed == c.train.seed == 4
    assert c.sampling.steps_per_block == c.train.steps_per_block == 2
    with pytest.raises(SystemExit, match="--prompts_per_round must be positive"):
        main(["iterate", *argv(setup, tmp_path / "out", "--prompts_per_round", 0)])
