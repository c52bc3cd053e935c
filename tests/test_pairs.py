"""Pair forming and the evaluation interval, against hand-written expectations."""

import json
import random

import pytest

from dtrpo.evaluate import interval95
from dtrpo.pairs import PairArgs, form_pairs

SCORED = [("a", 0.0), ("b", 1.0), ("c", 0.5), ("d", 1.0)]


def test_best_worst_takes_the_first_best_and_the_first_worst():
    assert form_pairs(SCORED, "best_worst", None, random.Random(0)) == [(1, 0)]
    assert form_pairs([("a", 1.0), ("b", 1.0)], "best_worst", None, random.Random(0)) == []  # no worse answer


def test_all_ordered_pairs_with_a_strictly_higher_score_first():
    want = [(1, 0), (1, 2), (2, 0), (3, 0), (3, 2)]
    assert sorted(form_pairs(SCORED, "all", None, random.Random(0))) == want
    capped = form_pairs(SCORED, "all", 2, random.Random(0))
    assert len(capped) == 2 and set(capped) <= set(want)
    with pytest.raises(ValueError, match="pairing"):
        form_pairs(SCORED, "some", None, random.Random(0))


def test_wilson_interval_by_hand():
    # 5 right of 10, z = 1.96: centre (0.5 + 0.19208) / 1.38416 = 0.5,
    # half = 1.96 * sqrt(0.025 + 0.009604) / 1.38416 = 0.263404 -> [0.236596, 0.763404]
    low, high = interval95([1.0] * 5 + [0.0] * 5)
    assert abs(low - 0.236596) < 1e-5 and abs(high - 0.763404) < 1e-5
    low, high = interval95([0.0] * 20)
    assert low == 0.0 and 0 < high < 0.2
    low, high = interval95([0.0, 0.5, 1.0])  # not 0/1: the normal interval of the mean, 0.5 +- 1.96 * 0.5 / sqrt 3
    assert abs(low - (0.5 - 1.96 * 0.5 / 3**0.5)) < 1e-9


# ----------------------------------------------------------------------------- resumable and sharded runs


@pytest.fixture(scope="module")
def pair_setup(tmp_path_factory):
    from dtrpo.families import load_model
    from dtrpo.models import init_tiny
    from dtrpo.tasks import Arithmetic

    root = tmp_path_factory.mktemp("pairs")
    model, tokenizer, adapter = load_model(init_tiny(root / "tiny", block_size=8, hidden_size=32))
    task = Arithmetic(digits=1)
    rows = task.prompts("train", 10, seed=0)
    return root, (model, tokenizer, adapter, task, rows)


def run(pair_setup, output, **env):
    from dtrpo.evaluate import SamplingArgs
    from dtrpo.pairs import run_pairs

    _, (model, tokenizer, adapter, task, rows) = pair_setup
    s = SamplingArgs(gen_length=8, temperature=1.0, batch_size=6)  # 3 prompts x 2 samples per chunk: 4 chunks
    return run_pairs(model, tokenizer, adapter, task, rows, PairArgs(samples=2), s, model_name="tiny", output=output)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_an_interrupted_run_resumes_to_the_same_pairs(pair_setup, tmp_path, monkeypatch):
    import dtrpo.pairs

    full = run(pair_setup, tmp_path / "full.jsonl")
    assert full["prompts"] == 10
    calls = {"n": 0}
    real = dtrpo.pairs.sample_chunk

    def dies_on_the_third_chunk(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(dtrpo.pairs, "sample_chunk", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        run(pair_setup, tmp_path / "cut.jsonl")
    items = tmp_path / "cut.samples.jsonl"
    assert len(lines(items)) == 6  # chunks 0 and 1 (3 prompts each) were written before the kill
    with items.open("a") as f:  # a kill in the middle of writing chunk 2: one whole line of it, then half a line
        f.write(json.dumps(lines(tmp_path / "full.samples.jsonl")[6]) + "\n" + '{"id": "half a line')
    resumed = []
    monkeypatch.setattr(dtrpo.pairs, "sample_chunk", lambda *a: (resumed.append(a[-1]), real(*a))[1])
    run(pair_setup, tmp_path / "cut.jsonl")
    assert resumed == [2, 3]  # only the chunks not done were sampled; chunk 2, cut short, again and whole
    got, want = lines(items), lines(tmp_path / "full.samples.jsonl")
    assert sorted(x["id"] for x in got) == sorted(x["id"] for x in want) and len(got) == 10  # none lost or twice
    assert sorted(got, key=lambda x: x["id"]) == sorted(want, key=lambda x: x["id"])  # the same samples
    assert lines(tmp_path / "cut.jsonl") == lines(tmp_path / "full.jsonl")  # the same pairs, in prompt order
    assert [x["chunk"] for x in got] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # appended in increasing chunk order


def test_a_run_with_other_prompts_is_refused_not_mixed(pair_setup, tmp_path):
    from dtrpo.evaluate import SamplingArgs
    from dtrpo.pairs import run_pairs

    _, (model, tokenizer, adapter, task, rows) = pair_setup
    out = tmp_path / "out.jsonl"
    run(pair_setup, out)
    s = SamplingArgs(gen_length=8, temperature=1.0, batch_size=6)
    other = [rows[0], {**rows[1], "prompt": "9+9="}, *rows[2:]]  # the ids of the first run, another prompt text
    with pytest.raises(ValueError, match=r"out.samples.jsonl: chunk 0 .* does not hold the prompts"):
        run_pairs(model, tokenizer, adapter, task, other, PairArgs(samples=2), s, model_name="tiny", output=out)
    s = SamplingArgs(gen_length=8, temperature=1.0, batch_size=4)  # 2 prompts per chunk: chunk 0 is another chunk
    with pytest.raises(ValueError, match=r"out.samples.jsonl: chunk 0 was made by another run \(batch_size: 6 -> 4\)"):
        run_pairs(model, tokenizer, adapter, task, rows, PairArgs(samples=2), s, model_name="tiny", output=out)


def test_two_ranks_split_the_chunks_and_rank_0_writes_the_pairs(pair_setup, tmp_path, monkeypatch):
    full = run(pair_setup, tmp_path / "full.jsonl")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run(pair_setup, tmp_path / "two.jsonl") == {}  # rank 1: its chunks 1 and 3, no pairs file
    assert not (tmp_path / "two.jsonl").exists()
    monkeypatch.setenv("RANK", "0")
    stats = run(pair_setup, tmp_path / "two.jsonl")
    assert stats["pairs"] == full["pairs"] and lines(tmp_path / "two.jsonl") == lines(tmp_path / "full.jsonl")
    ranks = [lines(tmp_path / f"two.samples.rank{r}.jsonl") for r in (0, 1)]
    assert {x["chunk"] for x in ranks[0]} == {0, 2} and {x["chunk"] for x in ranks[1]} == {1, 3}


def test_rank_files_merge_round_robin_in_chunk_order(tmp_path):
    from dtrpo.evaluate import merged_items

    def write(name, chunks):
        (tmp_path / name).write_text("".join(json.dumps({"id": f"{k}.{i}", "chunk": k}) + "\n" for k, i in chunks))
        return tmp_path / name

    ranks = [write("r0", [(0, 0), (0, 1), (2, 0), (4, 0)]), write("r1", [(1, 0), (3, 0), (3, 1)])]
    assert [x["id"] for x in merged_items(ranks)] == ["0.0", "0.1", "1.0", "2.0", "3.0", "3.1", "4.0"]
    gap = [write("g0", [(0, 0), (2, 0)]), write("g1", [(3, 0)])]  # chunk 1 lost: refused, not skipped
    with pytest.raises(ValueError, match="g1: holds chunk 3 where chunk 1 belongs"):
        list(merged_items(gap))


# ----------------------------------------------------------------------------- prompts files at scale


@pytest.fixture(scope="module")
def prompts_file(pair_setup):
    root, _ = pair_setup
    path = root / "prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"p{a}", "prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(40))
    )
    return path


def alive_rows(monkeypatch):
    """Counts the prompts-file rows alive at each pull: every row the file gives is a weakly referenced dict,
    so the count is exactly the rows some part of the run still holds."""
    import weakref

    from dtrpo.tasks import FileTask

    class Row(dict):
        pass

    alive, peak, real = [0], [0], FileTask.rows

    def freed() -> None:
        alive[0] -= 1

    def counted(self):
        for row in real(self):
            row = Row(row)
            weakref.finalize(row, freed)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            yield row

    monkeypatch.setattr(FileTask, "rows", counted)
    return peak


@pytest.mark.parametrize("command", ["pairs", "eval"])
def test_a_prompts_file_is_streamed_a_chunk_at_a_time(pair_setup, prompts_file, tmp_path, monkeypatch, command):
    """40 prompts in chunks of 3 (pairs: 6 samples per batch / 2) or 6 (eval): at most the chunk being
    sampled and the one being pulled are alive, never the file (the list of the old `task.prompts`: 40)."""
    from dtrpo.cli import main

    root, _ = pair_setup
    peak = alive_rows(monkeypatch)
    out = tmp_path / ("pairs.jsonl" if command == "pairs" else "eval.json")
    extra = ["--samples", "2", "--temperature", "1", "--split", "train"] if command == "pairs" else []
    main([command, "--model_name_or_path", str(root / "tiny"), "--task", str(prompts_file), "--gen_length", "8",
          "--batch_size", "6", "--output", str(out), *extra])  # fmt: skip
    chunk = 3 if command == "pairs" else 6
    assert 0 < peak[0] <= 2 * chunk, peak[0]
    if command == "pairs":
        assert len(lines(tmp_path / "pairs.samples.jsonl")) == 40
    else:
        assert json.loads(out.read_text())["n"] == 40


def torchrun(cwd, *args) -> None:
    """`dtrpo ARGS` in two real processes under torch.distributed.run (each rank its own RANK, WORLD_SIZE)."""
    import os
    import subprocess
    import sys

    from tests.test_trainer import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "dtrpo.cli", *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def one_process(*args) -> None:
    """`dtrpo ARGS` in this process on one thread, as each torchrun rank runs."""
    import torch

    from dtrpo.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def test_two_processes_write_the_pairs_of_one(pair_setup, prompts_file, tmp_path, monkeypatch):
    """torchrun with 2 ranks on a prompts file (40 prompts, 14 chunks of 3, 7 per rank): the same pairs file,
    byte for byte, as one process, and each rank's samples file holds only its own chunks. The reward is the
    response's length, so that the untrained model's samples make pairs."""
    root, _ = pair_setup
    (tmp_path / "length_reward.py").write_text("def reward(prompt, response):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # torchrun's ranks run `python -m` in tmp_path, which finds it too
    args = ["pairs", "--model_name_or_path", root / "tiny", "--task", prompts_file, "--reward", "length_reward:reward",
            "--samples", 2, "--temperature", 1, "--gen_length", 8, "--batch_size", 6, "--split", "train"]  # fmt: skip
    one_process(*args, "--output", tmp_path / "one.jsonl")
    torchrun(tmp_path, *args, "--output", tmp_path / "two.jsonl")
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert len(lines(tmp_path / "one.jsonl")) > 10  # pairs to compare
    for rank in (0, 1):
        chunks = [x["chunk"] for x in lines(tmp_path / f"two.samples.rank{rank}.jsonl")]
        assert sorted(set(chunks)) == list(range(rank, 14, 2))
    assert not list(tmp_path.glob("*.done"))
