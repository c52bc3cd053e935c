"""The dTRPO trainer on CPU: parameters move, the reference does not, separable pairs are learned,
and a resumed run continues exactly like the uninterrupted one."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from dtrpo.base import CONFIG_FILE
from dtrpo.families import load_model
from dtrpo.models import init_tiny, make_tiny_model
from dtrpo.trainer import DTRPOConfig, DTRPOTrainer

PAIRS = [{"prompt": f"{i}+{i}=", "chosen": "a" * (3 + i % 4), "rejected": "zz" * (1 + i % 3)} for i in range(8)]


def make_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=3,
        use_cpu=True,
        seed=0,
        data_seed=0,
        save_strategy="no",
        disable_tqdm=True,
        steps_per_block=2,
        logging_steps=1,
    )
    return DTRPOConfig(**{**base, **kw})


class StopAt(TrainerCallback):
    """Interrupts training after `step` (as a crash would, after the checkpoint of that step)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(model, tokenizer, args, data=PAIRS, resume=None, callbacks=None, eval_data=None):
    from dtrpo.models import adapter_from_config

    trainer = DTRPOTrainer(
        model=model,
        args=args,
        adapter=adapter_from_config(model.config, tokenizer),
        processing_class=tokenizer,
        train_dataset=data,
        eval_dataset=eval_data,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_steps_change_every_parameter_and_not_the_reference(tmp_path, tokenizer):
    model = make_tiny_model(tokenizer, block_size=4)
    before = copy.deepcopy(model.state_dict())
    trainer = train(model, tokenizer, make_args(tmp_path))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
    for name, p in trainer.ref_model.named_parameters():
        assert torch.equal(p, before[name]), f"reference {name} changed"
        assert not p.requires_grad
    assert not trainer.ref_model.training
    logged = trainer.state.log_history[0]
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "estimator/targets_per_seq",
        "estimator/forward_passes_per_pair",
    ):
        assert key in logged
    assert logged["estimator/forward_passes_per_pair"] == 4  # dtrpo packed: the DPO count


def test_separable_pairs_reach_high_reward_accuracy(tmp_path, tokenizer):
    model = make_tiny_model(tokenizer, block_size=4)
    args = make_args(tmp_path, max_steps=30, learning_rate=3e-3, beta=0.5, logging_steps=5)
    trainer = train(model, tokenizer, args)
    last = [h for h in trainer.state.log_history if "rewards/accuracies" in h][-1]
    assert last["rewards/accuracies"] > 0.9


def test_resume_gives_the_same_next_losses(tmp_path, tokenizer):
    init = make_tiny_model(tokenizer, block_size=4)
    full = train(
        copy.deepcopy(init), tokenizer, make_args(tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2)
    )
    part = make_args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    train(copy.deepcopy(init), tokenizer, part, callbacks=[StopAt(2)])
    resumed = train(copy.deepcopy(init), tokenizer, part, resume=str(tmp_path / "b" / "out" / "checkpoint-2"))

    def losses(t):
        return {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}

    want, got = losses(full), losses(resumed)
    assert {3, 4} <= set(got)
    for step in (3, 4):
        assert abs(got[step] - want[step]) < 1e-5


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("estimator", "magic", "estimator"),
        ("loss_type", "l2", "--loss_type"),
        ("reveal_order", "sideways", "--reveal_order"),
        ("beta", 0.0, "--beta"),
        ("block_size", 0, "--block_size"),
        ("targets", "x", "--targets"),
        ("truncation", "drop", "--truncation"),
        ("steps_per_block", 3, "must divide"),
    ],
)
def test_bad_options_name_the_flag(tmp_path, field, value, match):
    kw = {"block_size": 8} if field == "steps_per_block" else {}
    with pytest.raises(ValueError, match=match):
        cfg = DTRPOConfig(output_dir=str(tmp_path), **{field: value, **kw})
        cfg.estimator_config(cfg.block_size or 8)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dtrpo.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_init_train_with_preset_and_reload(tmp_path):
    init_tiny(tmp_path / "tiny", block_size=4)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    (tmp_path / "preset.yaml").write_text("beta: 0.2\nmax_steps: 2\nper_device_train_batch_size: 4\nuse_cpu: true\n")
    out = run_cli(
        "train",
        "--model_name_or_path",
        str(tmp_path / "tiny"),
        "--dataset_name",
        str(data),
        "--output",
        str(tmp_path / "al"),
        "--config",
        str(tmp_path / "preset.yaml"),
        "--steps_per_block",
        "2",
        "--beta",
        "0.3",
        "--disable_tqdm",
        "true",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "al" / CONFIG_FILE).read_text())
    assert saved["args"]["beta"] == 0.3  # the flag overrides the preset
    assert saved["args"]["max_steps"] == 2  # the preset overrides the default
    model, _, adapter = load_model(tmp_path / "al")
    assert adapter.block_size == 4 and sum(p.numel() for p in model.parameters()) > 0


def test_cli_rejects_unknown_preset_key(tmp_path):
    (tmp_path / "preset.yaml").write_text("betta: 0.2\n")
    out = run_cli("train", "--config", str(tmp_path / "preset.yaml"), cwd=tmp_path)
    assert out.returncode != 0
    assert "unknown config key 'betta'" in out.stderr and "did you mean 'beta'" in out.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_data_parallel_on_gloo(tmp_path):
    """DDP through transformers/accelerate on CPU: two ranks split each global batch, and train with a live
    reference exactly as one process at the same global batch (losses to 1e-5)."""
    init_tiny(tmp_path / "tiny", block_size=4)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "dtrpo.cli",
        "train",
        "--model_name_or_path",
        str(tmp_path / "tiny"),
        "--dataset_name",
        str(data),
        "--output",
        str(tmp_path / "ddp"),
        "--use_cpu",
        "true",
        "--ddp_backend",
        "gloo",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--steps_per_block",
        "2",
        "--learning_rate",
        "1e-2",
        "--disable_tqdm",
        "true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads((tmp_path / "ddp" / "checkpoint-2" / "trainer_state.json").read_text())
    # 8 pairs, 2 per rank and step, 2 ranks: 2 steps are one epoch (one rank alone would be half of one)
    assert state["log_history"][-1]["epoch"] == 1.0
    assert all("rewards/accuracies" in h for h in state["log_history"] if "loss" in h)
    load_model(tmp_path / "ddp")
    one = DTRPOTrainer(
        str(tmp_path / "tiny"),
        args=make_args(tmp_path / "one", max_steps=2, learning_rate=1e-2, seed=42, data_seed=None),
        train_dataset=str(data),
    )
    one.train()
    want = [h["loss"] for h in one.state.log_history if "loss" in h]
    got = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(want) == 2 and got == pytest.approx(want, abs=1e-5) and want[1] != pytest.approx(want[0], abs=1e-3)


def test_precomputed_reference_gives_the_same_first_epoch(tmp_path, tokenizer):
    """Within the first epoch both runs use the epoch-0 draws, so precomputing the reference scores
    changes the cost (2 passes per pair, not 4), not the losses."""
    init = make_tiny_model(tokenizer, block_size=4)
    live = train(copy.deepcopy(init), tokenizer, make_args(tmp_path / "a", max_steps=2))
    pre = train(copy.deepcopy(init), tokenizer, make_args(tmp_path / "b", max_steps=2, precompute_ref_log_probs=True))
    a = [h for h in live.state.log_history if "loss" in h]
    b = [h for h in pre.state.log_history if "loss" in h]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["rewards/margins"] - y["rewards/margins"]) < 1e-5
        assert x["estimator/forward_passes_per_pair"] == 4 and y["estimator/forward_passes_per_pair"] == 2


def test_evaluate_reports_eval_loss_and_rewards(tmp_path, tokenizer):
    from dtrpo.models import adapter_from_config

    model = make_tiny_model(tokenizer, block_size=4)
    trainer = DTRPOTrainer(
        model=model,
        args=make_args(tmp_path, per_device_eval_batch_size=4),
        adapter=adapter_from_config(model.config, tokenizer),
        processing_class=tokenizer,
        train_dataset=PAIRS,
        eval_dataset=PAIRS[:4],
    )
    metrics = trainer.evaluate()
    # policy == reference: every log-ratio is 0, so the DPO part is log 2; the default rpo_alpha (4) adds that
    # many times the chosen responses' mean NLL estimate
    alpha = trainer.args.rpo_alpha
    assert alpha == 4.0 and metrics["eval_rpo/nll"] > 0
    assert abs(metrics["eval_loss"] - (0.693147 + alpha * metrics["eval_rpo/nll"])) < 1e-4
    assert metrics["eval_rewards/margins"] == 0 and "eval_estimator/targets_per_seq" in metrics


def test_gradient_accumulation_matches_one_large_batch(tmp_path, tokenizer):
    """SGD without clipping (so that a loss-scale error would show): 2 x 2 accumulated == one batch of 4."""
    init = make_tiny_model(tokenizer, block_size=4)
    common = dict(max_steps=1, optim="sgd", max_grad_norm=0.0, learning_rate=0.5, warmup_steps=0)
    big = train(copy.deepcopy(init), tokenizer, make_args(tmp_path / "a", per_device_train_batch_size=4, **common))
    acc = train(
        copy.deepcopy(init),
        tokenizer,
        make_args(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common),
    )
    moved = 0.0
    for (name, p), q, p0 in zip(big.model.named_parameters(), acc.model.parameters(), init.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-3  # the step did something


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, tokenizer):
    from dtrpo.models import adapter_from_config

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    model = make_tiny_model(tokenizer, block_size=4)
    trainer = DTRPOTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=1),
        processing_class=tok,
        adapter=adapter_from_config(model.config, tokenizer),
        train_dataset=PAIRS,
    )
    assert trainer.data_collator.pad_token_id == tok.eos_token_id
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
