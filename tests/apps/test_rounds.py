"""`dtrpo bench rounds` at a tiny scale: seed 0 of every arm at every rate of the grid, later seeds at the rate
the validation split chose, one JSON per (arm, rate, seed) with a curve per round, the one-shot arm at the rounds'
total samples and steps, the more-SFT arm on the teacher's data, a rerun that runs nothing, and the report."""

import json

import pytest
import torch

from dtrpo.apps.rounds import RoundsArgs
from dtrpo.cli import main

TINY = [
    "--task", "noisy_arithmetic:digits=1", "--arms", "iter_rpo,once_rpo,sft_more", "--seeds", "2", "--rounds", "2",
    "--prompts_per_round", "6", "--samples", "4", "--steps", "2", "--batch_size", "2", "--heldout", "6",
    "--validation", "30", "--hidden_size", "32", "--num_layers", "1", "--sft_examples", "20", "--sft_steps", "150",
    "--learning_rates", "1e-3,3e-4",
]  # fmt: skip


@pytest.fixture
def threads():
    """The study sets one torch thread for the process: restored after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_rounds_study_tunes_every_arm_and_writes_a_report(tmp_path, threads, monkeypatch, capsys):
    paths = ["--output_dir", tmp_path / "runs", "--results_dir", tmp_path / "results", "--report", tmp_path / "r.md"]
    argv = ["bench", "rounds", *[str(x) for x in paths], *TINY]
    main(argv)
    results = tmp_path / "results" / "noisy_arithmetic"
    runs = {}
    for arm in ("iter_rpo", "once_rpo", "sft_more"):
        grid = {lr: json.loads((results / arm / f"lr{lr}" / "s0.json").read_text()) for lr in ("0.001", "0.0003")}
        best = max(grid.values(), key=lambda r: r["validation_accuracy"])["validation_accuracy"]
        chosen = next(lr for lr, r in grid.items() if r["validation_accuracy"] == best)  # ties: first in the grid
        assert (results / arm / f"lr{chosen}" / "s1.json").exists()  # seed 1 runs the chosen rate only
        assert [p.name for p in results.glob(f"{arm}/*/s1.json")] == ["s1.json"]
        runs[arm] = grid[chosen]
        for lr, run in grid.items():
            assert run["settings"]["train"]["learning_rate"] == float(lr) == run["learning_rate"]
    validation = {r["validation_n"] for r in runs.values()}
    assert len(validation) == 1 and 0 < validation.pop() <= 30
    assert [p["round"] for p in runs["iter_rpo"]["curve"]] == [0, 1, 2]
    once = runs["once_rpo"]["settings"]
    assert [p["round"] for p in runs["once_rpo"]["curve"]] == [0, 1]
    assert once["loop"]["prompts_per_round"] == 12 and once["train"]["max_steps"] == 4  # the rounds' total
    assert once["train"]["rpo_alpha"] == 1.0
    more = runs["sft_more"]["curve"]
    assert [p["round"] for p in more] == [0, 1] and more[1]["pairs"] == 0
    assert more[1]["cumulative_passes"] == 4 * 2  # 4 steps of 2 demonstrations, one pass each, no sampling
    for run in runs.values():
        assert run["curve"][0]["scores"] == runs["iter_rpo"]["curve"][0]["scores"]  # one SFT start, same prompts
        assert len(run["curve"][-1]["scores"]) == 6 and run["curve"][-1]["cumulative_passes"] > 0
    report = (tmp_path / "r.md").read_text()
    assert "| once_rpo | " in report and "| sft_more | " in report and "paired diff. to" in report
    assert "Validation accuracy of seed 0 at each learning rate" in report and "**" in report
    assert (tmp_path / "figures").is_dir()
    monkeypatch.setattr("dtrpo.apps.rounds.run_arm", lambda *a, **k: pytest.fail("a finished arm ran again"))
    main(argv)
    assert "wrote" in capsys.readouterr().out


def test_validation_prompts_are_never_sampled_by_a_round(tmp_path):
    """The tuning split holds no prompt that any seed's rounds train on (checked against `iterate`'s own draw)."""
    from dtrpo.apps.quality import task_data
    from dtrpo.apps.rounds import quality_args, validation_rows
    from dtrpo.iterate import round_prompts

    args = RoundsArgs(
        task="arithmetic:digits=2", seeds=3, rounds=2, prompts_per_round=200, validation=100, sft_examples=50
    )
    d = task_data(quality_args(args), args.task)
    rows = validation_rows(args, d)
    sampled = {r["id"] for s in range(3) for k in (1, 2) for r in round_prompts(d.task, k, 200, s)[0]}
    assert rows and not {r["id"] for r in rows} & sampled
    assert len(rows) < len(d.validation)  # some were set aside: the test could fail


@pytest.mark.parametrize("grid", ["", "1e-3,x", "1e-3,-1", "nan"])
def test_a_bad_learning_rate_grid_is_named(grid):
    with pytest.raises(ValueError, match="--learning_rates"):
        RoundsArgs(learning_rates=grid).rates()
