"""The `dtrpo` command line: the command table and one thin `main` per sub-command, which parses its flags
(`dtrpo.options`), calls one library function and prints.

Flags are generated from the config dataclasses (one help line per field); `--config preset.yaml`
overrides their defaults, and flags given on the command line override the preset.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dtrpo.options import parse, require
from dtrpo.teardown import end_process, leave_process_group

COMMANDS = {}


def command(name: str, help: str):
    def register(fn):
        COMMANDS[name] = (fn, help)
        return fn

    return register


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
    from dtrpo.run import write_tiny

    (args,) = parse([TinyArgs], argv, "dtrpo init-tiny", COMMANDS["init-tiny"][1])
    require(args, "output_dir")
    path = write_tiny(args.output_dir, args.family, args.block_size, args.hidden_size, args.num_layers, args.seed)
    print(f"wrote tiny {args.family} model to {path}")


@command("train", "preference-train a diffusion LM with dTRPO (or a baseline estimator)")
def train_main(argv: list[str]) -> None:
    from dtrpo.run import TrainScript, train_from_script
    from dtrpo.trainer import DTRPOConfig, DTRPOTrainer

    script, config = parse([TrainScript, DTRPOConfig], argv, "dtrpo train", COMMANDS["train"][1])
    require(script, "model_name_or_path", "dataset_name")
    require(config, "output_dir")
    train_from_script(DTRPOTrainer, script, config)


@command("sft", "supervised masked- or block-diffusion training (method.md section 7)")
def sft_main(argv: list[str]) -> None:
    from dtrpo.run import SFTScript, train_from_script
    from dtrpo.sft import DiffusionSFTConfig, DiffusionSFTTrainer

    script, config = parse([SFTScript, DiffusionSFTConfig], argv, "dtrpo sft", COMMANDS["sft"][1])
    require(script, "model_name_or_path", "dataset_name")
    require(config, "output_dir")
    train_from_script(DiffusionSFTTrainer, script, config)


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
    from dtrpo.run import family_decoding, load_for_task
    from dtrpo.tasks import TaskArgs, stream_prompts

    t, s, c = parse([TaskArgs, SamplingArgs, CompareArgs], argv, "dtrpo eval", COMMANDS["eval"][1])
    if c.compare is not None:
        return compare_main(c.compare)
    t.check_output("items")
    task, model, tokenizer, adapter = load_for_task(t, s.block_size)
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
    from dtrpo.run import family_decoding, load_for_task
    from dtrpo.tasks import TaskArgs, stream_prompts

    t, p, s = parse([TaskArgs, PairArgs, SamplingArgs], argv, "dtrpo pairs", COMMANDS["pairs"][1])
    require(t, "output")
    t.check_output("samples")
    task, model, tokenizer, adapter = load_for_task(t, s.block_size)
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
    from dtrpo.tasks import TaskSpec
    from dtrpo.trainer import DTRPOConfig

    # --block_size, --steps_per_block (T_B: the estimator reduces the trajectory the sampler took), --seed
    # and --max_prompt_length are each one flag for the sampler and the trainer
    types = [TaskSpec, PairArgs, SamplingArgs, IterateArgs, DTRPOConfig]
    task, pairs, sampling, loop, train = parse(types, argv, "dtrpo iterate", COMMANDS["iterate"][1], shared=True)
    require(task, "model_name_or_path")
    iterate(IterateConfig(task, pairs, sampling, loop, train))


@command("generate", "block-wise diffusion sampling from prompts; prints responses, NFE and tokens/s")
def generate_main(argv: list[str]) -> None:
    from dtrpo.decoding import sampler_kwargs
    from dtrpo.evaluate import SamplingArgs, encode_prompts
    from dtrpo.run import GenerateArgs, family_decoding
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


@command("export", "write a trained model in its family's original format or the native transformers format")
def export_main(argv: list[str]) -> None:
    from dtrpo.run import ExportArgs, export_model

    (e,) = parse([ExportArgs], argv, "dtrpo export", COMMANDS["export"][1])
    require(e, "model_name_or_path", "output")
    family, path = export_model(e)
    print(f"wrote {family} model in {e.format} format to {path}")


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
    leave_process_group()


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


def entry() -> None:
    """The `dtrpo` program: `main` on the command line, then the end of the process (`teardown.end_process`: a
    rank of a multi-process launch leaves without the interpreter's finalization, which can abort a gloo rank)."""
    try:
        main()
    except SystemExit as stop:
        end_process(stop.code)
    end_process(0)


if __name__ == "__main__":
    entry()
