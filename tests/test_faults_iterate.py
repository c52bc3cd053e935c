"""Faults of `dtrpo iterate` (issue 22): a round killed in its final save finishes, one run at a time per
folder, the reward's time limit, an edited prompts file, damaged stage files, settings checked before they
are recorded. On the tiny model of tests/test_iterate.py, whose uninterrupted run is the reference."""

import json

import pytest
import torch
from safetensors.torch import load_file

import dtrpo.iterate
from dtrpo.base import DiffusionTrainer
from dtrpo.iterate import iterate
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
