"""The `dtrpo` command line: one sub-command per job, each a thin `main` over library functions.

Flags are generated from the config dataclasses (one help line per field); `--config preset.yaml`
overrides their defaults, and flags given on the command line override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import importlib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser

COMMANDS = {}


def command(name: str, help: str):
    def register(fn):
        COMMANDS[name] = (fn, help)
        return fn

    return register


def load_preset(path: str | Path, dataclass_types) -> dict:
    """A YAML preset as a dict, refusing malformed YAML, tags, keys that no config dataclass has (with a close
    match) and values of the wrong type (argparse applies preset values as defaults without converting them)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: config preset {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # line numbers of the keys, before any value is built
        preset = yaml.safe_load(text) or {}
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SystemExit(f"error: {path}:{where}: not a valid YAML preset ({problem})") from None
    if not isinstance(preset, dict):
        raise SystemExit(f"error: {path}: a preset is a mapping of field: value, got {type(preset).__name__}")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
    fields = {f.name: hint for t in dataclass_types for f, hint in _field_types(t)}
    for key, value in preset.items():
        where = f"{path}: line {lines[key]}" if key in lines else str(path)
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SystemExit(f"error: {where}: unknown config key {key!r}{hint}")
        if not _fits(value, fields[key]):
            raise SystemExit(
                f"error: {where}: {key} must be {_type_name(fields[key])}, got {type(value).__name__} {value!r}"
            )
    return preset


def _field_types(dataclass_type) -> list:
    """(field, resolved type) of a config dataclass; a type that cannot be resolved is `Any` (not checked)."""
    try:
        hints = typing.get_type_hints(dataclass_type)
    except Exception:  # noqa: BLE001 - a field annotation naming an optional dependency
        hints = {}
    return [(f, hints.get(f.name, typing.Any)) for f in dataclasses.fields(dataclass_type)]


def _fits(value, hint) -> bool:
    """Whether a YAML value can stand for a field of type `hint`: an int for a float, a scalar for a list (the
    config wraps it), a string that argparse converts with the field's type. Types not listed here pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return not args or all(_fits(v, args[0]) for v in items)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"))
    if hint in (int, float):
        if isinstance(value, str):
            return _converts(value, hint)
        return not isinstance(value, bool) and isinstance(value, (int, float) if hint is float else int)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in {m.value for m in hint} or isinstance(value, hint)
    return True


def _converts(text: str, kind: type) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


class OldOutputFlag(argparse.Action):
    """`--output` where the folder is `--output_dir`: still works for one release, with a warning. An exact
    option string wins over argparse's prefix matching, which finds `--output` ambiguous between the
    `--output_dir` and `--output-dir` that HfArgumentParser registers."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        print("warning: --output is deprecated; use --output_dir (removed in the next release)", file=sys.stderr)
        setattr(namespace, self.dest, value)


def parse(dataclass_types, argv: list[str], prog: str, description: str, shared: bool = False):
    """Dataclasses from `--config preset.yaml` plus command-line flags (flags win). With `shared`, a field that
    several dataclasses declare is one flag (the last dataclass's default and help) whose value each receives."""
    names = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    conflicts = {"conflict_handler": "resolve"} if shared else {}
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description, **conflicts)
    parser.add_argument("--config", help="YAML preset whose keys override the defaults below.")
    if known.config:
        parser.set_defaults(**load_preset(known.config, dataclass_types))
    if "output_dir" in names and "output" not in names:  # eval, pairs, bench and export keep their own --output
        parser.add_argument(
            "--output", dest="output_dir", action=OldOutputFlag, default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    args = rest + (["--config", known.config] if known.config else [])
    try:
        if shared:  # HfArgumentParser hands a value to the first dataclass only: each reads it here
            namespace, unknown = parser.parse_known_args(args)
            parsed = [_from_namespace(t, namespace) for t in dataclass_types]
        else:
            *parsed, _, unknown = parser.parse_args_into_dataclasses(args, return_remaining_strings=True)
    except ValueError as err:  # a config __post_init__ names the flag
        raise SystemExit(f"error: {err}") from None
    if unknown:
        refuse_unknown(unknown, names, prog)
    return parsed


def _from_namespace(dataclass_type, namespace):
    values = vars(namespace)
    return dataclass_type(**{f.name: values[f.name] for f in dataclasses.fields(dataclass_type) if f.init})


def refuse_unknown(unknown: list[str], names: set[str], prog: str) -> None:
    """An error for the first argument no dataclass takes, with the closest flag when one is close."""
    flags = sorted({f"--{n}" for n in names} | {"--config"})
    word = unknown[0].split("=")[0]
    if not word.startswith("-"):
        raise SystemExit(f"error: {prog}: unexpected argument {word!r} (flags take the form --name value)")
    close = difflib.get_close_matches(word, flags, n=1, cutoff=0.7)
    hint = f"; did you mean {close[0]}?" if close else f"; see {prog} --help"
    raise SystemExit(f"error: {prog}: unknown flag {word}{hint}")


def require(args, *names: str) -> None:
    missing = [n for n in names if getattr(args, n) in (None, "")]
    if missing:
        raise SystemExit("error: the following arguments are required: " + ", ".join(f"--{n}" for n in missing))


@dataclass
class TinyArgs:
    output_dir: str = field(default=None, metadata={"help": "Folder to write the tiny model and tokenizer to."})
    block_size: int = field(default=8, metadata={"help": "Block size the model is trained and sampled with."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the tiny Qwen3."})
    num_layers: int = field(default=2, metadata={"help": "Number of transformer layers."})
    seed: int = field(default=0, metadata={"help": "Seed of the random initialisation."})
    family: str = field(
        default="native", metadata={"help": "'native' (a tiny Qwen3) or 'llada2' (a tiny LLaDA2 mixture of experts)."}
    )


@command("init-tiny", "write the built-in tiny block-causal dLLM and its character tokenizer")
def init_tiny_main(argv: list[str]) -> None:
    (args,) = parse([TinyArgs], argv, "dtrpo init-tiny", COMMANDS["init-tiny"][1])
    require(args, "output_dir")
    found = held_model(args.output_dir)
    if found:
        raise ValueError(f"--output_dir {args.output_dir} holds a model or a run ({found}); give a new or empty folder")
    if args.family not in TINY_WRITERS:
        raise ValueError(f"--family {args.family!r}: init-tiny writes one of {sorted(TINY_WRITERS)}")
    write = importlib.import_module(TINY_WRITERS[args.family]).init_tiny
    path = write(args.output_dir, args.block_size, args.hidden_size, args.num_layers, args.seed)
    print(f"wrote tiny {args.family} model to {path}")


TINY_WRITERS = {"native": "dtrpo.models", "llada2": "dtrpo.families.llada2"}  # --family: the module's init_tiny


def held_model(folder: str | Path) -> str:
    """The files of a model or a run in `folder` (weights, config, tokenizer, checkpoints), named; "" if none."""
    from dtrpo.base import earlier_run

    found = earlier_run(folder)
    return ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")


def _deprecated(args, old: str, new: str) -> None:
    """An old flag still works for one release: its value moves to the new one, with a warning."""
    value = getattr(args, old)
    if value is not None:
        print(f"warning: --{old} is deprecated; use --{new} (removed in the next release)", file=sys.stderr)
        setattr(args, new, value)
        setattr(args, old, None)


@dataclass
class ModelArgs:
    model_name_or_path: str = field(
        default=None, metadata={"help": "Model folder: a dtrpo/transformers checkpoint or a family's own."}
    )
    model: str | None = field(default=None, metadata={"help": "Deprecated: use --model_name_or_path."})
    family: str | None = field(default=None, metadata={"help": "Model family; default: detected from config.json."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 (GPU) or float16."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention backend: sdpa, or flex_attention on a GPU."}
    )

    def __post_init__(self) -> None:
        _deprecated(self, "model", "model_name_or_path")

    def load(self, block_size: int | None = None):
        """(model, tokenizer, adapter) of `--model_name_or_path`, on the GPU when there is one; `block_size`
        overrides the checkpoint's (and is required where its config.json has none)."""
        import torch

        from dtrpo.families import load_model

        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        device = "cuda" if torch.cuda.is_available() else None
        dtype = getattr(torch, self.dtype)
        return load_model(
            self.model_name_or_path, self.family, dtype, self.attn_implementation, device=device, block_size=block_size
        )


@dataclass
class DataArgs:
    """Training data as TRL's scripts name it."""

    dataset_name: str = field(
        default=None,
        metadata={
            "help": "Training data: a .jsonl/.json/.parquet file, a folder written by save_to_disk, or a datasets "
            "name already in the local cache (nothing is downloaded)."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split of --dataset_name to evaluate on (a dataset with splits)."}
    )
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data file or folder for evaluation."})
    data: str | None = field(default=None, metadata={"help": "Deprecated: use --dataset_name."})

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        _deprecated(self, "data", "dataset_name")

    def datasets(self):
        """(train, eval): paths for local files and folders, Dataset objects for cached datasets names."""
        train = _dataset(self.dataset_name, self.dataset_train_split)
        test = _dataset(self.dataset_name, self.dataset_test_split) if self.dataset_test_split else None
        return train, self.eval_data or test


def _dataset(name: str, split: str):
    path = Path(name)
    if path.is_file() or (path.is_dir() and not (path / "dataset_dict.json").is_file()):
        return name  # read by dtrpo.data, which names file, line and field in its errors
    if path.is_dir():
        from dtrpo.data import load_rows

        dd = load_rows(path, splits=True)  # a damaged file is named, not a pyarrow traceback
        if split not in dd:
            raise ValueError(f"{name}: no split {split!r} (it has {sorted(dd)})")
        return dd[split]
    import datasets

    try:
        return datasets.load_dataset(name, split=split, download_mode="reuse_cache_if_exists")
    except Exception as e:  # noqa: BLE001 - any failure to find it locally is one message
        raise ValueError(
            f"--dataset_name {name!r}: not a local file or folder, and not a dataset in the local datasets cache "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


@dataclass
class PeftArgs:
    """LoRA as TRL's scripts name it; the trainer applies it (`peft_config`)."""

    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters instead of every weight; the reference is the base model with adapters "
            "disabled, checkpoints hold the adapters, the output folder the merged model."
        },
    )
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (default 16)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (0 under --disable_dropout)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "LoRA target modules (native or the family's own names); default: every "
            "attention and MLP projection."
        },
    )

    def peft_config(self):
        """A `peft.LoraConfig`, or None without --use_peft. `--lora_r N` alone (dtrpo's old way) turns LoRA on."""
        if self.lora_r is not None and not self.use_peft:
            if self.lora_r == 0:
                return None
            print("warning: --lora_r without --use_peft is deprecated; pass --use_peft true", file=sys.stderr)
            self.use_peft = True
        if not self.use_peft:
            return None
        from peft import LoraConfig

        from dtrpo.lora import DEFAULT_TARGETS

        return LoraConfig(
            r=self.lora_r or 16,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules or DEFAULT_TARGETS),
            bias="none",
            task_type="CAUSAL_LM",
        )


@dataclass
class TrainScript(PeftArgs, DataArgs, ModelArgs):
    pass


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint last` (or true): the newest complete checkpoint in the output folder,
    naming each newer incomplete one it skips. A path is checked by the trainer."""
    if value is None or value.lower() not in ("last", "true"):
        return value
    from dtrpo.base import last_checkpoint

    last, skipped = last_checkpoint(output_dir)
    for path, problem in skipped:
        print(f"skipping incomplete checkpoint {path} ({problem})", file=sys.stderr)
    if last is None:
        raise SystemExit(f"error: --resume_from_checkpoint {value}: no complete checkpoint-* folder in {output_dir}")
    print(f"resuming from {last}", file=sys.stderr)
    return last


def run_training(trainer, config, save=None) -> None:
    """Train (resuming when asked), save the final model into the output folder, print the metrics. The
    model is reported as saved only once every file is written; the output folder is locked throughout,
    and resuming a finished run trains and saves nothing (one line says so)."""
    from dtrpo.base import RunFinished, SaveFailed, last_checkpoint, output_lock, write_failure

    with output_lock(config):
        try:
            result = trainer.train(
                resume_from_checkpoint=resolve_resume(config.resume_from_checkpoint, config.output_dir)
            )
        except RunFinished as e:
            if config.should_save:  # the main process speaks for all
                print(e)
            return
        try:
            (save or (lambda t: t.save_model(config.output_dir)))(trainer)
        except Exception as e:
            problem = write_failure(e)
            if problem is None:
                raise
            last, _ = last_checkpoint(config.output_dir)
            kept = (
                f"{last} is complete; free space and resume with --resume_from_checkpoint last"
                if last
                else "no checkpoint holds the trained weights "
                f"(--save_strategy {getattr(config.save_strategy, 'value', config.save_strategy)}), so they could "
                "not be saved and are lost; free space and train again"
            )
            what = f"saving the final model to {config.output_dir} failed ({problem}); is the disk full?"
            raise OSError(f"{e if isinstance(e, SaveFailed) else what} It is not saved: {kept}") from None
    if config.should_save:
        print(json.dumps(result.metrics, indent=2))
        print(f"saved model to {config.output_dir}")


@command("train", "preference-train a diffusion LM with dTRPO (or a baseline estimator)")
def train_main(argv: list[str]) -> None:
    from dtrpo.trainer import DTRPOConfig, DTRPOTrainer

    script, config = parse([TrainScript, DTRPOConfig], argv, "dtrpo train", COMMANDS["train"][1])
    require(script, "model_name_or_path", "dataset_name")
    require(config, "output_dir")
    train, test = script.datasets()
    model, tokenizer, adapter = script.load(config.block_size)
    peft_config = script.peft_config()
    trainer = DTRPOTrainer(
        model=model,
        args=config,
        adapter=adapter,
        processing_class=tokenizer,
        train_dataset=train,
        eval_dataset=test,
        peft_config=peft_config,
    )
    run_training(trainer, config, _merged_save(tokenizer, trainer.adapter, config) if peft_config else None)


def _merged_save(tokenizer, adapter, config):
    """The final save of a LoRA run: the merged model (checkpoints keep the adapters, for resuming)."""

    def save(trainer):
        from dtrpo.distributed import merged_lora
        from dtrpo.families import export_checkpoint, load_model

        base = lambda: load_model(trainer.base_model_name, block_size=config.block_size)[0]  # FSDP: the structure
        merged = merged_lora(trainer.model, trainer.accelerator, base)  # whole on the main process, None elsewhere
        if merged is not None:
            export_checkpoint(merged, tokenizer, adapter, config.output_dir, format="native")
            trainer.write_run_files(Path(config.output_dir))
        trainer.accelerator.wait_for_everyone()

    return save


@dataclass
class SFTScript(PeftArgs, DataArgs, ModelArgs):
    pass


@command("sft", "supervised masked- or block-diffusion training (method.md section 7)")
def sft_main(argv: list[str]) -> None:
    from dtrpo.sft import DiffusionSFTConfig, DiffusionSFTTrainer

    script, config = parse([SFTScript, DiffusionSFTConfig], argv, "dtrpo sft", COMMANDS["sft"][1])
    require(script, "model_name_or_path", "dataset_name")
    require(config, "output_dir")
    train, test = script.datasets()
    model, tokenizer, adapter = script.load(config.block_size)
    peft_config = script.peft_config()
    trainer = DiffusionSFTTrainer(
        model=model,
        args=config,
        adapter=adapter,
        processing_class=tokenizer,
        train_dataset=train,
        eval_dataset=test,
        peft_config=peft_config,
    )
    run_training(trainer, config, _merged_save(tokenizer, trainer.adapter, config) if peft_config else None)


@dataclass
class TaskSpec(ModelArgs):
    """The model and the task it is scored on, as `eval`, `pairs` and `iterate` take them."""

    task: str = field(default="arithmetic", metadata={"help": "Built-in task (arithmetic:digits=3) or prompts file."})
    match: str | None = field(default=None, metadata={"help": "Prompts file answers: 'exact' or 'numeric' match."})
    reward: str | None = field(
        default=None,
        metadata={
            "help": "Reward function 'module:function' for a prompts file, called as reward(prompt, response) or "
            "reward(prompt, response, row) (row: the file's row as a dict) and returning a float."
        },
    )
    reward_timeout: float | None = field(
        default=None,
        metadata={"help": "Seconds one --reward call may take; past it the run stops, naming the item."},
    )
    reward_model: str | None = field(
        default=None,
        metadata={
            "help": "Reward model folder (transformers sequence-classification, one label) scoring a prompts file's "
            "responses instead of --reward: its own tokenizer and chat template, on the training device, in --dtype."
        },
    )
    reward_batch_size: int = field(default=16, metadata={"help": "Texts per --reward_model forward pass."})
    prompt_field: str = field(
        default="prompt", metadata={"help": "Field of a prompts file holding the prompt (GSM8K: question)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward is not None and self.reward_model is not None:
            raise ValueError("--reward and --reward_model both given: score with one, a function or a model")
        if self.reward_batch_size <= 0:
            raise ValueError(f"--reward_batch_size must be positive, got {self.reward_batch_size}")
        if self.reward_timeout is not None and not 0 < self.reward_timeout < float("inf"):
            raise ValueError(f"--reward_timeout must be a positive number of seconds, got {self.reward_timeout}")

    def load_task(self):
        """The task with its scorer (a reward model loaded last, after every check)."""
        from dtrpo.tasks import load_task

        return load_task(
            self.task,
            self.match,
            self.reward,
            self.prompt_field,
            self.reward_timeout,
            self.reward_model,
            self.reward_batch_size,
            self.dtype,
        )


@dataclass
class TaskArgs(TaskSpec):
    split: str | None = field(
        default=None,
        metadata={
            "help": "Split of the task's prompts: train or heldout (default: heldout for eval, train for pairs)."
        },
    )
    n: int | None = field(default=None, metadata={"help": "Number of prompts (default: the task's default / all)."})
    output: str = field(default=None, metadata={"help": "File to write (JSON report or JSONL)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n is not None and self.n <= 0:
            raise ValueError(f"--n must be positive, got {self.n}: no prompts, nothing to measure")

    def check_output(self, kind: str) -> None:
        """Before any work: `--output` (and its items file, `<output>.<kind>.jsonl`) is a file to write, not
        a folder nor the prompts file read."""
        if not self.output:
            return
        output = Path(self.output)
        if output.is_dir():
            raise ValueError(f"--output {output} is a folder; it names the file to write")
        task = Path(self.task)
        for path in (output, output.with_suffix(f".{kind}.jsonl")):
            if task.is_file() and path.exists() and path.samefile(task):  # also through a link
                raise ValueError(f"--output {output} would overwrite the prompts file --task {self.task}")


def family_decoding(s, family: str):
    """Sampler settings `s` with the family's decoding rule where no flag was given (`dtrpo.decoding`), and their
    one line printed (to stderr: stdout stays the command's output)."""
    from dtrpo.decoding import describe, given, resolve

    resolved = resolve(s, family)
    print(describe(resolved, family, given(s)), file=sys.stderr)
    return resolved


def _load_for_task(t: TaskSpec, block_size: int | None):
    require(t, "model_name_or_path")
    task = t.load_task()
    model, tokenizer, adapter = t.load(block_size)
    return task, model, tokenizer, adapter


@dataclass
class CompareArgs:
    compare: list[str] | None = field(
        default=None,
        metadata={
            "help": "Two eval reports A.json B.json of the same prompts: print the paired difference B - A of their "
            "scores, item by item, with its 95%% interval (no model is loaded)."
        },
    )


@command("eval", "accuracy on held-out prompts with a 95% interval, NFE and tokens/s; writes JSON")
def eval_main(argv: list[str]) -> None:
    from dtrpo.evaluate import SamplingArgs, evaluate, run_eval
    from dtrpo.tasks import stream_prompts

    t, s, c = parse([TaskArgs, SamplingArgs, CompareArgs], argv, "dtrpo eval", COMMANDS["eval"][1])
    if c.compare is not None:
        return compare_main(c.compare)
    t.check_output("items")
    task, model, tokenizer, adapter = _load_for_task(t, s.block_size)
    s = family_decoding(s, adapter.family)
    rows = stream_prompts(task, t.split or "heldout", t.n, seed=s.seed)
    if t.output:  # streamed, resumable and sharded; the report is written by rank 0
        report = run_eval(model, tokenizer, adapter, task, rows, s, t.output, desc="eval")
        if not report:  # a rank other than 0 of a sharded run
            return
    else:
        report = evaluate(model, tokenizer, adapter, task, list(rows), s, desc="eval")
    print(
        f"{task.name}: accuracy {report['accuracy']:.3f} (95% CI {report['ci95'][0]:.3f}-{report['ci95'][1]:.3f},"
        f" n={report['n']}), {report['nfe_per_batch']:.0f} NFE/batch, {report['tokens_per_second']:.0f} tokens/s"
    )
    if report["prompts_truncated"]:
        cut = report["prompts_truncated"]
        print(f"{cut} prompts kept their last {s.max_prompt_length} tokens (--max_prompt_length)")
    if t.output:
        print(f"wrote {t.output}")


def compare_main(paths: list[str]) -> None:
    from dtrpo.evaluate import compare

    if len(paths) != 2:
        raise SystemExit(f"error: --compare takes two eval reports, A.json B.json; got {len(paths)}")
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON eval report ({e})") from None
    r = compare(*reports, names=tuple(paths))
    a, b = paths
    ci = f"95% CI {r['ci95'][0]:+.3f} to {r['ci95'][1]:+.3f}," if r["n"] > 1 else f"n = {r['n']}: no interval;"
    print(
        f"{b} - {a}: {r['difference']:+.3f} ({ci} n={r['n']} paired items; {r['a']:.3f} -> {r['b']:.3f};"
        f" better in B: {r['b_better']}, better in A: {r['a_better']})"
    )


@command("pairs", "sample responses, score them with the task's verifier, write preference pairs (JSONL)")
def pairs_main(argv: list[str]) -> None:
    from dtrpo.evaluate import SamplingArgs
    from dtrpo.pairs import PairArgs, run_pairs
    from dtrpo.tasks import stream_prompts

    t, p, s = parse([TaskArgs, PairArgs, SamplingArgs], argv, "dtrpo pairs", COMMANDS["pairs"][1])
    require(t, "output")
    t.check_output("samples")
    task, model, tokenizer, adapter = _load_for_task(t, s.block_size)
    s = family_decoding(s, adapter.family)
    rows = stream_prompts(task, t.split or "train", t.n, seed=s.seed)
    stats = run_pairs(
        model, tokenizer, adapter, task, rows, p, s, model_name=t.model_name_or_path, output=t.output, desc="pairs"
    )
    if not stats:  # a rank other than 0 of a sharded run: rank 0 writes the pairs
        return
    print(json.dumps(stats, indent=2))
    print(f"wrote {stats['pairs']} pairs to {t.output}, and every prompt's samples and scores to {stats['items_file']}")
    if stats["ties_dropped"]:
        print(f"dropped {stats['ties_dropped']} candidate pairs whose scores differ by {p.min_score_gap} or less")
    if not stats["pairs"]:
        print("warning: no prompt had responses of different scores, so there is nothing to train on", file=sys.stderr)


@command("iterate", "rounds of sample, verify, pair, train (dTRPO or RFT), evaluate; table, JSON and plot")
def iterate_main(argv: list[str]) -> None:
    from dtrpo.evaluate import SamplingArgs
    from dtrpo.iterate import IterateArgs, IterateConfig, iterate
    from dtrpo.pairs import PairArgs
    from dtrpo.trainer import DTRPOConfig

    # --block_size, --steps_per_block (T_B: the estimator reduces the trajectory the sampler took), --seed
    # and --max_prompt_length are each one flag for the sampler and the trainer
    types = [TaskSpec, PairArgs, SamplingArgs, IterateArgs, DTRPOConfig]
    task, pairs, sampling, loop, train = parse(types, argv, "dtrpo iterate", COMMANDS["iterate"][1], shared=True)
    require(task, "model_name_or_path")
    iterate(IterateConfig(task, pairs, sampling, loop, train))


@dataclass
class GenerateArgs(ModelArgs):
    prompt: list[str] = field(default=None, metadata={"help": "Prompt text(s) to complete."})
    use_cache: bool = field(default=True, metadata={"help": "false: the same as --cache none."})


@command("generate", "block-wise diffusion sampling from prompts; prints responses, NFE and tokens/s")
def generate_main(argv: list[str]) -> None:
    from dtrpo.decoding import sampler_kwargs
    from dtrpo.evaluate import SamplingArgs, encode_prompts
    from dtrpo.sampler import generate

    g, s = parse([GenerateArgs, SamplingArgs], argv, "dtrpo generate", COMMANDS["generate"][1])
    require(g, "model_name_or_path", "prompt")
    if not g.use_cache and s.cache not in ("auto", "none"):
        raise ValueError(f"--use_cache false is --cache none, yet --cache {s.cache} was given: pass one of them")
    model, tokenizer, adapter = g.load(s.block_size)
    s = family_decoding(s, adapter.family)
    model.eval()
    prompts, cut = encode_prompts(tokenizer, g.prompt, s, adapter, model)
    if cut:
        print(f"{cut} prompts kept their last {s.max_prompt_length} tokens (--max_prompt_length)", file=sys.stderr)
    out = generate(
        adapter,
        model,
        prompts,
        s.gen_length,
        s.steps_per_block or adapter.block_size,
        temperature=s.temperature,
        seed=s.seed,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=g.use_cache,
        cache=s.cache,
        **sampler_kwargs(s),
    )
    for p, seq in zip(g.prompt, out.sequences, strict=True):
        print(json.dumps({"prompt": p, "response": tokenizer.decode(seq, skip_special_tokens=True)}))
    print(f"NFE {out.nfe}, {out.tokens_per_second:.0f} tokens/s, {out.seconds:.2f} s")


@dataclass
class ExportArgs(ModelArgs):
    output: str = field(default=None, metadata={"help": "Folder to write."})
    format: str = field(
        default="family",
        metadata={
            "help": "'family' (the family's own config keys and parameter "
            "names) or 'native' (transformers save_pretrained)."
        },
    )
    code_from: str | None = field(
        default=None,
        metadata={"help": "Copy this folder's *.py (the family's remote code) beside a family-format export."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace another model in --output (without it, only an earlier export of this model)."},
    )


EXPORT_RECORD = "dtrpo_export.json"  # beside an export: the model folder it was exported from


def claim_export_folder(e: ExportArgs) -> list[Path]:
    """Refuse an --output that is a file, the model folder itself, or a folder holding another model (not an
    earlier export of this one) without --overwrite true. Returns the weight files there, to be removed
    once the model is loaded, so that no stale shard of the earlier model is left beside the new ones."""
    out, source = Path(e.output), Path(e.model_name_or_path).resolve()
    if out.is_file():
        raise ValueError(f"--output {out} is a file; export writes a folder")
    if out.is_dir() and out.resolve() == source:
        raise ValueError(f"--output {out} is the model folder --model_name_or_path reads; export into another folder")
    found = held_model(out)
    if not found:
        return []
    try:
        own = json.loads((out / EXPORT_RECORD).read_text()).get("source") == str(source)
    except (OSError, ValueError, AttributeError):
        own = False
    if not (own or e.overwrite):
        raise ValueError(
            f"--output {out} holds another model ({found}); pass --overwrite true to replace it, or export elsewhere"
        )
    return [*out.glob("*.safetensors"), *out.glob("*.bin"), out / "model.safetensors.index.json"]


@command("export", "write a trained model in its family's original format or the native transformers format")
def export_main(argv: list[str]) -> None:
    from dtrpo.families import export_checkpoint

    (e,) = parse([ExportArgs], argv, "dtrpo export", COMMANDS["export"][1])
    require(e, "model_name_or_path", "output")
    stale = claim_export_folder(e)
    model, tokenizer, adapter = e.load()
    Path(e.output).mkdir(parents=True, exist_ok=True)  # the record first: an export killed mid-write is still ours
    (Path(e.output) / EXPORT_RECORD).write_text(
        json.dumps({"source": str(Path(e.model_name_or_path).resolve())}) + "\n"
    )
    for path in stale:
        path.unlink(missing_ok=True)
    path = export_checkpoint(model, tokenizer, adapter, e.output, e.format, e.code_from)
    print(f"wrote {adapter.family} model in {e.format} format to {path}")


@command("demo", "the whole loop on CPU: tiny model, SFT, eval, pairs, dTRPO, eval; table, JSON and plot")
def demo_main(argv: list[str]) -> None:
    from dtrpo.apps.demo import DemoArgs, format_table, run_demo

    (args,) = parse([DemoArgs], argv, "dtrpo demo", COMMANDS["demo"][1])
    report = run_demo(args)
    print()
    print(format_table(report))
    print(f"\ngain {report['gain']:+.3f}; stage seconds {report['seconds']}")
    print(f"report: {args.output_dir}/report.json   plot: {args.output_dir}/curves.png")


@command(
    "bench",
    "time a training step of each estimator side by side; `bench quality`: the quality study; "
    "`bench sampler`: decoding speed and accuracy beside autoregressive generate",
)
def bench_main(argv: list[str]) -> None:
    from dtrpo.apps.bench import BenchArgs, estimator_costs, estimator_statistics, grid_costs, sampler_throughput

    if argv[:1] == ["quality"]:
        from dtrpo.apps.quality import QualityArgs
        from dtrpo.apps.quality_study import run_study

        (args,) = parse([QualityArgs], argv[1:], "dtrpo bench quality", "every arm from one SFT checkpoint; report")
        run_study(args, argv[1:])
        return
    if argv[:1] == ["sampler"]:
        from dtrpo.apps.bench_sampler import BenchSamplerArgs, format_table, run_bench

        (args,) = parse([BenchSamplerArgs], argv[1:], "dtrpo bench sampler", "each decoding setting beside HF generate")
        report = run_bench(args)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(format_table(report))
        print(f"wrote {args.output}")
        return

    if argv[:1] == ["rounds"]:
        from dtrpo.apps.rounds import RoundsArgs, run_rounds_study

        (args,) = parse([RoundsArgs], argv[1:], "dtrpo bench rounds", "iterated dTRPO against RFT and one-shot arms")
        print(f"wrote {run_rounds_study(args)}")
        return

    (args,) = parse([BenchArgs], argv, "dtrpo bench", COMMANDS["bench"][1])
    if Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a folder; it names the JSON file to write")
    report = estimator_costs(args)
    report["statistics"] = estimator_statistics(args)
    report["sampler"] = sampler_throughput(args)
    report["block_grid"] = grid_costs(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    for name, row in report["estimators"].items():
        print(
            f"{name:<11} {row['seconds_per_pair'] * 1e3:9.1f} ms/pair  {row['forward_passes_per_pair']:4d} passes/pair"
            f"  x{list(row.values())[2]:.2f}"
        )
    for section, rows in report["statistics"].items():
        print(
            f"{section}: log-ratio over {args.draws} seeds (bias against the reference mean, with its standard error)"
        )
        for name, r in rows.items():
            print(
                f"  {name:<26} mean {r['mean']:9.4f}  std {r['std']:8.4f}  bias {r['bias']:+8.4f} +- {r['bias_se']:.4f}"
            )
    for name, r in report["sampler"].items():
        print(f"sampler {name:<10} {r['tokens_per_second']:8.0f} tokens/s  NFE {r['nfe']}  ({r['prompts']} prompts)")
    for name, r in report["block_grid"].items():
        print(
            f"packed dtrpo, {name:<13} {r['seconds_per_pair'] * 1e3:7.1f} ms/pair  {r['packed_columns']} columns"
            f"  x{r['ratio_to_response_grid']:.2f}"
        )
    print(f"wrote {args.output}")


@command("lm-eval", "lm-evaluation-harness with the `dtrpo` model registered: dtrpo lm-eval --model dtrpo ...")
def lm_eval_main(argv: list[str]) -> None:
    try:
        from dtrpo.harness import main
    except ImportError as e:
        raise SystemExit(f"error: dtrpo lm-eval needs lm-evaluation-harness: pip install lm-eval ({e})") from e
    main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dtrpo <command> [flags]   (dtrpo <command> --help for its flags)\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        raise SystemExit(f"error: unknown command {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    try:
        COMMANDS[name][0](rest)
    except (ValueError, OSError, ImportError) as err:  # bad input, a file error: a message, not a traceback
        if os.environ.get("DTRPO_DEBUG"):
            raise
        raise SystemExit(f"error: {err}") from None
    except Exception as err:  # noqa: BLE001 - DeepSpeed refuses a setting with an AssertionError or its own types
        engine = engine_failure(err)
        if engine is None or os.environ.get("DTRPO_DEBUG"):
            raise
        raise SystemExit(f"error: {engine}: {type(err).__name__}: {str(err).strip().splitlines()[0]}") from None


def engine_failure(err: BaseException) -> str | None:
    """The engine (DeepSpeed, FSDP) whose code raised `err`, read from the innermost frame of its traceback,
    or None when the error came from elsewhere (a bug of dtrpo's keeps its traceback)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename.replace(os.sep, "/") if tb is not None else ""
    for part, name in (("/deepspeed/", "DeepSpeed"), ("/torch/distributed/fsdp/", "FSDP")):
        if part in where:
            return name
    return None


if __name__ == "__main__":
    main()
