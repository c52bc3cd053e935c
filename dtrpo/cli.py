"""The `dtrpo` command line: one sub-command per job, each a thin `main` over library functions.

Flags are generated from the config dataclasses (one help line per field); `--config preset.yaml`
overrides their defaults, and flags given on the command line override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

COMMANDS = {}


def command(name: str, help: str):
    def register(fn):
        COMMANDS[name] = (fn, help)
        return fn

    return register


def load_preset(path: str | Path, dataclass_types) -> dict:
    """A YAML preset as a dict, refusing keys that no config dataclass has (with a close match)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: config preset {path} does not exist")
    preset = yaml.safe_load(path.read_text()) or {}
    if not isinstance(preset, dict):
        raise SystemExit(f"error: {path}: a preset is a mapping of field: value, got {type(preset).__name__}")
    known = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
    for key in preset:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SystemExit(f"error: {path}: unknown config key {key!r}{hint}")
    return preset


def parse(dataclass_types, argv: list[str], prog: str, description: str):
    """Dataclasses from `--config preset.yaml` plus command-line flags (flags win)."""
    names = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
    if "output_dir" in names and "output" not in names:  # `--output` is the short form of `--output_dir`
        argv = ["--output_dir" if a == "--output" else a.replace("--output=", "--output_dir=", 1) for a in argv]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description)
    parser.add_argument("--config", help="YAML preset whose keys override the defaults below.")
    if known.config:
        parser.set_defaults(**load_preset(known.config, dataclass_types))
    try:
        *parsed, _ = parser.parse_args_into_dataclasses(rest + (["--config", known.config] if known.config else []))
    except ValueError as err:  # a config __post_init__ names the flag
        raise SystemExit(f"error: {err}") from None
    return parsed


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


@command("init-tiny", "write the built-in tiny block-causal dLLM and its character tokenizer")
def init_tiny_main(argv: list[str]) -> None:
    from dtrpo.models import init_tiny

    (args,) = parse([TinyArgs], argv, "dtrpo init-tiny", COMMANDS["init-tiny"][1])
    require(args, "output_dir")
    path = init_tiny(args.output_dir, args.block_size, args.hidden_size, args.num_layers, args.seed)
    print(f"wrote tiny model to {path}")


@dataclass
class ModelArgs:
    model: str = field(
        default=None, metadata={"help": "Model folder: a dtrpo/transformers checkpoint or a family's own."}
    )
    family: str | None = field(default=None, metadata={"help": "Model family; default: detected from config.json."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 (GPU) or float16."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention backend: sdpa, or flex_attention on a GPU."}
    )

    def load(self):
        """(model, tokenizer, adapter) of `--model`, on the GPU when there is one."""
        import torch

        from dtrpo.families import load_model

        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        device = "cuda" if torch.cuda.is_available() else None
        return load_model(self.model, self.family, getattr(torch, self.dtype), self.attn_implementation, device=device)


@dataclass
class TrainScript(ModelArgs):
    data: str = field(default=None, metadata={"help": "Preference data: .jsonl, .json, .parquet or a datasets folder."})
    eval_data: str | None = field(default=None, metadata={"help": "Held-out preference data for evaluation."})
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank; 0 trains every weight. The reference is then the base model with adapters disabled."
        },
    )
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "LoRA target modules (native or the family's own names); default: every "
            "attention and MLP projection."
        },
    )


def resolve_resume(value: str | None, output_dir: str) -> str | bool | None:
    """`--resume_from_checkpoint last` (or true) resumes from the newest checkpoint in the output folder."""
    if value is None or value.lower() not in ("last", "true"):
        return value
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if last is None:
        raise SystemExit(f"error: --resume_from_checkpoint {value}: no checkpoint-* folder in {output_dir}")
    return last


def run_training(trainer, config, save=None) -> None:
    """Train (resuming when asked), save the final model into the output folder, print the metrics."""
    result = trainer.train(resume_from_checkpoint=resolve_resume(config.resume_from_checkpoint, config.output_dir))
    (save or (lambda t: t.save_model(config.output_dir)))(trainer)
    print(json.dumps(result.metrics, indent=2))
    print(f"saved model to {config.output_dir}")


@command("train", "preference-train a diffusion LM with dTRPO (or a baseline estimator)")
def train_main(argv: list[str]) -> None:
    from dtrpo.trainer import DTRPOConfig, DTRPOTrainer

    script, config = parse([TrainScript, DTRPOConfig], argv, "dtrpo train", COMMANDS["train"][1])
    require(script, "model", "data")
    require(config, "output_dir")
    model, tokenizer, adapter = script.load()
    save = None
    if script.lora_r:  # the adapters stay in the checkpoints; the output folder gets the merged model
        from dtrpo.families import export_checkpoint
        from dtrpo.lora import apply_lora, merge_lora

        model = apply_lora(
            model, adapter, script.lora_r, script.lora_alpha, script.lora_target_modules, script.lora_dropout
        )

        def save(t):
            export_checkpoint(merge_lora(t.model), tokenizer, adapter, config.output_dir, format="native")

    trainer = DTRPOTrainer(
        model=model,
        args=config,
        adapter=adapter,
        processing_class=tokenizer,
        train_dataset=script.data,
        eval_dataset=script.eval_data,
    )
    run_training(trainer, config, save)


@dataclass
class SFTScript(ModelArgs):
    data: str = field(default=None, metadata={"help": "Prompt/completion data: .jsonl, .json, .parquet or a folder."})
    eval_data: str | None = field(default=None, metadata={"help": "Held-out prompt/completion data."})


@command("sft", "supervised masked- or block-diffusion training (method.md section 7)")
def sft_main(argv: list[str]) -> None:
    from dtrpo.sft import DiffusionSFTConfig, DiffusionSFTTrainer

    script, config = parse([SFTScript, DiffusionSFTConfig], argv, "dtrpo sft", COMMANDS["sft"][1])
    require(script, "model", "data")
    require(config, "output_dir")
    model, tokenizer, adapter = script.load()
    trainer = DiffusionSFTTrainer(
        model=model,
        args=config,
        adapter=adapter,
        processing_class=tokenizer,
        train_dataset=script.data,
        eval_dataset=script.eval_data,
    )
    run_training(trainer, config)


@dataclass
class TaskArgs(ModelArgs):
    task: str = field(default="arithmetic", metadata={"help": "Built-in task (arithmetic:digits=3) or prompts file."})
    match: str | None = field(default=None, metadata={"help": "Prompts file answers: 'exact' or 'numeric' match."})
    reward: str | None = field(default=None, metadata={"help": "Reward function 'module:function' for a prompts file."})
    prompt_field: str = field(
        default="prompt", metadata={"help": "Field of a prompts file holding the prompt (GSM8K: question)."}
    )
    split: str | None = field(
        default=None,
        metadata={
            "help": "Split of the task's prompts: train or heldout (default: heldout for eval, train for pairs)."
        },
    )
    n: int | None = field(default=None, metadata={"help": "Number of prompts (default: the task's default / all)."})
    output: str = field(default=None, metadata={"help": "File to write (JSON report or JSONL)."})


def _load_for_task(t: TaskArgs):
    from dtrpo.tasks import load_task

    require(t, "model")
    task = load_task(t.task, match=t.match, reward=t.reward, prompt_field=t.prompt_field)
    model, tokenizer, adapter = t.load()
    return task, model, tokenizer, adapter


@command("eval", "accuracy on held-out prompts with a 95% interval, NFE and tokens/s; writes JSON")
def eval_main(argv: list[str]) -> None:
    from dtrpo.evaluate import SamplingArgs, evaluate

    t, s = parse([TaskArgs, SamplingArgs], argv, "dtrpo eval", COMMANDS["eval"][1])
    task, model, tokenizer, adapter = _load_for_task(t)
    rows = task.prompts(t.split or "heldout", t.n, seed=s.seed)
    report = evaluate(model, tokenizer, adapter, task, rows, s, desc="eval")
    print(
        f"{task.name}: accuracy {report['accuracy']:.3f} (95% CI {report['ci95'][0]:.3f}-{report['ci95'][1]:.3f},"
        f" n={report['n']}), {report['nfe_per_batch']:.0f} NFE/batch, {report['tokens_per_second']:.0f} tokens/s"
    )
    if t.output:
        Path(t.output).parent.mkdir(parents=True, exist_ok=True)
        Path(t.output).write_text(json.dumps(report, indent=2))
        print(f"wrote {t.output}")


@dataclass
class PairArgs:
    samples: int = field(default=8, metadata={"help": "Responses sampled per prompt."})
    pairing: str = field(default="best_worst", metadata={"help": "How pairs are formed: best_worst or all."})
    max_pairs_per_prompt: int | None = field(default=None, metadata={"help": "At most this many pairs per prompt."})


@command("pairs", "sample responses, score them with the task's verifier, write preference pairs (JSONL)")
def pairs_main(argv: list[str]) -> None:
    from dtrpo.evaluate import SamplingArgs
    from dtrpo.pairs import build_pairs, write_jsonl

    t, p, s = parse([TaskArgs, PairArgs, SamplingArgs], argv, "dtrpo pairs", COMMANDS["pairs"][1])
    require(t, "output")
    task, model, tokenizer, adapter = _load_for_task(t)
    rows = task.prompts(t.split or "train", t.n, seed=s.seed)
    pairs, stats = build_pairs(
        model,
        tokenizer,
        adapter,
        task,
        rows,
        p.samples,
        s,
        p.pairing,
        p.max_pairs_per_prompt,
        model_name=t.model,
        desc="pairs",
    )
    write_jsonl(pairs, t.output)
    print(json.dumps(stats, indent=2))
    print(f"wrote {len(pairs)} pairs to {t.output}")


@dataclass
class GenerateArgs(ModelArgs):
    prompt: list[str] = field(default=None, metadata={"help": "Prompt text(s) to complete."})
    use_cache: bool = field(default=True, metadata={"help": "KV cache over finished blocks (block-causal models)."})


@command("generate", "block-wise diffusion sampling from prompts; prints responses, NFE and tokens/s")
def generate_main(argv: list[str]) -> None:
    from dtrpo.evaluate import SamplingArgs, encode_prompt
    from dtrpo.sampler import generate

    g, s = parse([GenerateArgs, SamplingArgs], argv, "dtrpo generate", COMMANDS["generate"][1])
    require(g, "model", "prompt")
    model, tokenizer, adapter = g.load()
    model.eval()
    prompts = [encode_prompt(tokenizer, p, s.chat_template) for p in g.prompt]
    out = generate(
        adapter,
        model,
        prompts,
        s.gen_length,
        s.steps_per_block or adapter.block_size,
        s.remasking,
        s.threshold,
        s.temperature,
        seed=s.seed,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=g.use_cache,
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


@command("export", "write a trained model in its family's original format or the native transformers format")
def export_main(argv: list[str]) -> None:
    from dtrpo.families import export_checkpoint

    (e,) = parse([ExportArgs], argv, "dtrpo export", COMMANDS["export"][1])
    require(e, "model", "output")
    model, tokenizer, adapter = e.load()
    path = export_checkpoint(model, tokenizer, adapter, e.output, e.format, e.code_from)
    print(f"wrote {adapter.family} model in {e.format} format to {path}")


@command("demo", "the whole loop on CPU: tiny model, SFT, eval, pairs, dTRPO, eval; table, JSON and plot")
def demo_main(argv: list[str]) -> None:
    from dtrpo.demo import DemoArgs, format_table, run_demo

    (args,) = parse([DemoArgs], argv, "dtrpo demo", COMMANDS["demo"][1])
    report = run_demo(args)
    print()
    print(format_table(report))
    print(f"\ngain {report['gain']:+.3f}; stage seconds {report['seconds']}")
    print(f"report: {args.output_dir}/report.json   plot: {args.output_dir}/curves.png")


@command("bench", "time a training step of each estimator side by side; `bench quality`: the quality study")
def bench_main(argv: list[str]) -> None:
    from dtrpo.bench import BenchArgs, estimator_costs, estimator_statistics, sampler_throughput

    if argv[:1] == ["quality"]:
        from dtrpo.quality import QualityArgs, run_study

        (args,) = parse([QualityArgs], argv[1:], "dtrpo bench quality", "every arm from one SFT checkpoint; report")
        run_study(args, argv[1:])
        return

    (args,) = parse([BenchArgs], argv, "dtrpo bench", COMMANDS["bench"][1])
    report = estimator_costs(args)
    report["statistics"] = estimator_statistics(args)
    report["sampler"] = sampler_throughput(args)
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
    print(f"wrote {args.output}")


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
    except (ValueError, FileNotFoundError, ImportError) as err:  # bad input: a message, not a traceback
        if os.environ.get("DTRPO_DEBUG"):
            raise
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
