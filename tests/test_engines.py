"""Every shipped accelerate config (`configs/ddp.yaml`, `fsdp2.yaml`, `zero2.yaml`, `zero3.yaml`) on two gloo
CPU processes of the real `dtrpo train`, launched with `accelerate launch` as a user launches it (only the
process count, the precision and the CPU overridden), against one process at the same global batch (4 pairs
per step: 2 per rank):

- full fine-tuning, live reference: the losses of one process (to 1e-4), a final model that loads in one
  process with the weights of one process's, checkpoints that resume to the same losses and weights;
- precomputed reference: a scores file equal to one process's (the same fingerprint, so either file serves
  either run; the scores to 1e-4) and the losses of one process;
- LoRA: the losses of one process, the merged model saved, resumed from a checkpoint to the same run, and
  with a precomputed reference the scores file of one process (that of full fine-tuning: the same reference).

On CPU accelerate selects neither FSDP nor DeepSpeed by itself: dtrpo switches an FSDP launch on CPU to FSDP
(`DiffusionTrainer.create_accelerator_and_postprocess`) and gives a DeepSpeed launch without a GPU the gloo
backend (`base.cpu_deepspeed_backend`); DeepSpeed runs its CPU accelerator (`DS_ACCELERATOR=cpu`, no ops
built). `DTRPO_ENGINES_REPORT=file.jsonl` appends each launch's wall time and largest differences there.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtrpo.models import init_tiny
from tests.test_trainer import PAIRS, free_port

ROOT = Path(__file__).parents[1]
ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
CPU_FLAG = {"ddp": ["--use_cpu", "true"], "fsdp2": ["--use_cpu", "true"], "zero2": [], "zero3": []}
TRAIN = ["--max_steps", "4", "--learning_rate", "1e-2", "--logging_steps", "1", "--save_steps", "2"]
WIDTH = 192
LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]


def needs(engine: str) -> None:
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is a dev dependency: bash scripts/setup.sh installs it")


def env(path: str = str(ROOT)) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "DS_ACCELERATOR": "cpu"}


def run(
    cmd: list[str], what: str, path: str = str(ROOT), fails: bool = False
) -> tuple[subprocess.CompletedProcess, float]:
    """`cmd` with PYTHONPATH `path`; it must succeed (or, with `fails`, fail)."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(path), timeout=900, cwd=ROOT)
    seconds = time.perf_counter() - start
    assert (done.returncode != 0) == fails, (
        f"{what}: exit {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )
    return done, seconds


def one_process(setup, out: Path, *flags: str) -> subprocess.CompletedProcess:
    model, data = setup
    cmd = [sys.executable, "-m", "dtrpo.cli", "train", "--model_name_or_path", str(model), "--dataset_name", str(data)]
    cmd += ["--output_dir", str(out), "--per_device_train_batch_size", "4", "--use_cpu", "true", *TRAIN, *flags]
    return run(cmd, "one process")[0]


def launch(engine: str, setup, out: Path, *flags: str, **how) -> tuple[subprocess.CompletedProcess, float]:
    """`accelerate launch --config_file configs/<engine>.yaml` of `dtrpo train` on 2 processes, 2 pairs each
    (`how`: `run`'s `path` and `fails`)."""
    model, data = setup
    config = ROOT / "configs" / f"{engine}.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())]
    cmd += ["-m", "dtrpo.cli", "train", "--model_name_or_path", str(model), "--dataset_name", str(data)]
    cmd += ["--output_dir", str(out), "--per_device_train_batch_size", "2", *CPU_FLAG[engine], *TRAIN, *flags]
    return run(cmd, f"{engine} on 2 processes", **how)


def losses(out: Path) -> list[float]:
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The saved model's weights, loaded in one process as a user loads it."""
    from dtrpo.families import load_model

    return dict(load_model(str(folder))[0].state_dict())


def worst(a: list[float], b: list[float]) -> float:
    """The largest difference between two equally long lists of numbers."""
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def score_diff(a: dict, b: dict) -> float:
    """The largest difference between two scores files' {row: [[chosen, rejected] per epoch]}."""
    assert a.keys() == b.keys()
    return max(worst(sum(a[k], []), sum(b[k], [])) for k in a)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def report(**row) -> None:
    path = os.environ.get("DTRPO_ENGINES_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({**row, "seconds": round(row["seconds"], 1)}) + "\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    # width 192: the MLP weights (192 x 576) pass ZeRO-3's persistence threshold (1e5 elements), so ZeRO-3 keeps
    # them partitioned through training (smaller weights stay whole on every rank) and the gathers are exercised
    return init_tiny(root / "tiny", block_size=4, hidden_size=WIDTH), data


@pytest.fixture(scope="module")
def one(setup, tmp_path_factory):
    """One process's runs, made when first asked for: {kind: output folder}."""
    root, made = tmp_path_factory.mktemp("one"), {}

    def get(kind: str) -> Path:
        if kind not in made:
            flags = [*LORA] if kind.startswith("lora") else []
            if kind.endswith("precomputed"):
                flags += ["--precompute_ref_log_probs", "true", "--ref_log_probs_file", str(root / f"{kind}.json")]
            one_process(setup, root / kind, *flags)
            made[kind] = root / kind
        return made[kind]

    return get


def check_full(engine: str, setup, one, tmp_path) -> Path:
    """Full fine-tuning with a live reference: losses, the final model, the printed lines."""
    out = tmp_path / engine
    done, seconds = launch(engine, setup, out)
    want = losses(one("full"))
    assert losses(out) == pytest.approx(want, abs=1e-4) and len(want) == 4
    diff = max_diff(weights(out), weights(one("full")))
    assert diff < 1e-3, f"{engine}: the final weights differ from one process's by {diff}"
    assert done.stdout.count("saved model to") == 1  # the main process speaks for all
    assert ".partial-model" not in (out / "README.md").read_text()
    loss_diff = worst(losses(out), want)
    report(engine=engine, case="full, live reference, save", seconds=seconds, loss=loss_diff, weights=diff)
    return out


@pytest.mark.parametrize("engine", ["zero3"])
def test_zero3_trains_and_saves_as_one_process(engine, setup, one, tmp_path):
    """The quick representative: ZeRO-3 (weights partitioned at load, the reference a ZeRO-3 inference
    engine, the final model gathered at save) against one process."""
    needs(engine)
    check_full(engine, setup, one, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_equals_one_process(engine, setup, one, tmp_path):
    needs(engine)
    first = check_full(engine, setup, one, tmp_path)

    # resumed from its first checkpoint (step 2 of 4): the same losses and final weights as the run it continues
    resumed = tmp_path / f"{engine}-resumed"
    _, seconds = launch(engine, setup, resumed, "--resume_from_checkpoint", str(first / "checkpoint-2"))
    assert losses(resumed) == pytest.approx(losses(first), abs=1e-4)
    diff = max_diff(weights(resumed), weights(first))
    assert diff < 1e-5, f"{engine}: resumed weights differ by {diff}"
    loss_diff = worst(losses(resumed), losses(one("full")))
    report(engine=engine, case="full, resume from checkpoint-2", seconds=seconds, loss=loss_diff, weights=diff)

    # precomputed reference: the file of one process, score for score, under the same fingerprint
    scores = tmp_path / f"{engine}.ref_logps.json"
    flags = ["--precompute_ref_log_probs", "true", "--ref_log_probs_file", str(scores)]
    _, seconds = launch(engine, setup, tmp_path / f"{engine}-pre", *flags)
    mine = json.loads(scores.read_text())
    theirs = json.loads((one("precomputed").parent / "precomputed.json").read_text())
    assert mine["fingerprint"] == theirs["fingerprint"]
    scores_diff = score_diff(mine["scores"], theirs["scores"])
    assert scores_diff < 1e-4
    want = losses(one("precomputed"))
    assert losses(tmp_path / f"{engine}-pre") == pytest.approx(want, abs=1e-4)
    loss_diff = worst(losses(tmp_path / f"{engine}-pre"), want)
    report(engine=engine, case="full, precomputed reference", seconds=seconds, loss=loss_diff, scores=scores_diff)

    # LoRA (reference: the base with adapters disabled), seeded alike on every rank; the merged model saved
    _, seconds = launch(engine, setup, tmp_path / f"{engine}-lora", *LORA)
    want = losses(one("lora"))
    assert losses(tmp_path / f"{engine}-lora") == pytest.approx(want, abs=1e-4)
    diff = max_diff(weights(tmp_path / f"{engine}-lora"), weights(one("lora")))
    assert diff < 1e-3, f"{engine}: the merged LoRA weights differ from one process's by {diff}"
    loss_diff = worst(losses(tmp_path / f"{engine}-lora"), want)
    report(engine=engine, case="LoRA, live reference, save", seconds=seconds, loss=loss_diff, weights=diff)

    # LoRA resumed from its first checkpoint (the adapters and their optimizer state): the same run
    lora, resumed = tmp_path / f"{engine}-lora", tmp_path / f"{engine}-lora-resumed"
    _, seconds = launch(engine, setup, resumed, *LORA, "--resume_from_checkpoint", str(lora / "checkpoint-2"))
    assert losses(resumed) == pytest.approx(losses(lora), abs=1e-4)
    diff = max_diff(weights(resumed), weights(lora))
    assert diff < 1e-5, f"{engine}: resumed LoRA weights differ by {diff}"
    loss_diff = worst(losses(resumed), want)
    report(engine=engine, case="LoRA, resume from checkpoint-2", seconds=seconds, loss=loss_diff, weights=diff)

    # LoRA with a precomputed reference (its base, adapters disabled, scored before the engine exists: under
    # ZeRO-3 gathered for it): the scores file of one process's full fine-tuning run, whose reference is the
    # same starting model, and the losses of one process's LoRA run with a precomputed reference
    scores = tmp_path / f"{engine}-lora.ref_logps.json"
    flags = [*LORA, "--precompute_ref_log_probs", "true", "--ref_log_probs_file", str(scores)]
    _, seconds = launch(engine, setup, tmp_path / f"{engine}-lora-pre", *flags)
    mine = json.loads(scores.read_text())
    assert mine["fingerprint"] == theirs["fingerprint"]
    scores_diff = score_diff(mine["scores"], theirs["scores"])
    assert scores_diff < 1e-4
    want = losses(one("lora-precomputed"))
    assert losses(tmp_path / f"{engine}-lora-pre") == pytest.approx(want, abs=1e-4)
    loss_diff = worst(losses(tmp_path / f"{engine}-lora-pre"), want)
    report(engine=engine, case="LoRA, precomputed reference", seconds=seconds, loss=loss_diff, scores=scores_diff)


# a rank's start-up hook (`sitecustomize`, found first on PYTHONPATH): the main process dies (`os._exit`, no
# clean-up) once the weights of the final save are in `.partial-model` and before its other files are written
KILL_IN_FINAL_SAVE = """
import os
if os.environ.get("LOCAL_RANK") is not None:
    from dtrpo.base import DiffusionTrainer
    real = DiffusionTrainer.write_run_files
    def write_then_die(self, out):
        if out.name == ".partial-model":
            os._exit(9)
        return real(self, out)
    DiffusionTrainer.write_run_files = write_then_die
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_a_sharded_run_killed_in_its_final_save_finishes_on_resume(engine, setup, one, tmp_path):
    """Killed while the final model is written (the gathered weights in `.partial-model`, the rest not):
    `--resume_from_checkpoint last` under the same engine writes the final model from checkpoint-4, which is
    one process's model, and leaves no staging folder."""
    needs(engine)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_IN_FINAL_SAVE)
    out = tmp_path / engine
    launch(engine, setup, out, path=f"{hook}{os.pathsep}{ROOT}", fails=True)
    assert (out / ".partial-model").is_dir() and not (out / "model.safetensors").exists()
    assert (out / "checkpoint-4").is_dir()
    done, _ = launch(engine, setup, out, "--resume_from_checkpoint", "last")
    assert done.stdout.count("saved model to") == 1
    assert not (out / ".partial-model").exists() and (out / "dtrpo_config.json").is_file()
    diff = max_diff(weights(out), weights(one("full")))
    assert diff < 1e-3, f"{engine}: the final weights differ from one process's by {diff}"


MESSAGE = "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 2 != 2 * 1 * 2"


def test_an_engine_failure_is_one_line(monkeypatch, capsys):
    """An exception raised inside DeepSpeed (it refuses settings with bare AssertionErrors) leaves `dtrpo` as one
    `error:` line naming the engine; the same exception raised in dtrpo's own code keeps its traceback (a bug)."""
    from dtrpo import cli

    def raising(filename: str):
        code = compile(f"assert False, {MESSAGE!r}", filename, "exec")
        return lambda argv: exec(code, {})

    monkeypatch.delenv("DTRPO_DEBUG", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "boom", (raising("/venv/site-packages/deepspeed/runtime/config.py"), ""))
    with pytest.raises(SystemExit) as stop:
        cli.main(["boom"])
    assert str(stop.value) == f"error: DeepSpeed: AssertionError: {MESSAGE}"
    monkeypatch.setitem(cli.COMMANDS, "boom", (raising(str(ROOT / "dtrpo" / "trainer.py")), ""))
    with pytest.raises(AssertionError):
        cli.main(["boom"])


def test_lora_initialisation_follows_the_seed(tokenizer):
    """`--seed` seeds the LoRA weights (PEFT draws them in `get_peft_model`, before the Trainer seeds): two
    runs of one seed start alike, on every rank, and another seed starts elsewhere."""
    from peft import LoraConfig

    from dtrpo.base import resolve_model
    from dtrpo.models import make_tiny_model
    from dtrpo.trainer import DTRPOConfig

    def lora_weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1234 + seed)  # whatever the global generator holds before
        args = DTRPOConfig(output_dir="unused", seed=seed, use_cpu=True, report_to=[])
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        model, _, _ = resolve_model(make_tiny_model(tokenizer, block_size=4, seed=0), tokenizer, None, args, config)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, again, other = lora_weights(0), lora_weights(0), lora_weights(1)
    assert first and all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)


@pytest.mark.slow
def test_zero3_refuses_the_scores_of_another_model(setup, one, tmp_path):
    """Under ZeRO-3 the fingerprint hashes the gathered weights, not each rank's empty placeholders: a model of
    the same shape with other weights is refused one process's scores file, in one line per rank, and the
    launch stops."""
    needs("zero3")
    other = init_tiny(tmp_path / "other", block_size=4, hidden_size=WIDTH, seed=1)
    scores = one("precomputed").parent / "precomputed.json"
    flags = ["--precompute_ref_log_probs", "true", "--ref_log_probs_file", str(scores)]
    model, data = setup
    with pytest.raises(AssertionError, match="failed") as failed:
        launch("zero3", (other, data), tmp_path / "out", *flags)
    text = str(failed.value)
    assert "error: " in text and "reference_weights differ" in text
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text
