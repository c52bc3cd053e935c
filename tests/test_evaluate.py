"""`dtrpo eval` at scale: streamed, resumable and sharded, against the in-memory `evaluate` of the same prompts."""

import json

import pytest

from tests.test_pairs import one_process, pair_setup, prompts_file, torchrun  # noqa: F401 - fixtures

SAMPLING = {"gen_length": 8, "temperature": 1.0, "batch_size": 4}  # 40 prompts: 10 chunks of 4


def reference(pair_setup, prompts_file):  # noqa: F811
    """The report of the in-memory `evaluate` on the prompts file's rows, as a list."""
    from dtrpo.evaluate import SamplingArgs, evaluate
    from dtrpo.tasks import load_task

    _, (model, tokenizer, adapter, _, _) = pair_setup
    task = load_task(str(prompts_file), reward=lambda p, r: float(len(r)) / 8)  # not 0/1: the normal interval
    return task, evaluate(model, tokenizer, adapter, task, task.prompts("heldout"), SamplingArgs(**SAMPLING))


def test_an_interrupted_eval_resumes_to_the_report_of_evaluate(pair_setup, prompts_file, tmp_path, monkeypatch):  # noqa: F811
    import dtrpo.evaluate
    from dtrpo.evaluate import SamplingArgs, run_eval

    _, (model, tokenizer, adapter, _, _) = pair_setup
    task, want = reference(pair_setup, prompts_file)
    real, calls = dtrpo.evaluate.eval_chunk, []

    def dies_on_the_fourth_chunk(*args):
        calls.append(args[-1])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(dtrpo.evaluate, "eval_chunk", dies_on_the_fourth_chunk)
    out, s = tmp_path / "eval.json", SamplingArgs(**SAMPLING)
    with pytest.raises(KeyboardInterrupt):
        run_eval(model, tokenizer, adapter, task, task.stream("heldout"), s, out)
    items = tmp_path / "eval.items.jsonl"
    assert len(items.read_text().splitlines()) == 12 and not out.exists()  # chunks 0-2 kept, no report yet
    with items.open("a") as f:
        f.write('{"id": "p12", "prompt": "12+1')  # a line cut by the kill
    calls.clear()
    monkeypatch.setattr(dtrpo.evaluate, "eval_chunk", lambda *a: (calls.append(a[-1]), real(*a))[1])
    got = run_eval(model, tokenizer, adapter, task, task.stream("heldout"), s, out)
    assert calls == list(range(3, 10))  # only the chunks not done
    report = json.loads(out.read_text())
    for key in ("task", "n", "accuracy", "ci95", "nfe_per_batch", "prompts_truncated", "samples"):
        assert report[key] == want[key], key
    assert got == {k: v for k, v in report.items() if k != "samples"}
    assert not items.exists()  # the report holds every item: a later run with this output starts afresh


def test_two_processes_evaluate_as_one(pair_setup, prompts_file, tmp_path, monkeypatch):  # noqa: F811
    """torchrun with 2 ranks (chunks 0, 2, ... and 1, 3, ...): the report of one process, item for item."""
    root, _ = pair_setup
    (tmp_path / "length_reward.py").write_text("def reward(prompt, response):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["eval", "--model_name_or_path", root / "tiny", "--task", prompts_file, "--reward", "length_reward:reward",
            *(x for k, v in SAMPLING.items() for x in (f"--{k}", v))]  # fmt: skip
    one_process(*args, "--output", tmp_path / "one.json")
    torchrun(tmp_path, *args, "--output", tmp_path / "two.json")
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two["n"] == 40 and two["samples"] == one["samples"]
    for key in ("accuracy", "ci95", "nfe_per_batch"):
        assert two[key] == one[key], key
    assert not list(tmp_path.glob("*.items*"))
