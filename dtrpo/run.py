"""Pieces of running a command, shared by the `dtrpo` sub-commands and usable without them: the option bundles of
`train`, `sft`, `generate` and `export`, training with resume, the run lock and the final save (a LoRA run's
merged), the export folder's checks, the family's decoding defaults. Each prints its one line as the command
would; none parses flags (`dtrpo.options`) or knows the command table (`dtrpo.cli`)."""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dtrpo.data import DataArgs
from dtrpo.families import ModelArgs
from dtrpo.lora import PeftArgs
from dtrpo.options import require
from dtrpo.tasks import TaskSpec

TINY_WRITERS = {"native": "dtrpo.models", "llada2": "dtrpo.families.llada2"}  # --family: the module's init_tiny


def held_model(folder: str | Path) -> str:
    """The files of a model or a run in `folder` (weights, config, tokenizer, checkpoints), named; "" if none."""
    from dtrpo.base import earlier_run

    found = earlier_run(folder)
    return ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")


def write_tiny(output_dir: str, family: str, block_size: int, hidden_size: int, num_layers: int, seed: int) -> Path:
    """The built-in tiny model of `family` written into a new or empty `output_dir` (`dtrpo init-tiny`)."""
    found = held_model(output_dir)
    if found:
        raise ValueError(f"--output_dir {output_dir} holds a model or a run ({found}); give a new or empty folder")
    if family not in TINY_WRITERS:
        raise ValueError(f"--family {family!r}: init-tiny writes one of {sorted(TINY_WRITERS)}")
    write = importlib.import_module(TINY_WRITERS[family]).init_tiny
    return write(output_dir, block_size, hidden_size, num_layers, seed)


@dataclass
class TrainScript(PeftArgs, DataArgs, ModelArgs):
    pass


@dataclass
class SFTScript(PeftArgs, DataArgs, ModelArgs):
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


def train_from_script(trainer_class, script: TrainScript | SFTScript, config) -> None:
    """Load the data and the model a script names, build `trainer_class` (dTRPO or diffusion SFT) with LoRA when
    asked, and train and save it (`run_training`; a LoRA run saves the merged model)."""
    train, test = script.datasets(getattr(config, "streaming", False))
    model, tokenizer, adapter = script.load(config.block_size)
    peft_config = script.peft_config()
    trainer = trainer_class(
        model=model,
        args=config,
        adapter=adapter,
        processing_class=tokenizer,
        train_dataset=train,
        eval_dataset=test,
        peft_config=peft_config,
    )
    run_training(trainer, config, merged_save(tokenizer, trainer.adapter, config) if peft_config else None)


def merged_save(tokenizer, adapter, config):
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


def family_decoding(s, family: str):
    """Sampler settings `s` with the family's decoding rule where no flag was given (`dtrpo.decoding`), and their
    one line printed (to stderr: stdout stays the command's output)."""
    from dtrpo.decoding import announce

    return announce(s, family, lambda line: print(line, file=sys.stderr))


def load_for_task(t: TaskSpec, block_size: int | None) -> tuple:
    """(task, model, tokenizer, adapter) of `--task` and `--model_name_or_path`; the task first, so that a bad
    task is named before a model is loaded."""
    require(t, "model_name_or_path")
    task = t.load_task()
    model, tokenizer, adapter = t.load(block_size)
    return task, model, tokenizer, adapter


@dataclass
class GenerateArgs(ModelArgs):
    prompt: list[str] = field(default=None, metadata={"help": "Prompt text(s) to complete."})
    use_cache: bool = field(default=True, metadata={"help": "false: the same as --cache none."})


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


def export_model(e: ExportArgs) -> tuple[str, Path]:
    """Export `--model_name_or_path` into `--output` in `--format` (`dtrpo export`): the folder claimed first, the
    record of the source written before any weight, stale weights of an earlier export removed. (family, path)."""
    from dtrpo.families import export_checkpoint

    stale = claim_export_folder(e)
    model, tokenizer, adapter = e.load()
    Path(e.output).mkdir(parents=True, exist_ok=True)  # the record first: an export killed mid-write is still ours
    (Path(e.output) / EXPORT_RECORD).write_text(
        json.dumps({"source": str(Path(e.model_name_or_path).resolve())}) + "\n"
    )
    for path in stale:
        path.unlink(missing_ok=True)
    return adapter.family, export_checkpoint(model, tokenizer, adapter, e.output, e.format, e.code_from)
