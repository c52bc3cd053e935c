"""The dTRPO trainer: `transformers.Trainer` with a preference loss on diffusion log-ratio estimates.

Accelerate, DeepSpeed, FSDP, gradient accumulation, checkpoints, resume, logging and progress bars
all come from `transformers.Trainer`; this file only adds the config fields, the reference model and
`compute_loss`. The estimator and the loss are chosen through small tables (`estimators.ESTIMATORS`,
`losses.LOSSES`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from dtrpo.estimators import ESTIMATORS, Batch, EstimatorConfig, draw, score
from dtrpo.losses import LOSSES, preference_loss
from dtrpo.masking import REVEAL_ORDERS, TARGETS, example_seed
from dtrpo.models import MODES, ModelAdapter

logger = logging.getLogger(__name__)
CONFIG_FILE = "dtrpo_config.json"


@dataclass
class DiffusionArguments:
    """Fields shared by every dtrpo trainer (preference and supervised): data limits and block layout."""

    block_size: int | None = field(
        default=None, metadata={"help": "Block size B of the response; default: the model's own (config block_size)."}
    )
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Prompts longer than this keep their last tokens (left truncation)."}
    )
    max_response_length: int | None = field(
        default=256, metadata={"help": "Longest response in tokens, EOS included; a multiple of the block size."}
    )
    truncation: str = field(
        default="truncate",
        metadata={"help": "Over-long responses: 'truncate' (keep the first tokens, counted) or 'error' (refuse)."},
    )

    # defaults that differ from TrainingArguments
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator reads token ids."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPU; 140x slower on these CPUs)."})

    def _validate_diffusion(self) -> None:
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"--block_size must be positive, got {self.block_size}")
        for name in ("max_prompt_length", "max_response_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}")
        if self.truncation not in ("truncate", "error"):
            raise ValueError(f"--truncation must be 'truncate' or 'error', got {self.truncation!r}")


@dataclass
class DTRPOConfig(DiffusionArguments, TrainingArguments):
    """Training arguments of `transformers.TrainingArguments` plus the dTRPO fields (method.md)."""

    beta: float = field(default=0.1, metadata={"help": "KL strength beta of the preference loss."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"Preference loss: one of {sorted(LOSSES)}."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label noise rate for 'sigmoid' (conservative DPO) and 'robust' losses."}
    )
    estimator: str = field(default="dtrpo", metadata={"help": f"Log-ratio estimator: one of {sorted(ESTIMATORS)}."})
    mode: str | None = field(
        default=None, metadata={"help": f"State evaluation mode {MODES}; default: the model family's own."}
    )
    steps_per_block: int | None = field(
        default=None, metadata={"help": "Denoising steps T_B per block (uniform step size B / T_B); default: B."}
    )
    reveal_order: str = field(default="random", metadata={"help": f"Re-masking reveal order: one of {REVEAL_ORDERS}."})
    targets: str = field(
        default="all_masked_weighted",
        metadata={
            "help": f"Positions read per state: one of {TARGETS}; the default has the lower variance at the same cost "
            "(docs/benchmarks.md)."
        },
    )
    scale: str = field(
        default="unbiased", metadata={"help": "Per-block scale c of the dTRPO estimate: 'unbiased' (T_B) or 'one'."}
    )
    vrpo_samples: int = field(default=8, metadata={"help": "Monte Carlo samples n of the vrpo estimator."})
    rpo_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a likelihood term on the chosen response (TRL's rpo_alpha): its per-token negative "
            "log-likelihood estimate, read from the policy pass the estimator already makes. 0: off."
        },
    )
    precompute_ref: bool = field(
        default=False,
        metadata={
            "help": "Score the reference once per pair before training, with masks fixed per pair (the same "
            "draw every epoch); each step then runs the policy only (2 passes per pair, not 4)."
        },
    )
    trajectory_mode: str = field(
        default="exact", metadata={"help": "State evaluation mode of the trajectory estimator (ground truth)."}
    )

    def __post_init__(self) -> None:
        self._validate_diffusion()
        if self.beta <= 0:
            raise ValueError(f"--beta must be positive, got {self.beta}")
        if self.loss_type not in LOSSES:
            raise ValueError(f"--loss_type must be one of {sorted(LOSSES)}, got {self.loss_type!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.rpo_alpha < 0:
            raise ValueError(f"--rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.steps_per_block is not None and self.steps_per_block <= 0:
            raise ValueError(f"--steps_per_block must be positive, got {self.steps_per_block}")
        if self.block_size is not None:  # otherwise T_B is checked against the model's block size at trainer start
            self.estimator_config(self.block_size)
        else:  # the options that do not depend on the block size
            self.estimator_config(self.steps_per_block or 1)
        super().__post_init__()

    def estimator_config(self, block_size: int) -> EstimatorConfig:
        """The estimator options, with T_B resolved against the block size actually used."""
        steps = self.steps_per_block or block_size
        if block_size % steps:
            raise ValueError(f"--steps_per_block={steps} must divide the block size {block_size} (uniform steps)")
        if self.reveal_order not in REVEAL_ORDERS:
            raise ValueError(f"--reveal_order must be one of {REVEAL_ORDERS}, got {self.reveal_order!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"--targets must be one of {TARGETS}, got {self.targets!r}")
        return EstimatorConfig(
            estimator=self.estimator,
            mode=self.mode,
            steps_per_block=steps,
            reveal_order=self.reveal_order,
            targets=self.targets,
            scale=self.scale,
            vrpo_samples=self.vrpo_samples,
            trajectory_mode=self.trajectory_mode,
        )


def tokenized(builder, data, tokenizer, args: DiffusionArguments, block_size: int):
    """`data` (a path, rows or a Dataset) tokenized by `builder` under the configured limits, with the
    truncation and dropped-row counts logged; an already tokenized Dataset passes through."""
    if data is None or "prompt_ids" in getattr(data, "column_names", []):
        return data
    ds, stats = builder(data, tokenizer, block_size, args.max_prompt_length, args.max_response_length, args.truncation)
    logger.info("data %s: %s", data if isinstance(data, (str, Path)) else "<memory>", stats)
    if any(v for k, v in stats.items() if k.endswith("truncated")):
        logger.warning("data: truncated to the configured limits: %s", stats)
    return ds


@dataclass
class WithReference:
    """A collator that also passes the precomputed reference scores through, as float tensors."""

    collator: object

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        out = self.collator(features)
        for key in ("ref_chosen", "ref_rejected"):
            out[key] = torch.tensor([f[key] for f in features], dtype=torch.float64)
        return out


def pad_id(tokenizer) -> int:
    """The id that fills padding. It is never attended nor read, so EOS serves for tokenizers without a pad token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token")
    return pad


def chosen_nll(chosen_logps: torch.Tensor, chosen_valid: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of each chosen response, (n,), from the policy's own estimate of
    its log-likelihood (the pass the estimator makes anyway): for `dtrpo` the trajectory log-probability,
    whose expectation over random reveal orders is the block-diffusion ELBO that SFT maximises; for `vrpo`
    the masked-diffusion ELBO; for `meanfield` the fully-masked log-probability.

    chosen_logps = [-8, -2], valid tokens [4, 2]: [8 / 4, 2 / 2] = [2, 1].
    """
    return -chosen_logps / chosen_valid.sum(-1).clamp(min=1)


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class DiffusionTrainer(Trainer):
    """Shared base: the adapter, a collator that pads prompts left and responses right, metric storage
    averaged over each logging window, and the resolved config written beside every checkpoint."""

    def __init__(self, model, args, adapter: ModelAdapter, processing_class, **kwargs):
        self.adapter = adapter.with_block_size(args.block_size)
        self._stored = defaultdict(lambda: defaultdict(list))
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
        # compute_loss returns a per-batch mean, not a sum over num_items_in_batch: let the Trainer divide
        # it by the gradient-accumulation steps whatever the model's forward accepts
        self.model_accepts_loss_kwargs = False

    def store_metrics(self, metrics: dict[str, torch.Tensor], split: str = "train") -> None:
        for key, value in metrics.items():
            value = self.accelerator.gather_for_metrics(value.detach().float().reshape(-1))
            self._stored[split][key].append(value.mean().item())

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._stored[split].items():
            logs[prefix + key] = sum(values) / len(values)
        self._stored[split].clear()
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if not self.args.should_save:  # only the main process writes files
            return
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"args": json.loads(self.args.to_json_string()), "adapter": vars(self.adapter)}
        (out / CONFIG_FILE).write_text(json.dumps(resolved, indent=2))


class DTRPOTrainer(DiffusionTrainer):
    """Offline preference optimization of a diffusion LM (dTRPO and the baseline estimators).

    The reference is a frozen copy of the starting model in eval mode, or, for a PEFT model without
    `ref_model`, the same model with its adapters disabled. Chosen and rejected go through the policy
    in one batch, and through the reference in one batch, with the same re-masking draws.
    """

    def __init__(
        self,
        model,
        args: DTRPOConfig,
        adapter: ModelAdapter,
        processing_class,
        train_dataset=None,
        eval_dataset=None,
        ref_model=None,
        **kwargs,
    ):
        from dtrpo.data import PreferenceCollator, build_preference_dataset

        block_size = args.block_size or adapter.block_size
        self.estimator_config = args.estimator_config(block_size)
        if ref_model is None and not _is_peft(model):
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)

        collator = kwargs.pop("data_collator", None) or PreferenceCollator(pad_id(processing_class), block_size)
        super().__init__(
            model,
            args,
            adapter,
            processing_class,
            train_dataset=tokenized(build_preference_dataset, train_dataset, processing_class, args, block_size),
            eval_dataset=tokenized(build_preference_dataset, eval_dataset, processing_class, args, block_size),
            data_collator=collator,
            **kwargs,
        )
        self.ref_model = None
        if ref_model is not None:
            self.ref_model = ref_model.to(self.accelerator.device)
        if args.precompute_ref and self.train_dataset is not None:
            self.train_dataset = self.precompute_reference(self.train_dataset)
            self.data_collator = WithReference(self.data_collator)

    def _batch(self, inputs) -> Batch:
        """Chosen and rejected stacked into one batch of 2n sequences (the prompt repeated)."""
        return Batch(
            prompt_ids=inputs["prompt_ids"].repeat(2, 1),
            prompt_valid=inputs["prompt_mask"].repeat(2, 1),
            response_ids=torch.cat([inputs["chosen_ids"], inputs["rejected_ids"]]),
            response_valid=torch.cat([inputs["chosen_mask"], inputs["rejected_mask"]]),
        )

    def _draw(self, model, inputs, batch: Batch):
        """The re-masking draws of a batch, from per-example seeds (fixed across epochs when the
        reference is precomputed, since its scores belong to one draw)."""
        epoch = 0 if self.args.precompute_ref else int(self.state.epoch or 0)
        index = inputs["index"].tolist()
        seeds = [example_seed(self.args.seed, i, epoch, side) for side in ("chosen", "rejected") for i in index]
        with self.reference(model) as ref:
            return draw(self.adapter, batch, seeds, self.estimator_config, ref_model=ref)

    @torch.no_grad()
    def precompute_reference(self, dataset):
        """`dataset` with `ref_chosen` / `ref_rejected`: the reference's score of each pair's fixed draw."""
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator
        )
        scores = {}
        for inputs in loader:
            inputs = self._prepare_inputs(inputs)
            batch, n = self._batch(inputs), inputs["index"].shape[0]
            states = self._draw(self.model, inputs, batch)
            with self.reference(self.model) as ref:
                values, _ = score(self.adapter, ref, batch, states)
            for i, idx in enumerate(inputs["index"].tolist()):
                scores[idx] = (values[i].item(), values[n + i].item())
        chosen, rejected = zip(*(scores[i] for i in dataset["index"]), strict=True)
        return dataset.add_column("ref_chosen", list(chosen)).add_column("ref_rejected", list(rejected))

    @contextlib.contextmanager
    def reference(self, model):
        """The reference model to call: the frozen copy, or the PEFT model with adapters disabled."""
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.accelerator.unwrap_model(model).disable_adapter():
                yield model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses, metrics = self.pair_losses(model, inputs)
        split = "train" if model.training else "eval"
        self.store_metrics(metrics, split)
        loss = losses.mean()
        return (loss, {"losses": losses}) if return_outputs else loss

    def pair_losses(self, model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses and metrics for one collated batch."""
        n = inputs["prompt_ids"].shape[0]
        batch = self._batch(inputs)
        states = self._draw(model, inputs, batch)
        policy, passes = score(self.adapter, model, batch, states)
        if "ref_chosen" in inputs:  # precomputed with the same draw
            reference = torch.cat([inputs["ref_chosen"], inputs["ref_rejected"]]).to(policy)
        else:
            with torch.no_grad(), self.reference(model) as ref:
                reference, _ = score(self.adapter, ref, batch, states)
        logratios = policy - reference  # (2n,)
        losses, metrics = preference_loss(
            logratios[:n], logratios[n:], self.args.beta, self.args.loss_type, self.args.label_smoothing
        )
        if self.args.rpo_alpha:
            nll = chosen_nll(policy[:n], inputs["chosen_mask"])
            losses = losses + self.args.rpo_alpha * nll
            metrics["rpo/nll"] = nll.detach()
        targets = sum((s.weights != 0).sum(-1).float() for s in states)
        metrics.update(
            {
                "logps/chosen": policy[:n].detach(),
                "logps/rejected": policy[n:].detach(),
                "estimator/targets_per_seq": targets,
                "estimator/forward_passes_per_pair": torch.tensor((2.0 if "ref_chosen" in inputs else 4.0) * passes),
            }
        )
        return losses, metrics

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
