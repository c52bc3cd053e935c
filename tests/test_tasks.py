import json
import math

import pytest

from dtrpo.tasks import (
    Arithmetic,
    FileTask,
    last_number,
    load_task,
    problem_split,
    read_result,
    score_batch,
    worked_answer,
)

# ---------------------------------------------------------------------------------------------------
# arithmetic


def test_worked_answer_examples():
    # 47+85: 7+5=12 (write 2, carry 1), 4+8+1=13 -> result 1,3,2
    assert worked_answer(47, "+", 85, 2) == "12,13=132"
    assert worked_answer(10, "+", 10, 2) == "00,02=020"
    # 85-47: 5-7 borrows (write 8), 8-4-1=3 -> 038
    assert worked_answer(85, "-", 47, 2) == "18,03=038"
    # 47*6: 7*6=42 (write 2, carry 4), 4*6+4=28 -> 282
    assert worked_answer(47, "*", 6, 2) == "42,28=282"
    assert worked_answer(7, "+", 5, 1) == "12=12"


@pytest.mark.parametrize("digits", [1, 2, 3, 5])
def test_answers_are_correct(digits):
    task = Arithmetic(digits=digits, ops="+-*")
    for row in task.prompts("train", 150, seed=digits):
        assert row["prompt"] == row["id"] + "="
        assert read_result(row["answer"]) == eval(row["id"])
        assert task.score(row, row["answer"]) == 1.0


@pytest.mark.parametrize(("digits", "blocks"), [(2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)])
def test_answer_spans_blocks(digits, blocks):
    for row in Arithmetic(digits=digits, ops="+-*").prompts("train", 50):
        assert len(row["answer"]) == 4 * digits + 1
        assert math.ceil(len(row["answer"]) / 8) == blocks
        assert math.ceil((len(row["answer"]) + 1) / 8) == blocks  # with EOS


def test_verifier_responses():
    task = Arithmetic()
    row = {"id": "47+85", "prompt": "47+85=", "answer": "12,13=132"}
    correct = ["12,13=132", " 12,13= 132 \n", "12,13=132<eos><eos>", "12,13=132<eos>7,4=9", "11,11=132", "=0132", "132"]
    wrong = ["12,13=131", "12,13=1320", "12,13=", "12,13", "", "<eos>", "=abc132", "12,13=13<eos>2"]
    assert score_batch(task, [row] * len(correct), correct) == [1.0] * len(correct)
    assert score_batch(task, [row] * len(wrong), wrong) == [0.0] * len(wrong)


def test_prompts_deterministic_per_seed():
    task = Arithmetic(digits=3, ops="+-*")
    assert task.prompts("train", 50, seed=1) == task.prompts("train", 50, seed=1)
    assert task.prompts("train", 50, seed=1) != task.prompts("train", 50, seed=2)
    assert task.prompts("heldout", 20, seed=0) == load_task("arithmetic:digits=3,ops=+-*").prompts("heldout", 20)
    rows = task.prompts("train", 200, seed=3)
    assert len({r["id"] for r in rows}) == 200


def test_train_and_heldout_are_disjoint():
    for digits in (1, 2, 3):
        task = Arithmetic(digits=digits, ops="+-*")
        train = {r["id"] for seed in range(5) for r in task.prompts("train", 80, seed)}
        heldout = {r["id"] for seed in range(5) for r in task.prompts("heldout", 10, seed)}
        assert heldout and not train & heldout
        assert all(problem_split(p) == "heldout" for p in heldout)
    # all 100 one-digit sums: about a tenth held out
    split = [problem_split(f"{a}+{b}") for a in range(10) for b in range(10)]
    assert 3 <= split.count("heldout") <= 25


def test_arithmetic_too_many_prompts():
    with pytest.raises(ValueError, match="distinct heldout problems"):
        Arithmetic(digits=1).prompts("heldout", 50)


def test_load_builtin_options_and_errors():
    assert load_task("arithmetic") == Arithmetic()
    assert load_task("arithmetic:digits=4, ops=+-") == Arithmetic(digits=4, ops="+-")
    with pytest.raises(ValueError, match="unknown task 'sorting'"):
        load_task("sorting")
    with pytest.raises(ValueError, match="key one of"):
        load_task("arithmetic:width=3")
    with pytest.raises(ValueError, match="expected int"):
        load_task("arithmetic:digits=three")
    with pytest.raises(ValueError, match="ops must be"):
        load_task("arithmetic:ops=/")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        Arithmetic().prompts("test", 3)
    with pytest.raises(ValueError, match="apply to prompts files"):
        load_task("arithmetic", reward="mod:fn")


# ---------------------------------------------------------------------------------------------------
# user tasks


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_exact_match(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Capital of France?", "answer": "Paris"}, {"prompt": "2+2", "answer": 4}]
    )
    task = load_task(str(path))
    rows = task.prompts("train")
    assert [r["id"] for r in rows] == ["0", "1"] and rows[1]["answer"] == "4"
    assert score_batch(task, rows, [" Paris\n", "4"]) == [1.0, 1.0]
    assert score_batch(task, rows, ["paris", "4.0"]) == [0.0, 0.0]


def test_numeric_match(tmp_path):
    rows = [{"id": "a", "prompt": "q1", "answer": "#### 1,080"}, {"id": "b", "prompt": "q2", "answer": "0.5"}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows))
    task = load_task(str(path), match="numeric")
    rows = task.prompts("heldout")
    assert score_batch(task, rows, ["so 3 boxes make 1080", "half: 0.5000001"]) == [1.0, 1.0]
    assert score_batch(task, rows, ["1,080 then 7", "0.51"]) == [0.0, 0.0]
    assert score_batch(task, rows, ["no number", ""]) == [0.0, 0.0]
    assert last_number("12,13=132") == 132 and last_number("total $1,234.5.") == pytest.approx(1234.5)


def test_file_splits_and_sampling(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": "x", "split": "heldout" if i % 4 == 0 else "train"} for i in range(20)]
    rows.append({"prompt": "shared", "answer": "x"})
    task = load_task(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert isinstance(task, FileTask)
    heldout = task.prompts("heldout")
    assert [r["prompt"] for r in heldout] == ["p0", "p4", "p8", "p12", "p16", "shared"]
    assert task.prompts("train", 5, seed=1) == task.prompts("train", 5, seed=1)
    assert len(task.prompts("train", 100)) == 16


def test_reward_function_module(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text(
        "def length_reward(prompt, response, row):\n"
        "    return len(response) / row['target']\n"
        "\n"
        "def bad(prompt, response, row):\n"
        "    if response == 'boom':\n"
        "        raise KeyError('no score for boom')\n"
        "    return 'high' if response == 'str' else 1\n"
        "\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"id": 7, "prompt": "write", "target": 4}, {"prompt": "more", "target": 2}]
    )
    task = load_task(str(path), reward="my_reward:length_reward")
    rows = task.prompts("train")
    assert rows[0]["id"] == "7" and rows[0]["answer"] == ""
    assert score_batch(task, rows, ["ab", "abcd"]) == [0.5, 2.0]

    task = load_task(str(path), reward="my_reward:bad")
    assert score_batch(task, rows, ["ok", "ok"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"id='7' \(prompt 'write'\) raised KeyError: 'no score for boom'"):
        score_batch(task, rows, ["boom", "ok"])
    with pytest.raises(ValueError, match=r"id='1' \(prompt 'more'\) returned 'high' \(str\), not a number"):
        score_batch(task, rows, ["ok", "str"])
    with pytest.raises(ValueError, match="is a int, not callable"):
        load_task(str(path), reward="my_reward:NOT_CALLABLE")


def test_reward_returning_nan_or_tensor(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "q", "prompt": "p"}])
    rows = load_task(str(path), reward=lambda p, r, row: 0.0).prompts("train")
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(ValueError, match=f"id='q' \\(prompt 'p'\\) returned {value}, not a finite number"):
            score_batch(load_task(str(path), reward=lambda p, r, row, v=value: float(v)), rows, ["x"])
    with pytest.raises(ValueError, match=r"id='q'.*returned \[1.0\] \(list\)"):
        score_batch(load_task(str(path), reward=lambda p, r, row: [1.0]), rows, ["x"])
    with pytest.raises(ValueError, match="1 rows but 2 responses"):
        score_batch(load_task(str(path), reward=lambda p, r, row: 1.0), rows, ["x", "y"])


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts file not found: .*missing.jsonl"):
        load_task(str(tmp_path / "missing.jsonl"))
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}])
    with pytest.raises(ValueError, match=r"p.jsonl: line 2: field 'prompt' is missing.*\['answer', 'question'\]"):
        load_task(str(path))
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(ValueError, match="q.jsonl: line 2: field 'answer' is missing and no reward function"):
        load_task(str(path))
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "answer": "none"}])
    with pytest.raises(ValueError, match="r.jsonl: line 1: field 'answer' 'none' has no number"):
        load_task(str(path), match="numeric")
    (tmp_path / "s.json").write_text('[{"prompt": "a", "answer": "1"},\n 3]')
    with pytest.raises(ValueError, match="s.json: line 2: expected a JSON object, got int"):
        load_task(str(tmp_path / "s.json"))
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="t.jsonl: line 2: not valid JSON"):
        load_task(str(tmp_path / "t.jsonl"))
    with pytest.raises(ValueError, match="unknown match 'fuzzy'"):
        load_task(str(tmp_path / "t.jsonl"), match="fuzzy")


def test_reward_import_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_task(str(path), reward="no_colon")
    with pytest.raises(ImportError, match="'no_such_mod_xyz:f': cannot import module 'no_such_mod_xyz'"):
        load_task(str(path), reward="no_such_mod_xyz:f")
    with pytest.raises(ImportError, match="'json:nope': module 'json' has no attribute 'nope'"):
        load_task(str(path), reward="json:nope")


def test_gsm8k_layout_with_prompt_field_and_numeric_match(tmp_path):
    """GSM8K's files hold `question` and an `answer` ending in '#### N' (rows written here, not copied)."""
    path = tmp_path / "gsm.jsonl"
    rows = [
        {"question": "Two plus three?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
        {"question": "Ten times a hundred and eight?", "answer": "#### 1,080"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(str(path), match="numeric", prompt_field="question")
    got = task.prompts("heldout")
    assert [r["prompt"] for r in got] == ["Two plus three?", "Ten times a hundred and eight?"]
    assert score_batch(task, got, ["so the answer is 5.", "It is 1080"]) == [1.0, 1.0]
    assert score_batch(task, got, ["6", "108"]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="field 'prompt' is missing"):
        load_task(str(path), match="numeric")


def test_a_prompts_file_streams_lazily_and_as_prompts_gives_it(tmp_path):
    """`stream` reads a row only when asked: the first rows come before a bad line later in the file is read
    (`prompts`, a list, reads to it and fails); whole, and with `n`, it gives exactly `prompts`."""
    from dtrpo.tasks import Arithmetic, FileTask, stream_prompts

    path = tmp_path / "p.jsonl"
    rows = [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    task = FileTask(path)
    stream = task.stream("train")
    assert [next(stream)["id"] for _ in range(6)] == [str(i) for i in range(6)]
    with pytest.raises(ValueError, match="line 7"):
        task.prompts("train")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(task.stream("heldout")) == task.prompts("heldout")
    assert list(task.stream("train", 3, seed=2)) == task.prompts("train", 3, seed=2)
    assert list(stream_prompts(Arithmetic(), "train", 5)) == Arithmetic().prompts("train", 5)  # a built-in: its list


def test_noisy_sort_partial_credit_by_hand():
    task = load_task("noisy_sort:length=5")
    row = {"id": "52918", "prompt": "52918>", "answer": "12589"}
    # positions right out of 5: all; the teacher's swap of the two largest (9 and 8): 3; one short: 4; none
    assert [task.score(row, r) for r in ("12589", "12598", "1258", "", "98521")] == [1.0, 0.6, 0.8, 0.0, 0.2]


def test_noisy_sort_rows_splits_and_teacher():
    task = load_task("noisy_sort:length=5,drop=0.6")
    train, heldout = task.prompts("train", 400, seed=0), task.prompts("heldout", 100, seed=0)
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    for r in train[:50]:
        assert r["prompt"] == r["id"] + ">" and r["answer"] == "".join(sorted(r["id"]))
    wrong = [r for r in train if r["demonstration"] != r["answer"]]
    can_err = [r for r in train if r["answer"][-1] != r["answer"][-2]]
    for r in wrong:  # the teacher's only mistake: the two largest digits swapped
        assert r["demonstration"] == r["answer"][:-2] + r["answer"][-1] + r["answer"][-2]
        assert task.score(r, r["demonstration"]) == 0.6
    assert 0.5 < len(wrong) / len(can_err) < 0.7  # drop = 0.6 of the problems where the swap is a mistake
    assert task.prompts("train", 400, seed=0) == train  # seeded
    assert load_task("noisy_sort:drop=0").prompts("train", 50, seed=0)[0]["demonstration"] == train[0]["answer"]
