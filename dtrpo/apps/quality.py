"""`dtrpo bench quality`: does preference optimization help, against every alternative, at equal compute?

A benchmark application of the library. For each task it builds one SFT checkpoint and one set of
verifier pairs (shared by every arm and seed), then trains every arm from that checkpoint with the
trainers' own loss code (`DTRPOTrainer`, `DiffusionSFTTrainer`):

- preference arms: dTRPO at T_B = B, B/2, B/4, 1, `all_masked_weighted`, with the `rpo_alpha` likelihood
  term, VRPO(n) for n = 1, 2, 4, 8, mean-field, the exact trajectory;
- controls: continued SFT on the SFT data, and SFT on the chosen responses (rejection-sampling FT).

Fair tuning: every preference arm gets the same learning-rate x beta grid and every control the same
learning-rate grid on seed 0, chosen by greedy accuracy on a validation split (train-split prompts used
neither for SFT nor for pairs); the chosen setting then runs on the other seeds. Held-out accuracy is
measured along training, with the optimizer steps, sequence forward passes and training seconds spent
so far, so arms compare at equal steps and at equal compute.

Every run writes its own JSON under `results_dir`, so an interrupted study resumes where it stopped.
This module holds the study's settings, arms, shared start and one run; `quality_diagnostics.py` and
`quality_report.py` build on it, and `quality_study.py` (`dtrpo bench quality`) drives all three: it runs
what is missing (`--workers 2`: two processes that claim runs in order), then the diagnostics, then
writes the report. Imports go one way: study -> report, diagnostics -> this module.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from dtrpo.apps.training import StopAtAccuracy, train_args
from dtrpo.evaluate import SamplingArgs, sample_texts
from dtrpo.families import load_model
from dtrpo.models import init_tiny
from dtrpo.pairs import build_pairs, write_jsonl
from dtrpo.tasks import demonstration, load_task, score_batch

LOG_KEYS = (
    "loss",
    "rewards/margins",
    "rewards/accuracies",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "rpo/nll",
    "learning_rate",
)


@dataclass
class QualityArgs:
    output_dir: str = field(default="runs/quality", metadata={"help": "Checkpoints and pairs (not committed)."})
    results_dir: str = field(default="docs/results/quality", metadata={"help": "One JSON per run (committed)."})
    report: str = field(default="docs/benchmarks.md", metadata={"help": "Markdown report to write."})
    tasks: str = field(
        default="noisy_arithmetic:digits=2;arithmetic:digits=2",
        metadata={"help": "Tasks, separated by ';' (a task spec may hold commas)."},
    )
    arms: str = field(
        default="all;dtrpo,dtrpo_amw,dtrpo_rpo,vrpo2,meanfield,sft,rft",
        metadata={"help": "Per task (';'-separated): comma-separated arm names, or 'all'."},
    )
    seeds: int = field(default=3, metadata={"help": "Seeds per arm (seed 0 also tunes)."})
    steps: int = field(default=100, metadata={"help": "Optimizer steps of every arm but the expensive ones."})
    expensive_steps: int = field(
        default=25, metadata={"help": "Optimizer steps of VRPO(8) and the trajectory estimator (2x dTRPO's compute)."}
    )
    eval_steps: str = field(
        default="50",
        metadata={
            "help": "Steps at which held-out accuracy is measured, besides the last step and the step at which the "
            "arm has spent the forward passes of dTRPO's full run (equal compute)."
        },
    )
    learning_rates: str = field(default="3e-5,2e-4", metadata={"help": "Learning-rate grid of the preference arms."})
    betas: str = field(default="0.1", metadata={"help": "Beta grid of the preference arms."})
    control_learning_rates: str = field(default="3e-5,2e-4,1e-3", metadata={"help": "Learning-rate grid of controls."})
    rpo_alpha: float = field(default=1.0, metadata={"help": "rpo_alpha of the arms with the likelihood term."})
    batch_size: int = field(default=16, metadata={"help": "Pairs (or SFT examples) per optimizer step."})
    heldout: int = field(default=500, metadata={"help": "Held-out prompts (the reported accuracy)."})
    validation: int = field(default=200, metadata={"help": "Validation prompts (train split, unseen) for tuning."})
    hidden_size: int = field(default=96, metadata={"help": "Width of the tiny model."})
    num_layers: int = field(default=3, metadata={"help": "Layers of the tiny model."})
    block_size: int = field(default=8, metadata={"help": "Block size B."})
    sft_examples: int = field(default=3000, metadata={"help": "Train-split problems with the teacher's answers."})
    sft_steps: str = field(default="2000;1500", metadata={"help": "Most SFT steps per task (';'-separated)."})
    sft_targets: str = field(
        default="1.0;0.3",
        metadata={"help": "Per task: SFT stops once validation accuracy reaches this (1.0: run all its steps)."},
    )
    pair_prompts: int = field(default=800, metadata={"help": "Train prompts sampled for pairs."})
    samples: int = field(default=8, metadata={"help": "Samples per prompt at temperature 1."})
    workers: int = field(default=1, metadata={"help": "Processes that claim runs in order (1 thread each)."})
    worker: int = field(default=-1, metadata={"help": "Internal: this process's worker index (-1: the launcher)."})
    threads: int = field(default=1, metadata={"help": "torch threads per worker."})
    diagnostics: str = field(
        default="block_causal,full_attention",
        metadata={"help": "Diagnostics to run after the first task's arms (see quality_diagnostics); '' for none."},
    )
    draws: int = field(default=32, metadata={"help": "Draws per estimator option in the diagnostics."})
    report_only: bool = field(default=False, metadata={"help": "Only aggregate existing results into the report."})

    def task_list(self) -> list[str]:
        return [t for t in self.tasks.split(";") if t]

    def per_task(self, text: str, cast) -> list:
        values = [cast(v) for v in text.split(";")]
        return [values[min(i, len(values) - 1)] for i in range(len(self.task_list()))]


# ----------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "preference" | "sft" | "rft"
    overrides: tuple = ()  # DTRPOConfig fields, as (key, value) pairs
    expensive: bool = False

    @property
    def config(self) -> dict:
        """The arm's DTRPOConfig fields: a preference arm starts from the paper's plain loss (newly unmasked
        targets, no likelihood term), pinned here so that the library's defaults never change an arm."""
        return {**(PLAIN if self.kind == "preference" else {}), **dict(self.overrides)}


PLAIN = {"targets": "newly_unmasked", "rpo_alpha": 0.0}


def arm_table(block_size: int, rpo_alpha: float) -> dict[str, Arm]:
    """Every arm of the study, by name (T_B values follow the block size: B, B/2, B/4, 1)."""
    arms = [Arm("dtrpo", "preference", (("steps_per_block", block_size),))]
    for t in dict.fromkeys((block_size // 2, block_size // 4, 1)):
        if t >= 1 and t != block_size:
            arms.append(Arm(f"dtrpo_T{t}", "preference", (("steps_per_block", t),)))
    arms += [
        Arm("dtrpo_amw", "preference", (("steps_per_block", block_size), ("targets", "all_masked_weighted"))),
        Arm("dtrpo_rpo", "preference", (("steps_per_block", block_size), ("rpo_alpha", rpo_alpha))),
        Arm(
            "dtrpo_amw_rpo",
            "preference",
            (("steps_per_block", block_size), ("targets", "all_masked_weighted"), ("rpo_alpha", rpo_alpha)),
        ),
        *[
            Arm(f"vrpo{n}", "preference", (("estimator", "vrpo"), ("vrpo_samples", n)), expensive=n >= 8)
            for n in (1, 2, 4, 8)
        ],
        Arm("meanfield", "preference", (("estimator", "meanfield"),)),
        Arm(
            "trajectory",
            "preference",
            (("estimator", "trajectory"), ("steps_per_block", block_size), ("trajectory_mode", "packed")),
            expensive=True,
        ),
        Arm("sft", "sft"),
        Arm("rft", "rft"),
    ]
    return {a.name: a for a in arms}


def passes_per_example(arm: Arm, block_size: int) -> int:
    """Sequence forward passes per pair (policy and reference, chosen and rejected) or per SFT example."""
    c = arm.config
    if arm.kind != "preference":
        return 1
    per_sequence = {"vrpo": c.get("vrpo_samples", 8), "trajectory": c.get("steps_per_block", block_size)}
    return 4 * per_sequence.get(c.get("estimator", "dtrpo"), 1)


def task_slug(spec: str) -> str:
    return spec.split(":")[0]


# ----------------------------------------------------------------------------- building the shared start


def stored_scores(scores: list[float]) -> str | list[float]:
    """Per-prompt scores as a string of 0/1 digits when every score is 0 or 1 (a verifier), else the list."""
    return "".join(str(int(s)) for s in scores) if set(scores) <= {0.0, 1.0} else [float(s) for s in scores]


def greedy_scores(model, tok, adapter, task, rows: list[dict], gen_length: int) -> list[float]:
    """Per-prompt 0/1 scores of greedy decoding (low-confidence remasking, one token per step)."""
    texts, _ = sample_texts(
        model, tok, adapter, [r["prompt"] for r in rows], SamplingArgs(gen_length, batch_size=100), 0
    )
    return score_batch(task, rows, texts)


@dataclass
class TaskData:
    spec: str
    root: Path
    task: object
    heldout: list[dict]
    validation: list[dict]
    gen_length: int


def task_data(args: QualityArgs, spec: str) -> TaskData:
    """The task's prompt sets: held-out (reported) and validation (train split, used neither for SFT nor pairs)."""
    task = load_task(spec)
    root = Path(args.output_dir) / task_slug(spec)
    used = {r["id"] for r in task.prompts("train", args.sft_examples, seed=0)}
    used |= {r["id"] for r in task.prompts("train", args.pair_prompts, seed=1)}
    pool = task.prompts("train", args.validation + len(used), seed=12345)
    validation = [r for r in pool if r["id"] not in used][: args.validation]
    answer_chars = len(task.prompts("train", 1)[0]["answer"]) + 1  # + EOS
    gen_length = -(-answer_chars // args.block_size) * args.block_size
    return TaskData(spec, root, task, task.prompts("heldout", args.heldout, seed=0), validation, gen_length)


def build(args: QualityArgs, index: int, log=print) -> Path:
    """SFT checkpoint, SFT data and verifier pairs of task `index`, made once (skipped when present)."""
    spec = args.task_list()[index]
    d = task_data(args, spec)
    done = d.root / "build.json"
    if done.exists():
        return done
    d.root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok, adapter, stop, sft_seconds = sft_to_target(args, index, d, log)
    log(f"[{spec}] sampling {args.samples} answers to {args.pair_prompts} prompts for pairs")
    sampling = SamplingArgs(gen_length=d.gen_length, temperature=1.0, batch_size=200, seed=1)
    pair_rows = d.task.prompts("train", args.pair_prompts, seed=1)
    pairs, pair_stats = build_pairs(model, tok, adapter, d.task, pair_rows, args.samples, sampling)
    write_jsonl(pairs, d.root / "pairs.jsonl")
    write_jsonl([{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs], d.root / "chosen.jsonl")
    heldout = greedy_scores(model, tok, adapter, d.task, d.heldout, d.gen_length)
    validation = greedy_scores(model, tok, adapter, d.task, d.validation, d.gen_length)
    info = {
        "task": spec,
        "sft_curve": stop.curve,
        "sft_seconds": sft_seconds,
        "pairs": pair_stats,
        "heldout_scores": stored_scores(heldout),
        "validation_accuracy": sum(validation) / len(validation),
    }
    results = Path(args.results_dir) / task_slug(spec)
    results.mkdir(parents=True, exist_ok=True)
    (results / "build.json").write_text(json.dumps(info, indent=1))
    done.write_text(json.dumps(info))
    return done


def sft_to_target(args: QualityArgs, index: int, d: TaskData, log=print) -> tuple:
    """The tiny model and the teacher's answers of task `index`, SFT until its validation target (or its step
    budget); saved to `<task>/sft`. (model, tokenizer, adapter, the stopper with its curve, the SFT's seconds)."""
    from dtrpo.sft import DiffusionSFTConfig, DiffusionSFTTrainer

    init_tiny(d.root / "model", args.block_size, args.hidden_size, args.num_layers, 0)
    sft_rows = d.task.prompts("train", args.sft_examples, seed=0)
    write_jsonl([{"prompt": r["prompt"], "completion": demonstration(r)} for r in sft_rows], d.root / "sft_data.jsonl")
    model, tok, adapter = load_model(d.root / "model")
    stop = StopAtAccuracy(
        lambda m: sum(greedy_scores(m, tok, adapter, d.task, d.validation, d.gen_length)) / len(d.validation),
        50 if args.per_task(args.sft_targets, float)[index] < 1 else 250,
        args.per_task(args.sft_targets, float)[index],
    )
    start = time.perf_counter()
    log(f"[{d.spec}] SFT on {len(sft_rows)} teacher answers")
    steps = args.per_task(args.sft_steps, int)[index]
    sft_args = train_args(DiffusionSFTConfig, d.root / "sft", steps, 2e-3, 0, 32, "constant_with_warmup")
    DiffusionSFTTrainer(
        model=model,
        args=sft_args,
        adapter=adapter,
        processing_class=tok,
        train_dataset=str(d.root / "sft_data.jsonl"),
        callbacks=[stop],
    ).train()
    model.save_pretrained(d.root / "sft")
    tok.save_pretrained(d.root / "sft")
    return model, tok, adapter, stop, time.perf_counter() - start


# ----------------------------------------------------------------------------- one run


class Curve(TrainerCallback):
    """Held-out accuracy at the given steps, with the training seconds spent so far (evaluation excluded)."""

    def __init__(self, evaluate, steps: list[int]):
        self.evaluate, self.steps, self.points = evaluate, set(steps), []
        self.start, self.eval_seconds = time.perf_counter(), 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            seconds = time.perf_counter() - self.start - self.eval_seconds
            t = time.perf_counter()
            scores = self.evaluate(model)
            model.train()
            self.eval_seconds += time.perf_counter() - t
            self.points.append(
                {
                    "step": state.global_step,
                    "train_seconds": seconds,
                    "accuracy": sum(scores) / len(scores),
                    "scores": "".join(str(int(s)) for s in scores),
                }
            )


@dataclass(frozen=True)
class Job:
    task_index: int
    arm: str
    lr: float
    beta: float | None
    seed: int

    def path_name(self) -> str:
        beta = "" if self.beta is None else f"_b{self.beta:g}"
        return f"lr{self.lr:g}{beta}_s{self.seed}"

    def path(self, args: QualityArgs) -> Path:
        return (
            Path(args.results_dir)
            / task_slug(args.task_list()[self.task_index])
            / self.arm
            / f"{self.path_name()}.json"
        )


def job_dir(d: TaskData, job: Job) -> Path:
    """The training folder of one job: its own, since workers run jobs of one arm side by side (the trainer
    locks its output folder)."""
    return d.root / "runs" / job.arm / job.path_name()


def run_job(args: QualityArgs, job: Job) -> dict:
    """Train one arm from the task's SFT checkpoint with the trainer's own loss; write and return its result."""
    d = task_data(args, args.task_list()[job.task_index])
    arm = arm_table(args.block_size, args.rpo_alpha)[job.arm]
    steps = args.expensive_steps if arm.expensive else args.steps
    model, tok, adapter = load_model(d.root / "sft")
    equal_compute = args.steps * 4 // passes_per_example(arm, adapter.block_size)  # dTRPO's full budget
    eval_at = sorted({s for s in (int(x) for x in args.eval_steps.split(",")) if s < steps} | {steps, equal_compute})
    eval_at = [s for s in eval_at if 0 < s <= steps]
    curve = Curve(lambda m: greedy_scores(m, tok, adapter, d.task, d.heldout, d.gen_length), eval_at)
    torch.manual_seed(job.seed)
    trainer = arm_trainer(args, d, arm, job, steps, model, tok, adapter, curve)
    trainer.train()
    history = [{k: h[k] for k in ("step", *LOG_KEYS) if k in h} for h in trainer.state.log_history if "loss" in h]
    passes_per_step = forward_passes_per_step(trainer, args.batch_size)
    for p in curve.points:
        p["forward_passes"] = p["step"] * passes_per_step
    validation = greedy_scores(model, tok, adapter, d.task, d.validation, d.gen_length)
    result = {
        "task": d.spec,
        "arm": job.arm,
        "kind": arm.kind,
        "config": arm.config,
        "lr": job.lr,
        "beta": job.beta,
        "seed": job.seed,
        "steps": steps,
        "batch_size": args.batch_size,
        "forward_passes_per_step": passes_per_step,
        "validation_accuracy": sum(validation) / len(validation),
        "curve": curve.points,
        "history": history,
    }
    path = job.path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def arm_trainer(args: QualityArgs, d: TaskData, arm: Arm, job: Job, steps: int, model, tok, adapter, curve):
    """The trainer of one job: dTRPO (or another estimator) on the pairs for a preference arm, SFT on the SFT data
    or on the chosen responses otherwise; in the job's own folder, `curve` evaluating as it goes."""
    from dtrpo.sft import DiffusionSFTConfig, DiffusionSFTTrainer
    from dtrpo.trainer import DTRPOConfig, DTRPOTrainer

    out = job_dir(d, job)
    if arm.kind == "preference":
        config = train_args(
            DTRPOConfig, out, steps, job.lr, job.seed, args.batch_size, "cosine", beta=job.beta, **arm.config
        )
        return DTRPOTrainer(
            model=model,
            args=config,
            adapter=adapter,
            processing_class=tok,
            train_dataset=str(d.root / "pairs.jsonl"),
            callbacks=[curve],
        )
    else:
        data = d.root / ("sft_data.jsonl" if arm.kind == "sft" else "chosen.jsonl")
        config = train_args(DiffusionSFTConfig, out, steps, job.lr, job.seed, args.batch_size, "cosine")
        return DiffusionSFTTrainer(
            model=model,
            args=config,
            adapter=adapter,
            processing_class=tok,
            train_dataset=str(data),
            callbacks=[curve],
        )


def forward_passes_per_step(trainer, batch_size: int) -> int:
    """Sequence forward passes per optimizer step: a pair counts policy and reference, chosen and rejected (as the
    estimator logged them); an SFT example counts one policy pass."""
    per_pair = next(
        (
            h["estimator/forward_passes_per_pair"]
            for h in trainer.state.log_history
            if "estimator/forward_passes_per_pair" in h
        ),
        None,
    )
    return batch_size * (per_pair if per_pair is not None else 1)


# ----------------------------------------------------------------------------- the study


def grid(args: QualityArgs, arm: Arm) -> list[tuple[float, float | None]]:
    if arm.kind == "preference":
        return [(float(lr), float(b)) for lr in args.learning_rates.split(",") for b in args.betas.split(",")]
    return [(float(lr), None) for lr in args.control_learning_rates.split(",")]


def selected_arms(args: QualityArgs, task_index: int = 0) -> list[Arm]:
    table = arm_table(args.block_size, args.rpo_alpha)
    names = args.per_task(args.arms, str)[task_index]
    if names == "all":
        return list(table.values())
    unknown = set(names.split(",")) - set(table)
    if unknown:
        raise ValueError(f"--arms: unknown arm(s) {sorted(unknown)}; known: {sorted(table)}")
    return [table[a] for a in names.split(",")]


def choose(args: QualityArgs, task_index: int, arm: Arm) -> tuple[float, float | None] | None:
    """The grid point with the best seed-0 validation accuracy (ties: the first in grid order); None until
    every grid point of the arm has a result."""
    results = []
    for lr, beta in grid(args, arm):
        path = Job(task_index, arm.name, lr, beta, 0).path(args)
        if not path.exists():
            return None
        results.append((json.loads(path.read_text())["validation_accuracy"], lr, beta))
    best = max(r[0] for r in results)
    return next((lr, beta) for acc, lr, beta in results if acc == best)


def jobs_in_order(args: QualityArgs) -> list[tuple]:
    """("tune", task, arm, (lr, beta)) for the seed-0 grid, then ("final", task, arm, seed) per later seed;
    the diagnostics after the first task's arms."""
    out = []
    for t in range(len(args.task_list())):
        for arm in selected_arms(args, t):
            out += [("tune", t, arm, point) for point in grid(args, arm)]
        for seed in range(1, args.seeds):
            out += [("final", t, arm, seed) for arm in selected_arms(args, t)]
        if t == 0:
            out += [("diagnostics", 0, None, part) for part in filter(None, args.diagnostics.split(","))]
    return out


def diagnostics_path(args: QualityArgs, part: str) -> Path:
    return Path(args.results_dir) / task_slug(args.task_list()[0]) / f"diagnostics_{part}.json"


def complete(args: QualityArgs, task_index: int) -> bool:
    """Whether every run (and, for the first task, every diagnostic) of a task has its result."""
    for arm in selected_arms(args, task_index):
        chosen = choose(args, task_index, arm)
        if chosen is None or not all(
            Job(task_index, arm.name, *chosen, s).path(args).exists() for s in range(args.seeds)
        ):
            return False
    parts = filter(None, args.diagnostics.split(",")) if task_index == 0 else ()
    return all(diagnostics_path(args, part).exists() for part in parts)
