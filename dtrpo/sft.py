"""Supervised training of diffusion LMs (method.md section 7), on the same trainer base as dTRPO.

- `masked` (LLaDA style): one level t per sequence, response tokens masked with probability t,
  cross-entropy on the masked tokens weighted 1/t, one pass over `[x | y_t]` with the model's own
  attention. The prompt is never masked.
- `block` (BD3-LM / SDAR / Fast-dLLM v2 style): one level t per block, the packed layout
  `[x | y | y_t]` of section 4, cross-entropy on the masked tokens of the noisy copy weighted 1/t.

Both are normalised by the number of response tokens, so the loss is a per-token ELBO bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import TrainingArguments

from dtrpo.base import DiffusionArguments, DiffusionTrainer, pad_id, resolve_model, source_names, tokenized
from dtrpo.estimators import Batch, position_logprobs
from dtrpo.masking import example_seed, response_blocks

OBJECTIVES = ("masked", "block")
MIN_LEVEL = 1e-3  # t is drawn in [MIN_LEVEL, 1] so that 1/t stays bounded


@dataclass
class DiffusionSFTConfig(DiffusionArguments, TrainingArguments):
    """Training arguments of `transformers.TrainingArguments` plus the diffusion SFT fields."""

    objective: Literal["masked", "block"] | None = field(
        default=None,
        metadata={"help": f"SFT objective {OBJECTIVES}; default: 'block' for block-causal models, else 'masked'."},
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "Initial AdamW learning rate (TRL's SFT default)."})

    def __post_init__(self) -> None:
        self._validate_diffusion()
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {OBJECTIVES}, got {self.objective!r}")
        super().__post_init__()


def draw_sft_noise(response_ids, response_valid, seeds, mask_token_id, block_size, per_block: bool, tail=None):
    """Masked response and 1/t weights: one level per sequence, or one per block of the grid (whose first
    block holds `tail` prompt tokens on the absolute grid). (B, R) each. An example's draw depends on its
    seed and its own length only."""
    B, R = response_ids.shape
    tail = torch.zeros(B, dtype=torch.long) if tail is None else tail.long().cpu()
    block, _ = response_blocks(tail, R, block_size)  # (B, R)
    levels, coins = torch.ones(B, R), torch.ones(B, R)
    lengths = response_valid.sum(-1).tolist()
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        n = lengths[i]
        n_levels = int(block[i, n - 1]) + 1 if per_block and n else 1
        t = MIN_LEVEL + (1 - MIN_LEVEL) * torch.rand(n_levels, generator=g)
        levels[i, :n] = t[block[i, :n]] if per_block else t
        coins[i, :n] = torch.rand(n, generator=g)
    levels, coins = levels.to(response_ids.device), coins.to(response_ids.device)
    masked = (coins < levels) & response_valid
    noisy = torch.where(masked, mask_token_id, response_ids)
    return noisy, masked.float() / levels


def sft_loss(adapter, model, batch: Batch, seeds: list[int], objective: str) -> torch.Tensor:
    """Per-token diffusion cross-entropy of one batch (a scalar)."""
    per_block = objective == "block"
    noisy, weights = draw_sft_noise(
        batch.response_ids,
        batch.response_valid,
        seeds,
        adapter.mask_token_id,
        adapter.block_size,
        per_block,
        adapter.tail(batch.prompt_valid),
    )
    logp, _ = position_logprobs(adapter, model, batch, noisy, weights != 0, "packed" if per_block else "remasked")
    return -(logp * weights).sum() / batch.response_valid.sum().clamp(min=1)


class DiffusionSFTTrainer(DiffusionTrainer):
    """Masked- or block-diffusion SFT on prompt/completion data."""

    method = "sft"

    def __init__(
        self,
        model,
        args: DiffusionSFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks=None,
        adapter=None,
        **kwargs,
    ):
        from dtrpo.data import SFTCollator, build_sft_dataset

        if args is None:
            name = Path(model).name if isinstance(model, (str, Path)) else "model"
            args = DiffusionSFTConfig(output_dir=f"{name}-SFT")
        self.base_model_name, self.dataset_name = source_names(model, train_dataset)
        model, processing_class, adapter = resolve_model(model, processing_class, adapter, args, peft_config)
        self.objective = args.objective or ("block" if adapter.block_causal else "masked")

        collator = data_collator or SFTCollator(pad_id(processing_class), adapter.block_size, adapter.absolute_grid)
        super().__init__(
            model,
            args,
            adapter,
            processing_class,
            train_dataset=tokenized(
                build_sft_dataset, train_dataset, processing_class, args, adapter, stream=args.streaming
            ),
            eval_dataset=tokenized(build_sft_dataset, eval_dataset, processing_class, args, adapter),
            data_collator=collator,
            callbacks=callbacks,
            **kwargs,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = Batch(inputs["prompt_ids"], inputs["prompt_valid"], inputs["response_ids"], inputs["response_valid"])
        if model.training:
            self.count_tokens(inputs["prompt_valid"], inputs["response_valid"])
        epoch = int(self.state.epoch or 0)
        seeds = [example_seed(self.args.seed, i, epoch, "sft") for i in inputs["index"].tolist()]
        loss = sft_loss(self.adapter, model, batch, seeds, self.objective)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
