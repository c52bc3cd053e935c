"""Precomputed reference scores: one draw per planned epoch (training sees the masks it would see with
a live reference), kept beside the data with a fingerprint, reused without a reference model, refused
with the mismatch named, and the same when two gloo processes each score a shard."""

import json
import os
import subprocess
import sys

import pytest

from dtrpo import DTRPOConfig, DTRPOTrainer
from dtrpo.models import init_tiny
from dtrpo.reference import load_scores
from tests.test_trainer import PAIRS, free_port


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return init_tiny(root / "tiny", block_size=4, hidden_size=32), data


def config(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=4,  # 8 pairs in batches of 4: two epochs
        use_cpu=True,
        seed=0,
        data_seed=0,
        save_strategy="no",
        disable_tqdm=True,
        report_to=[],
        logging_steps=1,
        steps_per_block=2,
    )
    return DTRPOConfig(**{**base, **kw})


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_every_epoch_has_its_own_draw(setup, tmp_path):
    """Live reference and precomputed reference give the same losses over two epochs: the precompute
    holds each epoch's draw (before, every epoch reused epoch 0's masks)."""
    model, data = setup
    live = DTRPOTrainer(str(model), args=config(tmp_path / "a"), train_dataset=str(data))
    live.train()
    pre = DTRPOTrainer(
        str(model),
        args=config(tmp_path / "b", precompute_ref_log_probs=True, ref_log_probs_file=str(tmp_path / "ref.json")),
        train_dataset=str(data),
    )
    assert len(pre.train_dataset[0]["ref_chosen"]) == 2  # two planned epochs
    pre.train()
    assert losses(pre) == pytest.approx(losses(live), abs=1e-5) and len(losses(pre)) == 4


def test_scores_kept_beside_the_data_and_reused_without_a_reference(setup, tmp_path):
    model, data = setup
    local = tmp_path / "pairs.jsonl"
    local.write_text(data.read_text())
    first = DTRPOTrainer(
        str(model), args=config(tmp_path / "a", precompute_ref_log_probs=True), train_dataset=str(local)
    )
    saved = tmp_path / "pairs.jsonl.ref_logps.json"
    assert saved.is_file() and json.loads(saved.read_text())["epochs"] == 2
    first.train()
    again = DTRPOTrainer(
        str(model), args=config(tmp_path / "b", precompute_ref_log_probs=True, beta=0.1), train_dataset=str(local)
    )
    assert again.ref_model is None  # the scores were read: no reference model built
    again.train()
    assert losses(again) == pytest.approx(losses(first), abs=1e-6)
    with pytest.raises(ValueError, match=r"do not match this run \(seed differ\)"):
        DTRPOTrainer(
            str(model), args=config(tmp_path / "c", precompute_ref_log_probs=True, seed=1), train_dataset=str(local)
        )
    with pytest.raises(ValueError, match=r"epochs \(2 saved, 3 planned\) differ"):
        DTRPOTrainer(
            str(model),
            args=config(tmp_path / "d", precompute_ref_log_probs=True, max_steps=6),
            train_dataset=str(local),
        )
    local.write_text(data.read_text().replace("zz", "yy"))
    with pytest.raises(ValueError, match=r"\(data differ\).*delete the file to recompute"):
        DTRPOTrainer(str(model), args=config(tmp_path / "e", precompute_ref_log_probs=True), train_dataset=str(local))


def test_two_gloo_processes_equal_one(setup, tmp_path):
    """Two processes at 2 pairs each equal one process at 4: the precomputed scores (each process scored
    its own shard) and the training losses."""
    model, data = setup
    one = DTRPOTrainer(
        str(model),
        args=config(tmp_path / "one", precompute_ref_log_probs=True, ref_log_probs_file=str(tmp_path / "one.json")),
        train_dataset=str(data),
    )
    one.train()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "dtrpo.cli", "train",
           "--model_name_or_path", str(model), "--dataset_name", str(data),
           "--output_dir", str(tmp_path / "two"), "--use_cpu", "true", "--ddp_backend", "gloo", "--max_steps", "4",
           "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--steps_per_block", "2",
           "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0",
           "--data_seed", "0", "--precompute_ref_log_probs", "true",
           "--ref_log_probs_file", str(tmp_path / "two.json")]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["fingerprint"] == b["fingerprint"] and a["scores"].keys() == b["scores"].keys()
    for k, v in a["scores"].items():
        flat = [x for epoch in v for x in epoch]
        assert flat == pytest.approx([x for epoch in b["scores"][k] for x in epoch], abs=1e-5)
    # the training losses the main process printed ({'loss': '0.6931', ...} per step)
    two = [float(ln.split("'loss': ")[1].split(",")[0].strip("'")) for ln in out.stdout.splitlines() if "'loss'" in ln]
    assert two == pytest.approx(losses(one), rel=5e-4, abs=1e-4)  # printed to 4 significant digits


@pytest.mark.parametrize("n, world", [(7, 2), (8, 2), (1, 2), (10, 3)])
def test_rank_shards_have_equal_lengths_and_cover_every_pair_once(n, world):
    """Sharded models need every rank in every forward: equal shard lengths, and the kept rows of all
    ranks are the pairs, each exactly once."""
    import datasets

    from dtrpo.reference import rank_shard

    data = datasets.Dataset.from_dict({"index": list(range(n))})
    shards = [rank_shard(data, world, r) for r in range(world)]
    assert len({len(s) for s, _ in shards}) == 1
    kept = [i for s, n_real in shards for i in s["index"][:n_real]]
    assert sorted(kept) == list(range(n))


def damage(body: dict, case: str):
    """The saved scores file, hand-edited one way."""
    body = json.loads(json.dumps(body))
    first = next(iter(body["scores"]))
    if case == "missing row":
        del body["scores"][first]
    elif case == "no fingerprint":
        del body["fingerprint"]
    elif case == "string epochs":
        body["epochs"] = "2"
    elif case == "a list":
        return json.dumps([body])
    elif case == "NaN score":
        body["scores"][first][1][0] = float("nan")
    elif case == "inf score":
        body["scores"][first][0][1] = float("inf")
    text = json.dumps(body)
    return text[: len(text) // 2] if case == "truncated" else text


DAMAGED = {
    "missing row": r"damaged reference-scores file \(no scores for rows \[\d+\]\)",
    "no fingerprint": r"damaged reference-scores file \(no 'fingerprint' object\)",
    "string epochs": r"damaged reference-scores file \('epochs' is '2', not a positive integer\)",
    "a list": r"not a dtrpo reference-scores file \(format 'list'\)",
    "NaN score": r"damaged reference-scores file \(row \d+, epoch 1: expected two finite scores .*got \[nan, ",
    "inf score": r"damaged reference-scores file \(row \d+, epoch 0: expected two finite scores .*, inf\]\)",
    "truncated": r"not a readable reference-scores file \(",
}


def test_damaged_scores_file_is_refused_and_kept_and_a_matching_one_is_reused_with_one_line(setup, tmp_path, caplog):
    """Each hand-edit is one line naming the file and what is wrong, and the file is left as it was (it may not be
    ours to overwrite); the intact file is reused with one warning-level line (shown at the default level)."""
    import logging

    model, data = setup
    local = tmp_path / "pairs.jsonl"
    local.write_text(data.read_text())
    args = config(tmp_path / "a", precompute_ref_log_probs=True)
    DTRPOTrainer(str(model), args=args, train_dataset=str(local))
    saved = tmp_path / "pairs.jsonl.ref_logps.json"
    body = json.loads(saved.read_text())
    with caplog.at_level(logging.WARNING, logger="dtrpo"):
        assert DTRPOTrainer(str(model), args=args, train_dataset=str(local)).ref_model is None
    (line,) = [r.getMessage() for r in caplog.records if "reference scores" in r.getMessage()]
    assert line.startswith(f"reference scores of 2 epochs reused from {saved}: its fingerprint") and line.endswith(
        "matches this run; no reference model is built"
    )
    for case, message in DAMAGED.items():  # through the trainer once, the rest as it calls load_scores
        saved.write_text(damage(body, case))
        before = saved.read_text()
        with pytest.raises(ValueError, match=rf"^{saved}: {message}") as e:
            if case == "truncated":
                DTRPOTrainer(str(model), args=args, train_dataset=str(local))
            else:
                load_scores(saved, body["fingerprint"], 2, [int(k) for k in body["scores"]])
        assert "\n" not in str(e.value) and saved.read_text() == before, case


def test_an_eval_set_is_scored_by_the_precomputed_reference_as_by_a_live_one(setup, tmp_path):
    """With an eval set, the precompute scores its pairs too (each planned epoch's draw, not written to the
    training set's scores file), so evaluation runs (it failed with KeyError 'ref_chosen') and gives the eval
    losses a live reference gives."""
    model, data = setup
    evaluation = dict(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    live = DTRPOTrainer(str(model), args=config(tmp_path / "a", **evaluation), train_dataset=str(data),
                        eval_dataset=str(data))  # fmt: skip
    live.train()
    ref_file = tmp_path / "ref.json"
    pre = DTRPOTrainer(
        str(model),
        args=config(tmp_path / "b", precompute_ref_log_probs=True, ref_log_probs_file=str(ref_file), **evaluation),
        train_dataset=str(data),
        eval_dataset=str(data),
    )
    pre.train()
    evals = [[h["eval_loss"] for h in t.state.log_history if "eval_loss" in h] for t in (live, pre)]
    assert len(evals[0]) == 2 and evals[0] == pytest.approx(evals[1], abs=1e-6)
    assert losses(live) == pytest.approx(losses(pre), abs=1e-6)
    assert len(json.loads(ref_file.read_text())["scores"]) == 8  # the training pairs only
