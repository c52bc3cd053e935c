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
import warnings
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
    max_completion_length: int | None = field(
        default=256, metadata={"help": "Longest completion in tokens, EOS included; a multiple of the block size."}
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Cap on prompt + completion: completions keep max_completion_length, prompts get what is left."
        },
    )
    truncation: str = field(
        default="truncate",
        metadata={"help": "Over-long completions: 'truncate' (keep the first tokens, counted) or 'error' (refuse)."},
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set every dropout probability of the model (and reference) to 0, as TRL."}
    )
    max_response_length: int | None = field(
        default=None, metadata={"help": "Deprecated: use --max_completion_length (removed in the next release)."}
    )

    # defaults that differ from TrainingArguments
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator reads token ids."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPU; 140x slower on these CPUs)."})

    def _validate_diffusion(self) -> None:
        _deprecated(self, "max_response_length", "max_completion_length")
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"--block_size must be positive, got {self.block_size}")
        for name in ("max_prompt_length", "max_completion_length", "max_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}")
        if self.max_length is not None and self.max_length <= (self.max_completion_length or 0):
            raise ValueError(
                f"--max_length={self.max_length} leaves no room for a prompt after "
                f"--max_completion_length={self.max_completion_length}"
            )
        if self.truncation not in ("truncate", "error"):
            raise ValueError(f"--truncation must be 'truncate' or 'error', got {self.truncation!r}")


def _deprecated(config, old: str, new: str) -> None:
    """An old field name still works for one release: its value moves to the new field, with a warning."""
    value = getattr(config, old)
    if value is None or value is False:
        return
    warnings.warn(f"--{old} is deprecated; use --{new} (it will be removed in the next release)", FutureWarning, 2)
    setattr(config, new, value)
    setattr(config, old, None)


def prompt_limit(args: DiffusionArguments) -> int | None:
    """The prompt budget: max_prompt_length, lowered so that prompt + completion fits max_length."""
    limits = [args.max_prompt_length]
    if args.max_length is not None:
        limits.append(args.max_length - (args.max_completion_length or 0))
    limits = [m for m in limits if m is not None]
    return min(limits) if limits else None


@dataclass
class DTRPOConfig(DiffusionArguments, TrainingArguments):
    """Training arguments of `transformers.TrainingArguments` plus the dTRPO fields (method.md)."""

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
    estimator: str = field(default="dtrpo", metadata={"help": f"Log-ratio estimator: one of {sorted(ESTIMATORS)}."})
    mode: str | None = field(
        default=None, metadata={"help": f"State evaluation mode {MODES}; default: the model family's own."}
    )
    steps_per_block: int | None = field(
        default=None, metadata={"help": "Denoising steps T_B per block (uniform step size B / T_B); default: B."}
    )
    reveal_order: str = field(default="random", metadata={"help": f"Re-masking reveal order: one of {REVEAL_ORDERS}."})
    targets: str = field(default="newly_unmasked", metadata={"help": f"Positions read per state: one of {TARGETS}."})
    scale: str = field(
        default="unbiased", metadata={"help": "Per-block scale c of the dTRPO estimate: 'unbiased' (T_B) or 'one'."}
    )
    vrpo_samples: int = field(default=8, metadata={"help": "Monte Carlo samples n of the vrpo estimator."})
    loss_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of the losses when --loss_type lists several (TRL's form); default: all 1."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Score the reference once per pair before training, with masks fixed per pair (the same "
            "draw every epoch); each step then runs the policy only (2 passes per pair, not 4)."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the reference precompute; default: per_device_eval_batch_size."}
    )
    precompute_ref: bool | None = field(
        default=None, metadata={"help": "Deprecated: use --precompute_ref_log_probs (removed in the next release)."}
    )
    trajectory_mode: str = field(
        default="exact", metadata={"help": "State evaluation mode of the trajectory estimator (ground truth)."}
    )

    def __post_init__(self) -> None:
        self._validate_diffusion()
        _deprecated(self, "precompute_ref", "precompute_ref_log_probs")
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


def tokenized(builder, data, tokenizer, args: DiffusionArguments, adapter: ModelAdapter):
    """`data` (a path, rows or a Dataset) tokenized by `builder` under the configured limits on the
    adapter's block grid, with the truncation and dropped-row counts logged; an already tokenized
    Dataset passes through."""
    if data is None or "prompt_ids" in getattr(data, "column_names", []):
        return data
    ds, stats = builder(
        data,
        tokenizer,
        adapter.block_size,
        prompt_limit(args),
        args.max_completion_length,
        args.truncation,
        adapter.absolute_grid,
    )
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


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def source_names(model, train_dataset) -> tuple[str | None, str | None]:
    """(base model, dataset) as the model card names them: the paths given, else the model's own record."""
    if isinstance(model, (str, Path)):
        base = str(model)
    else:
        config = getattr(getattr(model, "base_model", model), "config", None)
        base = getattr(config, "_name_or_path", None) or None
    return base, str(train_dataset) if isinstance(train_dataset, (str, Path)) else None


def resolve_model(model, processing_class, adapter: ModelAdapter | None, args: DiffusionArguments, peft_config=None):
    """(model, tokenizer, adapter) from what a trainer was given: a model folder is loaded with the family
    loaders (its tokenizer serves unless one is given); an adapter not given is read from the model's
    config (every model `load_model` returns carries it); `peft_config` wraps the model with PEFT (LoRA
    targets written with a family's own names are translated); dropout is switched off when asked."""
    from dtrpo.models import adapter_from_config

    if isinstance(model, (str, Path)):
        from dtrpo.families import load_model

        model, tokenizer, loaded = load_model(model, block_size=args.block_size)
        processing_class, adapter = processing_class or tokenizer, adapter or loaded
    if processing_class is None:
        raise ValueError("processing_class (the tokenizer) is needed when the model is not given as a folder path")
    if adapter is None:
        config = getattr(getattr(model, "base_model", model), "config", None) or model.config
        adapter = adapter_from_config(config, processing_class)
    adapter = adapter.with_block_size(args.block_size)
    if peft_config is not None:
        from peft import get_peft_model

        from dtrpo.lora import lora_targets

        targets = peft_config.target_modules
        if targets is not None and not isinstance(targets, str):
            peft_config.target_modules = lora_targets(model, adapter, list(targets))
        model = get_peft_model(model, peft_config)
    if args.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model, processing_class, adapter


class DiffusionTrainer(Trainer):
    """Shared base: the adapter, a collator that pads prompts left and responses right, metric storage
    averaged over each logging window, and the resolved config written beside every checkpoint."""

    method = "dtrpo"  # the model card's method
    base_model_name: str | None = None  # set by the trainers: the model folder or the config's _name_or_path
    dataset_name: str | None = None  # set by the trainers: the training data path, when it is one

    def __init__(self, model, args, adapter: ModelAdapter, processing_class, **kwargs):
        self.adapter = adapter.with_block_size(args.block_size)
        self._stored = defaultdict(lambda: defaultdict(list))
        self._num_tokens = 0  # prompt and completion tokens trained on so far, all processes (TRL's num_tokens)
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
        # compute_loss returns a per-batch mean, not a sum over num_items_in_batch: let the Trainer divide
        # it by the gradient-accumulation steps whatever the model's forward accepts
        self.model_accepts_loss_kwargs = False

    def store_metrics(self, metrics: dict[str, torch.Tensor], split: str = "train") -> None:
        for key, value in metrics.items():
            value = self.accelerator.gather_for_metrics(value.detach().float().reshape(-1))
            self._stored[split][key].append(value.mean().item())

    def count_tokens(self, *valid: torch.Tensor) -> None:
        """Add a training batch's real tokens (summed over processes) to `num_tokens`."""
        n = sum(v.sum() for v in valid).reshape(1).float()
        self._num_tokens += int(self.accelerator.gather_for_metrics(n).sum().item())

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._stored[split].items():
            logs[prefix + key] = sum(values) / len(values)
        self._stored[split].clear()
        if split == "train" and "loss" in logs:
            logs["num_tokens"] = self._num_tokens
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if not self.args.should_save:  # only the main process writes files
            return
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"args": json.loads(self.args.to_json_string()), "adapter": vars(self.adapter)}
        (out / CONFIG_FILE).write_text(json.dumps(resolved, indent=2))
        self.write_model_card(out)

    def write_model_card(self, folder: Path, model_name: str | None = None, tags=None) -> None:
        """README.md in `folder`: base model, data, method, resolved config, the last logged metrics."""
        from dtrpo.modelcard import model_card

        steps = [h for h in self.state.log_history if "loss" in h]  # the last logged step's metrics ...
        summary = [h for h in self.state.log_history if "train_loss" in h]  # ... and the run's summary
        metrics = {**(steps[-1] if steps else {}), **(summary[-1] if summary else {})}
        metrics = {k: v for k, v in metrics.items() if k not in ("epoch", "step")}
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        text = model_card(
            self.method,
            model_name or Path(self.args.hub_model_id or folder).name,
            self.base_model_name,
            self.dataset_name,
            json.loads(self.args.to_json_string()),
            vars(self.adapter),
            metrics,
            tags,
        )
        (Path(folder) / "README.md").write_text(text)

    def create_model_card(self, model_name: str | None = None, tags=None, **kwargs) -> None:
        """The dtrpo model card in the output folder (what `push_to_hub` uploads), from the main process."""
        if self.is_world_process_zero():
            self.write_model_card(Path(self.args.output_dir), model_name, tags)


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
        self.estimator_config = args.estimator_config(adapter.block_size)
        if ref_model is None and not _is_peft(model):
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)

        collator = data_collator or PreferenceCollator(
            pad_id(processing_class), adapter.block_size, adapter.absolute_grid
        )
        super().__init__(
            model,
            args,
            adapter,
            processing_class,
            train_dataset=tokenized(build_preference_dataset, train_dataset, processing_class, args, adapter),
            eval_dataset=tokenized(build_preference_dataset, eval_dataset, processing_class, args, adapter),
            data_collator=collator,
            callbacks=callbacks,
            **kwargs,
        )
        self.ref_model = None
        if ref_model is not None:
            self.ref_model = ref_model.to(self.accelerator.device)
        if args.precompute_ref_log_probs and self.train_dataset is not None:
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
        epoch = 0 if self.args.precompute_ref_log_probs else int(self.state.epoch or 0)
        index = inputs["index"].tolist()
        seeds = [example_seed(self.args.seed, i, epoch, side) for side in ("chosen", "rejected") for i in index]
        with self.reference(model) as ref:
            return draw(self.adapter, batch, seeds, self.estimator_config, ref_model=ref)

    @torch.no_grad()
    def precompute_reference(self, dataset):
        """`dataset` with `ref_chosen` / `ref_rejected`: the reference's score of each pair's fixed draw."""
        size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        loader = torch.utils.data.DataLoader(dataset, batch_size=size, collate_fn=self.data_collator)
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
        if model.training:
            self.count_tokens(inputs["prompt_mask"], inputs["chosen_mask"], inputs["rejected_mask"])
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
        policy, passes = score(self.adapter, model, batch, states)
        if "ref_chosen" in inputs:  # precomputed with the same draw
            reference = torch.cat([inputs["ref_chosen"], inputs["ref_rejected"]]).to(policy)
        else:
            with torch.no_grad(), self.reference(model) as ref:
                reference, _ = score(self.adapter, ref, batch, states)
        logratios = policy - reference  # (2n,)
        losses, metrics = self.preference_losses(logratios[:n], logratios[n:])
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
