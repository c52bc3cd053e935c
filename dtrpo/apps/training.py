"""What the demo and the studies share to train a stage or an arm: its training arguments and the callback that
stops SFT once the model is right often enough for its own samples to hold both right and wrong answers."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback


class StopAtAccuracy(TrainerCallback):
    """Stops SFT once greedy accuracy on validation prompts reaches `target`: the demo wants a model
    that is right sometimes, so that its own samples contain both right and wrong answers."""

    def __init__(self, check, every: int, target: float):
        self.check, self.every, self.target, self.curve = check, every, target, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            accuracy = self.check(model)
            model.train()
            self.curve.append({"step": state.global_step, "validation_accuracy": accuracy})
            control.should_training_stop = accuracy >= self.target


def train_args(cls, out: Path, steps: int, lr: float, seed: int, batch: int, schedule: str, **settings):
    """The training arguments (`cls`: DTRPOConfig or DiffusionSFTConfig) of one study arm: no checkpoints (the
    caller saves the model it keeps), data order seeded, prompts and completions of at most 64 tokens, on the CPU,
    no progress bar, a log line every 10 steps, a warm-up of a tenth of the steps (at most 20). `settings`
    override these (`demo_settings()`) or set the method's own fields (beta, rpo_alpha, ...)."""
    return cls(
        **{
            "output_dir": str(out),
            "max_steps": steps,
            "learning_rate": lr,
            "per_device_train_batch_size": batch,
            "lr_scheduler_type": schedule,
            "warmup_steps": min(20, steps // 10),
            "save_strategy": "no",
            "seed": seed,
            "data_seed": seed,
            "use_cpu": True,
            "max_prompt_length": 64,
            "max_completion_length": 64,
            "disable_tqdm": True,
            "logging_steps": 10,
            "report_to": [],
            **settings,
        }
    )


def demo_settings() -> dict:
    """How the demo (and the sampler benchmark's SFT) train where the studies differ: 20 warm-up steps, on a GPU
    when there is one, with a progress bar, and a rerun replaces the earlier run of each stage."""
    return {
        "warmup_steps": 20,
        "use_cpu": not torch.cuda.is_available(),
        "disable_tqdm": False,
        "overwrite_output_dir": True,
    }
