"""The noisy-teacher task, the rpo_alpha likelihood term, and `dtrpo bench quality` on a tiny config."""

import json

import pytest
import torch

from dtrpo.cli import main
from dtrpo.tasks import NoisyArithmetic, demonstration, load_task, worked_answer
from dtrpo.trainer import chosen_nll


def test_forgotten_carry_is_consistent_wrong_work():
    # 47+85: 7+5 = 12 (write 2, carry 1); the tens column then adds 4+8 without the carry = 12
    assert worked_answer(47, "+", 85, 2, forget_carry=True) == "12,12=122"
    assert worked_answer(47, "+", 85, 2) == "12,13=132"
    assert worked_answer(21, "+", 34, 2, forget_carry=True) == worked_answer(21, "+", 34, 2)  # no carry: same


def test_noisy_teacher_drops_the_carry_at_its_rate_and_only_there():
    task = load_task("noisy_arithmetic:digits=2,drop=0.6")
    assert isinstance(task, NoisyArithmetic) and task.name.startswith("noisy_arithmetic")
    rows = task.prompts("train", 2000, seed=0)
    carry = [r for r in rows if worked_answer(*_operands(r), 2, forget_carry=True) != r["answer"]]
    wrong = [r for r in rows if demonstration(r) != r["answer"]]
    assert set(r["id"] for r in wrong) <= set(r["id"] for r in carry)  # problems without a carry are taught right
    assert 0.55 < len(wrong) / len(carry) < 0.65
    assert all(task.score(r, r["answer"]) == 1.0 for r in rows[:20])  # the verifier checks the true result
    assert all(task.score(r, demonstration(r)) == 0.0 for r in wrong[:20])
    assert task.prompts("train", 2000, seed=0) == rows  # the same teacher answers for the same arguments
    assert all("demonstration" in r for r in task.prompts("heldout", 10))
    assert demonstration({"answer": "x"}) == "x"  # rows of other tasks: the answer is the demonstration
    with pytest.raises(ValueError, match="drop"):
        NoisyArithmetic(drop=1.5)


def _operands(row):
    a, b = row["id"].split("+")
    return int(a), "+", int(b)


def test_chosen_nll_by_hand():
    """chosen_logps = [-8, -2], valid tokens [4, 2]: [8 / 4, 2 / 2] = [2, 1]."""
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.allclose(chosen_nll(torch.tensor([-8.0, -2.0]), valid), torch.tensor([2.0, 1.0]))


def test_rpo_alpha_adds_the_chosen_nll_from_the_same_pass(tmp_path, tokenizer):
    from dtrpo.models import adapter_from_config, make_tiny_model
    from dtrpo.trainer import DTRPOConfig, DTRPOTrainer

    model = make_tiny_model(tokenizer, block_size=4, seed=0)
    adapter = adapter_from_config(model.config, tokenizer)
    rows = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(4)]
    losses = {}
    for alpha in (0.0, 0.5):
        args = DTRPOConfig(output_dir=str(tmp_path), rpo_alpha=alpha, use_cpu=True, report_to=[], max_steps=1)
        trainer = DTRPOTrainer(model=model, args=args, adapter=adapter, processing_class=tokenizer, train_dataset=rows)
        inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
        losses[alpha], metrics = trainer.pair_losses(model, inputs)
    nll = chosen_nll(metrics["logps/chosen"], inputs["chosen_valid"])
    assert torch.allclose(metrics["rpo/nll"], nll) and (nll > 0).all()
    assert torch.allclose(losses[0.5] - losses[0.0], 0.5 * nll, atol=1e-5)
    with pytest.raises(ValueError, match="--rpo_alpha"):
        DTRPOConfig(output_dir=str(tmp_path), rpo_alpha=-1.0)


TINY = [
    "--tasks", "noisy_arithmetic:digits=1", "--seeds", "2", "--steps", "2", "--expensive_steps", "1",
    "--heldout", "6", "--validation", "6", "--hidden_size", "32", "--num_layers", "1", "--sft_examples", "20",
    "--sft_steps", "150", "--pair_prompts", "12", "--samples", "8", "--batch_size", "2", "--learning_rates", "1e-3",
    "--betas", "0.1", "--control_learning_rates", "1e-3", "--draws", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny study's shared start (SFT checkpoint and pairs), built once for the module."""
    from dtrpo.apps.quality import build

    out = tmp_path_factory.mktemp("quality")
    args = _args(out, "--arms", "dtrpo")
    build(args, 0, log=lambda *_: None)
    return out


def _argv(out, *extra) -> list[str]:
    paths = ["--output_dir", str(out), "--results_dir", str(out / "results"), "--report", str(out / "benchmarks.md")]
    return [*paths, *TINY, *extra]


def _args(out, *extra):
    from dtrpo.apps.quality import QualityArgs
    from dtrpo.options import parse

    (args,) = parse([QualityArgs], _argv(out, *extra), "test", "")
    return args


def _cli(out, *extra) -> None:
    main(["bench", "quality", *_argv(out, *extra)])


def test_every_arm_trains_from_the_shared_start(built):
    from dtrpo.apps.quality import Job, arm_table, run_job

    args = _args(built, "--arms", "all")
    for name, arm in arm_table(8, 1.0).items():
        result = run_job(args, Job(0, name, 1e-3, 0.1 if arm.kind == "preference" else None, 0))
        assert result["curve"][-1]["step"] == result["steps"] and len(result["curve"][-1]["scores"]) == 6, name
        assert result["forward_passes_per_step"] > 0 and 0 <= result["validation_accuracy"] <= 1


def test_two_workers_train_one_arm_at_two_rates_at_once(built):
    """`--workers 2` runs jobs of one arm side by side: each trains in a folder of its own, so the run lock of
    the other worker's job (held here) does not stop it (it did: both shared the arm's folder)."""
    from dtrpo.apps.quality import Job, job_dir, run_job, task_data
    from dtrpo.base import LOCK_FILE
    from dtrpo.locks import hold

    args = _args(built, "--arms", "dtrpo")
    busy, free = Job(0, "dtrpo", 1e-3, 0.1, 0), Job(0, "dtrpo", 3e-4, 0.1, 0)
    folder = job_dir(task_data(args, args.task_list()[0]), busy)
    with hold(folder / LOCK_FILE, "the other worker's job"):
        result = run_job(args, free)
    assert result["curve"][-1]["step"] == result["steps"]


def test_study_resumes_and_writes_a_well_formed_report(built):
    arms = ["dtrpo", "vrpo8", "sft", "rft"]
    _cli(built, "--arms", ",".join(arms), "--diagnostics", "")
    results = built / "results" / "noisy_arithmetic"
    for name in arms:
        assert len(list((results / name).glob("*_s1.json"))) == 1, name  # seed 1 at the setting chosen on seed 0
    report = (built / "benchmarks.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and line.count("|") == 12]
    assert [line.split("|")[1].strip() for line in table] == ["arm", *arms]
    assert (built / "figures" / "noisy_arithmetic_accuracy.png").exists()
    summary = json.loads((built / "results" / "summary.json").read_text())["noisy_arithmetic:digits=1"]
    assert summary["best_control"] in ("sft", "rft") and set(summary["arms"]) == set(arms)
    diff = summary["arms"]["dtrpo"]["diff_to_best_control"]
    assert diff["low"] <= diff["mean"] <= diff["high"] and len(diff["per_seed"]) == 2
    before = {p: p.stat().st_mtime for p in results.rglob("*.json")}
    _cli(built, "--arms", ",".join(arms), "--diagnostics", "")
    assert all(p.stat().st_mtime == t for p, t in before.items())  # a rerun trains nothing


@pytest.mark.slow
def test_diagnostics_are_reported(built):
    _cli(built, "--arms", "dtrpo,sft")
    report = (built / "benchmarks.md").read_text()
    assert "trajectory (exact)" in report and "| remasked |" in report
    path = built / "results" / "noisy_arithmetic" / "diagnostics_block_causal.json"
    t1 = [r for r in json.loads(path.read_text())["rows"] if r["T_B"] == 1 and r["option"] == "dtrpo"][0]
    assert t1["abs_bias"] < 1e-5 and t1["grad_cosine"] > 0.999  # one step per block: dTRPO is the trajectory


def test_a_failed_worker_stops_the_others():
    """A worker that dies leaves the others waiting for its tuning results: the launcher stops them and says so
    (it waited forever)."""
    import subprocess
    import sys
    import time

    from dtrpo.apps.quality_study import wait_all

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    failed = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"a quality worker failed \(exit codes \[-15, 3\]\)"):
        wait_all([sleeper, failed], poll=0.1)
    assert sleeper.returncode is not None and time.perf_counter() - start < 60
