"""The dTRPO trainer: `transformers.Trainer` with a preference loss on diffusion log-ratio estimates.

Accelerate, DeepSpeed, FSDP, gradient accumulation, checkpoints, resume, logging and progress bars
all come from `transformers.Trainer`; this file only adds the config fields, the reference model and
`compute_loss`. The estimator and the loss are chosen through small tables (`estimators.ESTIMATORS`,
`losses.LOSSES`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments

from dtrpo.base import (
    DiffusionArguments,
    DiffusionTrainer,
    deprecated_field,
    frozen,
    is_peft,
    pad_id,
    resolve_model,
    source_names,
    tokenized,
)
from dtrpo.distributed import partitioned, prepare_reference, reference_copy
from dtrpo.estimators import Batch, EstimatorConfig, draw, score
from dtrpo.losses import LOSSES, preference_loss
from dtrpo.masking import example_seed
from dtrpo.models import ModelAdapter

logger = logging.getLogger(__name__)


@dataclass
class DTRPOConfig(DiffusionArguments, EstimatorConfig, TrainingArguments):
    """Training arguments of `transformers.TrainingArguments`, the estimator options (`EstimatorConfig`, declared
    there once) and the preference-loss fields (method.md). Defaults are TRL's `DPOConfig` where the field means
    the same (learning rate 1e-6, logging every 10 steps)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate (TRL's DPO default)."})
    beta: float = field(default=0.1, metadata={"help": "KL strength beta of the preference loss."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": f"Preference loss, or several summed with --loss_weights (TRL's list form): {sorted(LOSSES)}."
        },
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label noise rate for 'sigmoid' (conservative DPO) and 'robust' losses."}
    )
    rpo_alpha: float = field(
        default=4.0,
        metadata={
            "help": "Weight of a likelihood term on the chosen response (TRL's rpo_alpha): its per-token negative "
            "log-likelihood estimate, read from the policy pass the estimator already makes. 0: off (the paper's "
            "loss). Default 4 (TRL: off): with the default all_masked_weighted targets, the weight the studies "
            "rank first, above 1 and 0, at a tuned learning rate (docs/benchmarks.md, Rounds)."
        },
    )
    loss_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of the losses when --loss_type lists several (TRL's form); default: all 1."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Score the reference before training, one draw per planned epoch (the masks a live reference "
            "would see); each step then runs the policy only (2 passes per pair, not 4)."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the reference precompute; default: per_device_eval_batch_size."}
    )
    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "Packed mode: one row per pair, the prompt once with chosen and rejected behind it and each "
            "response's last clean block dropped (no query attends it); the same estimates, fewer tokens."
        },
    )
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "With --share_prompt: pack whole pairs into rows no wider than the batch's longest pair, each "
            "attending only itself (TRL's name; on by default here, as it needs no special attention kernel); the "
            "same estimates, fewer rows and less padding."
        },
    )
    ref_log_probs_file: str | None = field(
        default=None,
        metadata={
            "help": "File of precomputed reference scores, reused when its fingerprint matches; default: beside "
            "the training data file (<data>.ref_logps.json); none for in-memory data."
        },
    )
    precompute_ref: bool | None = field(
        default=None, metadata={"help": "Deprecated: use --precompute_ref_log_probs (removed in the next release)."}
    )

    def __post_init__(self) -> None:
        self._validate_diffusion()
        deprecated_field(self, "precompute_ref", "precompute_ref_log_probs")
        if self.beta <= 0:
            raise ValueError(f"--beta must be positive, got {self.beta}")
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        for name in self.loss_type:
            if name not in LOSSES:
                raise ValueError(f"--loss_type must be among {sorted(LOSSES)}, got {name!r}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"--loss_weights has {len(self.loss_weights)} weights for {len(self.loss_type)} losses {self.loss_type}"
            )
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.rpo_alpha < 0:
            raise ValueError(f"--rpo_alpha must be >= 0, got {self.rpo_alpha}")
        super().__post_init__()


@dataclass
class WithReference:
    """A collator that also passes the precomputed reference scores through, as (B, epochs) float tensors."""

    collator: object

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        out = self.collator(features)
        for key in ("ref_chosen", "ref_rejected"):
            out[key] = torch.tensor([f[key] for f in features], dtype=torch.float64)
        return out


def chosen_nll(chosen_logps: torch.Tensor, chosen_valid: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of each chosen response, (n,), from the policy's own estimate of
    its log-likelihood (the pass the estimator makes anyway): for `dtrpo` the trajectory log-probability,
    whose expectation over random reveal orders is the block-diffusion ELBO that SFT maximises; for `vrpo`
    the masked-diffusion ELBO; for `meanfield` the fully-masked log-probability.

    chosen_logps = [-8, -2], valid tokens [4, 2]: [8 / 4, 2 / 2] = [2, 1].
    """
    return -chosen_logps / chosen_valid.sum(-1).clamp(min=1)


class DTRPOTrainer(DiffusionTrainer):
    """Offline preference optimization of a diffusion LM (dTRPO and the baseline estimators), built as
    TRL's `DPOTrainer` is: `DTRPOTrainer(model, ref_model=None, args=None, data_collator=None,
    train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None, callbacks=None)`.

    `model` is a model or a checkpoint folder (any family `load_model` reads); the adapter (mask token,
    block grid, shift) is read from the model unless given. The reference is `ref_model`, else a frozen
    copy of the starting model in eval mode, or, for a PEFT model (or `peft_config`), the same model with
    its adapters disabled. Chosen and rejected go through the policy in one batch, and through the
    reference in one batch, with the same re-masking draws.
    """

    def __init__(
        self,
        model,
        ref_model=None,
        args: DTRPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks=None,
        adapter: ModelAdapter | None = None,
        **kwargs,
    ):
        from dtrpo.data import PreferenceCollator, build_preference_dataset

        if args is None:
            name = Path(model).name if isinstance(model, (str, Path)) else "model"
            args = DTRPOConfig(output_dir=f"{name}-dTRPO")
        self.base_model_name, self.dataset_name = source_names(model, train_dataset)
        model, processing_class, adapter = resolve_model(model, processing_class, adapter, args, peft_config)
        args.validate_estimator(adapter.block_size)
        self.estimator_config = args.estimator_options()
        collator = data_collator or PreferenceCollator(
            pad_id(processing_class), adapter.block_size, adapter.absolute_grid
        )
        super().__init__(
            model,
            args,
            adapter,
            processing_class,
            train_dataset=tokenized(
                build_preference_dataset, train_dataset, processing_class, args, adapter, stream=args.streaming
            ),
            eval_dataset=tokenized(build_preference_dataset, eval_dataset, processing_class, args, adapter),
            data_collator=collator,
            callbacks=callbacks,
            **kwargs,
        )
        self.ref_model = None if ref_model is None else prepare_reference(frozen(ref_model), self.accelerator)
        if args.precompute_ref_log_probs and self.train_dataset is not None:
            self.train_dataset = self.precompute_reference(self.train_dataset)
            if isinstance(self.eval_dataset, dict):  # the collator now expects the scores in every batch
                self.eval_dataset = {
                    k: self.precompute_reference(d, for_eval=True) for k, d in self.eval_dataset.items()
                }
            elif self.eval_dataset is not None:
                self.eval_dataset = self.precompute_reference(self.eval_dataset, for_eval=True)
            self.data_collator = WithReference(self.data_collator)
        elif self.ref_model is None and not is_peft(self.model):
            self.ref_model = self._reference_copy()

    def _reference_copy(self):
        """A frozen copy of the starting model: the reference when none is given (PEFT models use their
        base with adapters disabled instead). Taken from the unwrapped policy before `train` prepares it
        (gathered first if ZeRO-3 partitioned it at load), then sharded as the policy will be
        (`distributed.prepare_reference`)."""
        return prepare_reference(reference_copy(self.accelerator.unwrap_model(self.model)), self.accelerator)

    def _batch(self, inputs) -> Batch:
        """Chosen and rejected stacked into one batch of 2n sequences (the prompt repeated; `share_prompt`
        lets the packed mode lay each pair out as one row with the prompt once)."""
        return Batch(
            prompt_ids=inputs["prompt_ids"].repeat(2, 1),
            prompt_valid=inputs["prompt_valid"].repeat(2, 1),
            response_ids=torch.cat([inputs["chosen_ids"], inputs["rejected_ids"]]),
            response_valid=torch.cat([inputs["chosen_valid"], inputs["rejected_valid"]]),
            pairs=self.args.share_prompt,
            pack=self.args.share_prompt and self.args.padding_free,
        )

    def _draw(self, model, inputs, batch: Batch, epoch: int | None = None):
        """The re-masking draws of a batch, from per-example seeds: fresh every epoch (a precomputed
        reference holds one draw per planned epoch)."""
        epoch = int(self.state.epoch or 0) if epoch is None else epoch
        index = inputs["index"].tolist()
        seeds = [example_seed(self.args.seed, i, epoch, side) for side in ("chosen", "rejected") for i in index]
        if self.estimator_config.reveal_order != "confidence":  # the only draw that reads a model
            return draw(self.adapter, batch, seeds, self.estimator_config)
        with self.reference(model) as ref:
            return draw(self.adapter, batch, seeds, self.estimator_config, ref_model=ref)

    @torch.no_grad()
    def precompute_reference(self, dataset, for_eval: bool = False):
        """`dataset` with `ref_chosen` / `ref_rejected`: per pair, the reference's score of each planned
        epoch's draw. Read from the scores file when its fingerprint matches (no reference model is then
        built); else each process scores its shard of the pairs, the shards are gathered, and the main
        process writes the file. An eval set (`for_eval`) has no scores file, and one draw more: evaluation
        also runs at the end of the last epoch, where the epoch counter has reached the number of epochs."""
        from accelerate.utils import broadcast_object_list, gather_object

        from dtrpo.reference import fingerprint, load_scores, planned_epochs, rank_shard, save_scores

        a = self.args
        updates = -(-len(self.get_train_dataloader()) // a.gradient_accumulation_steps)
        epochs = planned_epochs(a.max_steps, a.num_train_epochs, updates) + int(for_eval)
        path = a.ref_log_probs_file or (f"{self.dataset_name}.ref_logps.json" if self.dataset_name else None)
        path = None if for_eval else path
        data = self.dataset_name
        if path and data and Path(data).is_file() and Path(path).is_file() and Path(path).samefile(data):
            raise ValueError(
                f"--ref_log_probs_file {path} is the training data --dataset_name {data}: it names the file the "
                f"reference scores are kept in; name another one (default: {data}.ref_logps.json)"
            )
        if path:
            reference = self.ref_model or self.accelerator.unwrap_model(self.model)  # the base, for PEFT or a copy
            want = fingerprint(reference, dataset, self.estimator_config, self.adapter, a.seed)
            if a.world_size > 1:  # the whole weights on every rank (gathered when sharded): rank 0's decides for all
                want = broadcast_object_list([want])[0]
        scores = load_scores(Path(path), want, epochs, list(dataset["index"])) if path else None
        if scores is not None:
            confidence = self.estimator_config.reveal_order == "confidence" and not is_peft(self.model)
            if confidence:
                self.ref_model = self.ref_model or self._reference_copy()  # its confidences order every draw
            logger.warning(
                "reference scores of %d epochs reused from %s: its fingerprint (reference weights, data, estimator, "
                "seed) matches this run; %s",
                epochs,
                path,
                "the reference still orders the draws (confidence)" if confidence else "no reference model is built",
            )
        else:
            if self.ref_model is None and not is_peft(self.model):
                self.ref_model = self._reference_copy()
            shard, n_real = rank_shard(dataset, a.world_size, a.process_index)
            size = a.precompute_ref_batch_size or a.per_device_eval_batch_size
            loader = torch.utils.data.DataLoader(shard, batch_size=size, collate_fn=self.data_collator)
            with self._whole_base():
                mine = self._score_shard(loader, epochs, n_real)
            scores = {k: v for part in gather_object([mine]) for k, v in part.items()}
            if path and a.should_save:
                save_scores(Path(path), want, epochs, scores)
        chosen = [[c for c, _ in scores[i]] for i in dataset["index"]]
        rejected = [[r for _, r in scores[i]] for i in dataset["index"]]
        return dataset.add_column("ref_chosen", chosen).add_column("ref_rejected", rejected)

    def _score_shard(self, loader, epochs: int, n_real: int) -> dict[int, list[tuple[float, float]]]:
        """{row index: [(chosen, rejected) per epoch]}: the reference's scores of this rank's shard, its first
        n_real rows (the rows that even out the ranks come last and are not kept)."""
        mine, seen = {}, 0
        for inputs in loader:
            inputs = self._prepare_inputs(inputs)
            batch, n = self._batch(inputs), inputs["index"].shape[0]
            per_epoch = []
            for epoch in range(epochs):
                states = self._draw(self.model, inputs, batch, epoch)
                with self.reference(self.model) as ref:
                    values, _ = score(self.adapter, ref, batch, states)
                per_epoch.append(values.tolist())
            for i, idx in enumerate(inputs["index"].tolist()):
                if seen < n_real:
                    mine[idx] = [(v[i], v[n + i]) for v in per_epoch]
                seen += 1
        return mine

    def _whole_base(self):
        """Under ZeRO-3 a LoRA policy's base is partitioned at load (`zero.Init`) and only the DeepSpeed engine,
        built when training starts, gathers it for a forward: for the precompute, which runs before, its
        parameters are gathered whole on every rank (one model's weights, as `reference_copy` gathers them).
        A reference copy is its own engine and needs nothing."""
        model = self.accelerator.unwrap_model(self.model)
        if self.ref_model is not None or not partitioned(model):
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))

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
        if model.training:
            self.count_tokens(inputs["prompt_valid"], inputs["chosen_valid"], inputs["rejected_valid"])
        self.store_metrics(metrics, split)
        loss = losses.mean()
        return (loss, {"losses": losses}) if return_outputs else loss

    def preference_losses(self, chosen: torch.Tensor, rejected: torch.Tensor):
        """The configured loss (or the weighted sum of several, TRL's `loss_type` list) and its metrics."""
        a = self.args
        weights = a.loss_weights or [1.0] * len(a.loss_type)
        total, metrics = 0.0, {}
        for name, weight in zip(a.loss_type, weights, strict=True):
            losses, metrics = preference_loss(chosen, rejected, a.beta, name, a.label_smoothing)
            total = total + weight * losses
        return total, metrics

    def pair_losses(self, model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses and metrics for one collated batch."""
        n = inputs["prompt_ids"].shape[0]
        batch = self._batch(inputs)
        states = self._draw(model, inputs, batch)
        policy, cost = score(self.adapter, model, batch, states)
        if "ref_chosen" in inputs:  # precomputed with the same draw, one column per epoch
            epoch = int(self.state.epoch or 0)
            if epoch >= inputs["ref_chosen"].shape[1]:
                raise ValueError(
                    f"the reference was precomputed for {inputs['ref_chosen'].shape[1]} epochs and this step is in "
                    f"epoch {epoch + 1}: precompute again for the longer run"
                )
            reference = torch.cat([inputs["ref_chosen"][:, epoch], inputs["ref_rejected"][:, epoch]]).to(policy)
        else:
            with torch.no_grad(), self.reference(model) as ref:
                reference, _ = score(self.adapter, ref, batch, states)
        logratios = policy - reference  # (2n,)
        losses, metrics = self.preference_losses(logratios[:n], logratios[n:])
        if self.args.rpo_alpha:
            nll = chosen_nll(policy[:n], inputs["chosen_valid"])
            losses = losses + self.args.rpo_alpha * nll
            metrics["rpo/nll"] = nll.detach()
        targets = sum((s.weights != 0).sum(-1).float() for s in states)
        metrics.update(
            {
                "logps/chosen": policy[:n].detach(),
                "logps/rejected": policy[n:].detach(),
                "estimator/targets_per_seq": targets,
                "estimator/forward_passes_per_pair": torch.tensor(
                    (2.0 if "ref_chosen" in inputs else 4.0) * cost.passes
                ),
                "padding_fraction": torch.tensor(cost.padding_fraction),
            }
        )
        return losses, metrics

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
