"""`dtrpo bench rounds` at a tiny scale: one JSON per (arm, seed) with a curve per round, the one-shot arm at the
rounds' total samples and steps, a rerun that runs nothing, and the report's table."""

import json

import pytest
import torch

from dtrpo.cli import main

TINY = [
    "--task", "noisy_arithmetic:digits=1", "--arms", "iter_rpo,iter_rft,once_rpo", "--seeds", "1", "--rounds", "2",
    "--prompts_per_round", "6", "--samples", "4", "--steps", "2", "--batch_size", "2", "--heldout", "6",
    "--validation", "6", "--hidden_size", "32", "--num_layers", "1", "--sft_examples", "20", "--sft_steps", "150",
    "--learning_rate", "1e-3",
]  # fmt: skip


@pytest.fixture
def threads():
    """The study sets one torch thread for the process: restored after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_rounds_study_writes_every_arm_and_a_report(tmp_path, threads, monkeypatch, capsys):
    paths = ["--output_dir", tmp_path / "runs", "--results_dir", tmp_path / "results", "--report", tmp_path / "r.md"]
    argv = ["bench", "rounds", *[str(x) for x in paths], *TINY]
    main(argv)
    results = tmp_path / "results" / "noisy_arithmetic"
    runs = {arm: json.loads((results / arm / "s0.json").read_text()) for arm in ("iter_rpo", "iter_rft", "once_rpo")}
    assert (
        [p["round"] for p in runs["iter_rpo"]["curve"]] == [0, 1, 2] == [p["round"] for p in runs["iter_rft"]["curve"]]
    )
    once = runs["once_rpo"]["settings"]
    assert [p["round"] for p in runs["once_rpo"]["curve"]] == [0, 1]
    assert once["loop"]["prompts_per_round"] == 12 and once["train"]["max_steps"] == 4  # the rounds' total
    assert runs["iter_rft"]["settings"]["loop"]["method"] == "rft" and once["train"]["rpo_alpha"] == 1.0
    for run in runs.values():
        assert run["curve"][0]["scores"] == runs["iter_rpo"]["curve"][0]["scores"]  # one SFT start, same prompts
        assert len(run["curve"][-1]["scores"]) == 6 and run["curve"][-1]["cumulative_passes"] > 0
    report = (tmp_path / "r.md").read_text()
    assert "| once_rpo | " in report and "paired diff. to" in report and (tmp_path / "figures").is_dir()
    monkeypatch.setattr("dtrpo.apps.rounds.run_arm", lambda *a, **k: pytest.fail("a finished arm ran again"))
    main(argv)
    assert "wrote" in capsys.readouterr().out
