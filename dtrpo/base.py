"""The shared trainer base of dtrpo: the fields every diffusion trainer has (data limits, block layout,
TRL's names), the model/adapter/PEFT resolution, atomic checkpoints and output-folder checks, metric
logging, and the files written beside every saved model. `trainer.py` (dTRPO) and `sft.py` (diffusion
SFT) build on it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import shutil
import warnings
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints

from dtrpo.families import safetensors_problem
from dtrpo.locks import hold
from dtrpo.models import ModelAdapter
from dtrpo.reference import weights_fingerprint

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
    truncation: Literal["truncate", "error"] = field(
        default="truncate",
        metadata={"help": "Over-long completions: 'truncate' (keep the first tokens, counted) or 'error' (refuse)."},
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set every dropout probability of the model (and reference) to 0, as TRL."}
    )
    max_response_length: int | None = field(
        default=None, metadata={"help": "Deprecated: use --max_completion_length (removed in the next release)."}
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes that tokenize the data into the token cache (TRL's name); default 1."},
    )
    dataset_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the token cache (data tokenized once per machine); default: HF_DATASETS_CACHE/dtrpo."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training data: read once as an IterableDataset, tokenized as training reaches it, "
            "never cached (needs --max_steps; docs/scaling.md)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete the earlier run in output_dir (its checkpoints and files) before training; without "
            "it, an output_dir holding an earlier run is refused unless the run resumes from a checkpoint."
        },
    )

    # defaults that differ from TrainingArguments
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator reads token ids."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (TRL's default)."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPU; 140x slower on these CPUs)."})

    def _validate_diffusion(self) -> None:
        deprecated_field(self, "max_response_length", "max_completion_length")
        cpu_deepspeed_backend(self)
        refuse_non_finite(self)
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
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ValueError(f"--dataset_num_proc must be at least 1, got {self.dataset_num_proc}")
        if self.streaming:
            from dtrpo.streaming import refusal

            if problem := refusal(self):
                raise ValueError(problem)
        if self.truncation not in ("truncate", "error"):
            raise ValueError(f"--truncation must be 'truncate' or 'error', got {self.truncation!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}: the run would train nothing")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ValueError(
                f"--max_steps={self.max_steps} with --num_train_epochs={self.num_train_epochs}: "
                "the run would train nothing"
            )


def cpu_deepspeed_backend(config) -> None:
    """gloo for a DeepSpeed launch on a machine without a GPU (`accelerate launch` with a DeepSpeed config):
    accelerate finds no backend for the CPU, initialises no process group of its own and counts one process,
    so every rank would train alone on all the data (docs/scaling.md)."""
    if config.ddp_backend is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        if not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) >= 0:
            config.ddp_backend = "gloo"


def refuse_non_finite(config) -> None:
    """Every float field of a config (and every float of a list field) must be finite: a NaN or infinite
    learning rate, beta or loss weight trains a model whose every weight is NaN."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                raise ValueError(f"--{f.name} must be a finite number, got {shown}")


def deprecated_field(config, old: str, new: str) -> None:
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


def tokenized(builder, data, tokenizer, args: DiffusionArguments, adapter: ModelAdapter, stream: bool = False):
    """`data` (a path, rows or a Dataset) tokenized by `builder` under the configured limits on the
    adapter's block grid, with the truncation and dropped-row counts logged; an already tokenized
    Dataset passes through. `stream`: a stream tokenized as it is read (`dtrpo.streaming`)."""
    import datasets

    from dtrpo.data import Limits
    from dtrpo.data_cache import cached

    if data is None or "prompt_ids" in (getattr(data, "column_names", None) or []):
        return data
    limits = Limits(
        adapter.block_size, prompt_limit(args), args.max_completion_length, args.truncation, adapter.absolute_grid
    )
    if stream:
        from dtrpo.streaming import streamed

        return streamed(builder, data, tokenizer, limits, args)
    if isinstance(data, datasets.IterableDataset):
        raise ValueError("an IterableDataset is read as training data only, with --streaming true")
    first = functools.partial(args.main_process_first, local=True, desc="tokenizing")
    ds, stats, source = cached(
        builder, data, tokenizer, limits, adapter.family, args.dataset_cache_dir, args.dataset_num_proc, first
    )
    if source is not None:
        ds.dtrpo_source = source  # watched while training (DataWatch)
    logger.info("data %s: %s", data if isinstance(data, (str, Path)) else "<memory>", stats)
    if any(v for k, v in stats.items() if k.endswith("truncated")):
        logger.warning("data: truncated to the configured limits: %s", stats)
    return ds


STAGING = ".partial-"  # prefix of a checkpoint folder being written


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None: it needs a readable trainer_state.json, model
    weights whose every file is whole (safetensors sizes checked against their headers), and the
    optimizer state."""
    if not path.is_dir():
        return "no such folder"
    try:
        state = json.loads((path / TRAINER_STATE_NAME).read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE_NAME}"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE_NAME} is not valid JSON"
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
        return f"{TRAINER_STATE_NAME} has no integer global_step (it holds {json.dumps(state)[:60]})"
    weights = sorted(path.glob("*.safetensors"))
    sharded = any(p.is_dir() for p in path.glob("pytorch_model_fsdp_*"))  # FSDP's SHARDED_STATE_DICT: one per rank
    if not weights and not any(path.glob("*.bin")) and not sharded:
        return "no model weights"
    for file in weights:
        problem = safetensors_problem(file)
        if problem:
            return problem
    index = path / "model.safetensors.index.json"
    if index.is_file():
        missing = sorted({f for f in json.loads(index.read_text())["weight_map"].values() if not (path / f).is_file()})
        if missing:
            return f"weight shards missing: {missing[:3]}"
    if not any(path.glob("optimizer*")) and not any(path.glob("global_step*")):
        return "no optimizer state"
    for file in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth")):
        problem = torch_file_problem(file)
        if problem:
            return problem
    return None


def unsafe_file(checkpoint: Path) -> Path | None:
    """The first pickled file of a checkpoint (optimizer, scheduler, RNG state, *.bin weights) that
    `torch.load(weights_only=True)` refuses: it holds objects other than tensors. Nothing in it is run."""
    from transformers.trainer_pt_utils import safe_globals  # numpy's RNG state, as the Trainer allows it

    for file in sorted(checkpoint.glob("*.pt")) + sorted(checkpoint.glob("*.pth")) + sorted(checkpoint.glob("*.bin")):
        try:
            with safe_globals():
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            return file
        except Exception:  # noqa: BLE001, S112 - any other trouble is not this one
            continue
    return None


def torch_file_problem(file: Path) -> str | None:
    """Why a `torch.save` file (a zip archive) cannot be loaded, checked without loading it: a file cut short
    has lost the archive's directory, which is written last."""
    try:
        with zipfile.ZipFile(file) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        size = file.stat().st_size if file.is_file() else 0
        return f"{file.name} is truncated or damaged ({size} bytes, {e})"
    return None


def last_checkpoint(output_dir: str | Path) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete `checkpoint-N` of a folder (None if there is none), and the (path, problem)
    of each newer one that was skipped because it is incomplete."""
    folder, skipped = Path(output_dir), []
    steps = sorted(
        (int(p.name.rpartition("-")[2]), p)
        for p in (folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else [])
        if p.is_dir() and p.name.rpartition("-")[2].isdigit()
    )
    for _, path in reversed(steps):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path), skipped
        skipped.append((str(path), problem))
    return None, skipped


def shape_mismatch(checkpoint: Path, model: torch.nn.Module) -> str | None:
    """The first weight whose shape in the checkpoint's safetensors differs from the model's (a checkpoint of
    another width or vocabulary), read from the files' headers; None when every shared name fits."""
    from safetensors import safe_open

    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    for name, p in model.named_parameters(remove_duplicate=False):  # ZeRO-3: an empty placeholder, whole ds_shape
        if hasattr(p, "ds_shape"):
            shapes[name] = tuple(p.ds_shape)
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                saved = tuple(f.get_slice(name).get_shape())
                if name in shapes and shapes[name] != saved:
                    return f"{name} is {list(saved)} in {file.name}, {list(shapes[name])} in the model"
    return None


# settings that may differ between a run and its resumption without changing what is trained
RESUME_FREE = {"output_dir", "logging_dir", "resume_from_checkpoint", "overwrite_output_dir", "disable_tqdm"}


def changed_settings(checkpoint: Path, args: TrainingArguments) -> list[str]:
    """Each training setting of this run that differs from the one the checkpoint was written with (read
    from its dtrpo_config.json), as "field: checkpoint's value -> this run's value"."""
    try:
        saved = json.loads((checkpoint / CONFIG_FILE).read_text())["args"]
    except (OSError, ValueError, KeyError):
        return []
    now = json.loads(args.to_json_string())
    return [
        f"{k}: {saved[k]!r} -> {now[k]!r}"
        for k in sorted(saved.keys() & now.keys() - RESUME_FREE)
        if saved[k] != now[k]
    ]


# the files a run saves beside its checkpoints (model, tokenizer, config, state); weights are *.safetensors / *.bin
RUN_FILES = (
    *("config.json", "generation_config.json", CONFIG_FILE, TRAINER_STATE_NAME, "model.safetensors.index.json"),
    *("adapter_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
    *("added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt"),
)


def earlier_run(output_dir: str | Path) -> list[Path]:
    """What an earlier run left in `output_dir`: its checkpoint and staging folders and the files a run
    saves (other files, such as data the user keeps there, are not part of it). Empty when none."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    entries = sorted(folder.iterdir())
    folders = [p for p in entries if p.is_dir() and p.name.startswith((f"{PREFIX_CHECKPOINT_DIR}-", STAGING))]
    files = [p for p in entries if p.is_file() and (p.name in RUN_FILES or p.suffix in (".safetensors", ".bin"))]
    return folders + files


def claim_output_dir(args: TrainingArguments) -> None:
    """Refuse an output folder holding an earlier run, or with `overwrite_output_dir` delete that run."""
    found = earlier_run(args.output_dir)
    if not found:
        return
    if not getattr(args, "overwrite_output_dir", False):
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise ValueError(
            f"--output_dir {args.output_dir} holds an earlier run ({names}); pass --overwrite_output_dir true to "
            "delete it and start afresh, or --resume_from_checkpoint last to continue it"
        )
    if args.should_save:
        logger.warning("overwrite_output_dir: deleting the earlier run in %s (%d entries)", args.output_dir, len(found))
        for path in found:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


class SaveFailed(OSError):
    """Writing a model failed for want of room (`write_failure`); the message names the folder."""


def write_failure(e: BaseException) -> str | None:
    """The first line of `e` when it is a failure to write a file (a full disk, a file-size limit), else None:
    an `OSError`; safetensors' `SafetensorError` from an I/O error ("File too large", "No space left on
    device"); torch's zip writer's `RuntimeError` ("file write failed", "unexpected pos ...", "basic_ios::clear:
    iostream error"). Neither of the last two is an `OSError`."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, OSError):
        return line
    io = ("I/O error", "IoError", "No space left", "File too large", "os error")
    if type(e).__name__ == "SafetensorError" and any(k in text for k in io):
        return line
    torch_io = ("write", "unexpected pos", "iostream error", "No space left", "File too large")
    if isinstance(e, RuntimeError) and any(k in text for k in torch_io):
        return line
    return None


def _fsdp_asked(args: TrainingArguments) -> bool:
    """FSDP asked for by the TrainingArguments (`fsdp=...`) or by an `accelerate launch` FSDP config."""
    return args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


LOCK_FILE = ".dtrpo-run.lock"  # in the output folder while a run trains or saves into it


def output_lock(args: TrainingArguments):
    """The output folder's lock, taken by the main process: one run at a time writes into an output_dir."""
    if not args.should_save:
        return contextlib.nullcontext()
    return hold(Path(args.output_dir) / LOCK_FILE, f"--output_dir {args.output_dir}")


class RunFinished(ValueError):
    """Resuming a run that has trained all its steps: nothing is trained, and its final model is kept."""


def final_model_problem(folder: Path) -> str | None:
    """Why `folder` holds no whole final model, or None. The final save writes into `.partial-model` and moves
    the weights in last, so a kill during it leaves that staging folder, or no weights."""
    staging = folder / f"{STAGING}model"
    if staging.is_dir() and any(staging.iterdir()):
        return f"its final save was cut short ({staging.name} is left)"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("*.bin")):
        return "no final model"
    return next((problem for problem in map(safetensors_problem, weights) if problem), None)


class Diverged(ValueError):
    """The training loss or the weights are no longer finite: the run stops before saving them."""


def finished_run(checkpoint: Path, args: TrainingArguments) -> str | None:
    """Why resuming from `checkpoint` has nothing to train (its step is this run's last), or None."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    planned = args.max_steps if args.max_steps > 0 else state.get("max_steps") if isinstance(state, dict) else None
    if not isinstance(step, int) or not isinstance(planned, int) or step < planned:
        return None
    return (
        f"{checkpoint}: the run is already finished (step {step} of {planned}); nothing to train, and the final "
        f"model in {args.output_dir} is kept (pass a larger --max_steps to train further)"
    )


def other_base(checkpoint: Path, name: str | None, weights: str) -> str | None:
    """How the base model of the checkpoint's run differs from this run's (weights fingerprint, or the name
    when the checkpoint recorded no fingerprint), or None when it is the same or was not recorded."""
    try:
        saved = json.loads((checkpoint / CONFIG_FILE).read_text()).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(saved, dict):
        return None
    then, now = f"{saved.get('name')} (weights {str(saved.get('weights'))[:12]})", f"{name} (weights {weights[:12]})"
    if saved.get("weights") not in (None, weights) or (saved.get("weights") is None and saved.get("name") != name):
        return (
            f"its run started from another model, {then}, and this run from {now}; resume with that run's "
            "--model_name_or_path (its reference and starting point)"
        )
    return None


def pad_id(tokenizer) -> int:
    """The id that fills padding. It is never attended nor read, so EOS serves for tokenizers without a pad token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token")
    return pad


def frozen(model):
    return model.eval().requires_grad_(False)


def is_peft(model) -> bool:
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
    from dtrpo.models import adapter_from_config, vocabulary_problem

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
    problem = vocabulary_problem(model, processing_class, adapter)
    if problem:
        raise ValueError(problem)
    if peft_config is not None:
        from peft import get_peft_model
        from transformers import set_seed

        from dtrpo.lora import lora_targets

        set_seed(args.seed)  # the LoRA initialisation: the same on every rank and in every run of one --seed
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
        self._bad_step = None  # (), on the device: the first step whose loss was not finite, -1 while none
        self.base_weights = weights_fingerprint(model)  # the starting model's: a resume must start from it too
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
        from dtrpo.data_cache import DataWatch

        self.add_callback(DataWatch([self.train_dataset, self.eval_dataset]))
        if getattr(args, "streaming", False):
            from dtrpo.streaming import StreamEnd

            self.add_callback(StreamEnd())
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
            self.check_finite(weights=False)  # the logged loss is no guide: the Trainer filters out NaN losses
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, holding the output folder's lock, after checking what the run reads and writes
        (`_resume_point`), and checking the loss and weights are finite at the end (`check_finite`). A finished
        run whose final model is not whole (killed in its final save) is restored from its last checkpoint
        (`restore`), for the caller's final save; under DeepSpeed or FSDP, whose engine must exist to load
        sharded weights, `Trainer.train` resumes at that last step instead, which loads them and trains nothing. A
        checkpoint pickle holding objects other than tensors is one ValueError naming the file."""
        with output_lock(self.args):
            self._finished = None
            resume_from_checkpoint = self._resume_point(resume_from_checkpoint)
            if self._finished is not None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
                result = self.restore(self._finished)
            else:
                try:
                    result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
                except pickle.UnpicklingError:  # torch.load(weights_only=True) met an object that is not a tensor
                    unsafe = resume_from_checkpoint and unsafe_file(Path(resume_from_checkpoint))
                    if not unsafe:
                        raise
                    raise ValueError(
                        f"{unsafe}: refused: it holds objects other than tensors, which could run code (checkpoint "
                        "files load only with weights_only=True); resume from a checkpoint this run wrote"
                    ) from None
            self.check_finite(weights=True)
        return result

    def restore(self, checkpoint: str | Path) -> TrainOutput:
        """The trainer as a finished run leaves it, read from that run's last checkpoint: its state, and its
        weights (the best checkpoint's under `load_best_model_at_end`). For the final save that a kill during
        it (or after it, before `iterate` deleted the checkpoints) left to do: it writes what the
        uninterrupted run wrote."""
        checkpoint = Path(checkpoint)
        self.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
        best = self.state.best_model_checkpoint if self.args.load_best_model_at_end else None
        best = checkpoint.parent / Path(best).name if best else None  # the folder may have moved since
        self._load_from_checkpoint(str(best if best is not None and best.is_dir() else checkpoint))
        losses = [h["loss"] for h in self.state.log_history if "loss" in h]
        metrics = {"restored_from_step": self.state.global_step}
        return TrainOutput(self.state.global_step, losses[-1] if losses else float("nan"), metrics)

    def _resume_point(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """The checkpoint to resume from, checked: it must be complete (`True` picks the newest complete one
        in the output folder, logging those skipped), its run must have started from this run's base model,
        and must have steps left to train (else `RunFinished`), unless the output folder lacks its whole final
        model (then `train` restores it from this checkpoint). A fresh run refuses an output folder that
        holds an earlier run unless `overwrite_output_dir` (which deletes that run first), so that nothing
        stale is mixed in or resumed from later."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint, skipped = last_checkpoint(self.args.output_dir)
            for path, problem in skipped:
                logger.warning("skipping incomplete checkpoint %s (%s)", path, problem)
            if resume_from_checkpoint is None:
                raise ValueError(f"{self.args.output_dir}: no complete checkpoint to resume from")
        elif resume_from_checkpoint:
            problem = checkpoint_problem(Path(resume_from_checkpoint))
            if problem:
                raise ValueError(f"{resume_from_checkpoint}: not a complete checkpoint ({problem})")
        else:
            claim_output_dir(self.args)
            return None
        checkpoint = Path(resume_from_checkpoint)
        problem = shape_mismatch(checkpoint, self.model)
        if problem:
            raise ValueError(f"{checkpoint}: its weights do not fit this model ({problem})")
        other = other_base(checkpoint, self.base_model_name, self.base_weights)
        if other:
            raise ValueError(f"--resume_from_checkpoint {checkpoint}: {other}")
        finished = finished_run(checkpoint, self.args)
        unsaved = finished and final_model_problem(Path(self.args.output_dir))
        if finished and not unsaved:
            raise RunFinished(finished)
        if unsaved:  # killed during its final save: the model is written from this checkpoint
            logger.warning("%s: the run trained all its steps but %s; writing it from this checkpoint", checkpoint,
                           f"its final model is not whole ({unsaved})")  # fmt: skip
            self._finished = checkpoint
        for line in changed_settings(checkpoint, self.args):
            logger.warning("resuming %s with a different setting: %s", checkpoint, line)
        return str(checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # the first update whose loss is not finite, kept on the device: read at logging steps and saves
        # (`check_finite`), so no step waits on the host for it
        step = self.state.global_step + 1
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()).all() & (self._bad_step < 0)
        self._bad_step = torch.where(bad, step, self._bad_step)
        return loss

    def check_finite(self, weights: bool) -> None:
        """Stop the run (`Diverged`) if a training loss so far was not finite or, with `weights`, if a weight
        is not, naming the step and the last complete checkpoint: called at logging steps, before every
        save and at the end of training, so that NaN weights are never saved. Every process calls it."""
        step = -1 if self._bad_step is None else int(self._bad_step)  # the one host sync
        bad = []  # names of the weights holding NaN or inf (checked at saves: one sync per tensor)
        if weights and step < 0:
            bad = [n for n, p in self.model.named_parameters() if p.numel() and not torch.isfinite(p.detach()).all()]
        if self.args.world_size > 1:
            flags = torch.tensor([step, len(bad)], device=self.args.device)
            step, n_bad = (int(v) for v in self.accelerator.gather(flags).reshape(-1, 2).max(0).values)
            bad = bad or ["on another process"] * n_bad
        if step < 0 and not bad:
            return
        last, _ = last_checkpoint(self.args.output_dir)
        what = (
            f"the training loss was not finite (NaN or inf) at step {step}"
            if step >= 0
            else f"the weights hold NaN or inf after step {self.state.global_step} ({len(bad)} tensors: {bad[0]}, ...)"
        )
        raise Diverged(
            f"training diverged: {what} (--learning_rate {self.args.learning_rate}); stopped without saving it. "
            + (f"The last complete checkpoint is {last}" if last else "No checkpoint was saved before it")
        )

    def _save_checkpoint(self, model, trial) -> None:
        """`checkpoint-N` written whole or not at all: the Trainer writes it inside a staging folder
        (`.partial-checkpoint-N`), which is renamed into place once every file is there. A run killed
        mid-save leaves only the staging folder, which no resume reads."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{STAGING}{name}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.check_finite(weights=True)
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:
            problem = write_failure(e)
            if problem is None:
                raise
            last, _ = last_checkpoint(run_dir)
            raise OSError(
                f"writing {name} failed at step {self.state.global_step} ({problem}); is the disk full? The run "
                f"stopped; {f'{last} is complete: ' if last else ''}resume with --resume_from_checkpoint last"
            ) from None
        finally:
            self._staging = None
        if self._sharded_fsdp() and self.args.should_save:  # no `_save` ran: the config and card beside the shards
            self.write_run_files(staging / name)
        self.accelerator.wait_for_everyone()
        final = run_dir / name
        if self.state.best_global_step:  # the Trainer looked for the best checkpoint in the staging folder
            best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
            if best == final or best.exists():
                self.state.best_model_checkpoint = str(best)
                if self.args.should_save:
                    self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
        if not self.args.should_save:
            return
        if final.exists():  # an incomplete leftover of that step: replaced
            shutil.rmtree(final)
        os.replace(staging / name, final)
        shutil.rmtree(staging)
        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; the final model (not a checkpoint's) is written into a staging folder
        (`.partial-model`) beside the checkpoints and its files are moved into the output folder once all are
        written, weights last: a run killed or out of space mid-save leaves no half-written model there."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        final = Path(output_dir or self.args.output_dir)
        staging = final / f"{STAGING}model"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        try:
            if self._sharded_fsdp():  # the Trainer writes no weights at a sharded state dict type: gather them whole
                state_dict = self.accelerator.get_state_dict(self.model)
                if self.args.should_save:
                    self._save(str(staging), state_dict=state_dict)
            else:
                super().save_model(str(staging), _internal_call=True)  # True: no hub push before the files are in place
        except Exception as e:
            problem = write_failure(e)
            if problem is None:
                raise
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # the space it took back
            raise SaveFailed(f"writing the final model to {final} failed ({problem}); is the disk full?") from None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            weights = (".safetensors", ".bin", ".index.json")
            for path in sorted(staging.iterdir(), key=lambda p: p.name.endswith(weights)):
                target = final / path.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(path, target)
            staging.rmdir()
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _sharded_fsdp(self) -> bool:
        """FSDP with a state dict type other than FULL_STATE_DICT (the shipped fsdp2.yaml: SHARDED_STATE_DICT), where
        checkpoints hold one weights folder per rank (`pytorch_model_fsdp_0`) and `Trainer.save_model` writes none."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        return plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type)

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; an FSDP launch on CPU (gloo) runs FSDP, where accelerate would keep it in
        DDP without a word (it selects FSDP only on accelerators). A stream's batches are not dispatched."""
        if getattr(self.args, "streaming", False):
            from dtrpo.streaming import undispatched

            undispatched(self.args)
        super().create_accelerator_and_postprocess()
        if self.accelerator.distributed_type.value == "MULTI_CPU" and _fsdp_asked(self.args):
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))
            state.distributed_type = DistributedType.FSDP
            PartialState().distributed_type = DistributedType.FSDP  # each AcceleratorState() copies it from here
            self.is_fsdp_enabled = True
            logger.warning("FSDP on CPU: accelerate keeps a CPU run in DDP; dtrpo switches it to FSDP (gloo)")

    def _get_output_dir(self, trial) -> str:
        return str(getattr(self, "_staging", None) or super()._get_output_dir(trial))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if not self.args.should_save:  # only the main process writes files
            return
        self.write_run_files(Path(output_dir or self.args.output_dir))

    def write_run_files(self, out: Path) -> None:
        """The resolved config (`dtrpo_config.json`) and the model card (README.md) beside a saved model."""
        out.mkdir(parents=True, exist_ok=True)
        resolved = {
            "args": json.loads(self.args.to_json_string()),
            "adapter": vars(self.adapter),
            "base_model": {"name": self.base_model_name, "weights": self.base_weights},
        }
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
        folder = Path(folder)
        shown = folder.parent if folder.name.startswith(STAGING) else folder  # the final model's staging folder
        text = model_card(
            self.method,
            model_name or Path(self.args.hub_model_id or shown).name,
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
