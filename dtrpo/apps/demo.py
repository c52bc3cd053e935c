"""`dtrpo demo`: the whole loop on a CPU, on the built-in tiny model and the noisy-teacher arithmetic task.

The default task is the one where preference signal should win (`tasks.NoisyArithmetic`): the SFT data
come from a teacher who forgets the carry in 60% of the carry problems, so SFT learns the error and
more SFT cannot remove it, while the SFT model's own samples still hold right answers for the verifier
to pick. The two controls run from the same checkpoint for as many steps: continued SFT on the same
data, and SFT on the chosen responses of the same pairs (rejection-sampling fine-tuning).

Stages, each writing its output into the run folder so any stage can be rerun alone with the CLI:

    model/            dtrpo init-tiny
    sft_data.jsonl    the teacher's worked answers to train-split problems
    sft/              dtrpo sft         (block-diffusion SFT to a middling accuracy)
    eval_sft.json     dtrpo eval        (held-out accuracy with a 95% interval)
    pairs.jsonl       dtrpo pairs       (the SFT model's own samples, scored by the verifier)
    dtrpo/            dtrpo train       (dTRPO on those pairs)
    eval_dtrpo.json   dtrpo eval
    sft_control/, rft/, eval_control.json, eval_rft.json    the two controls (--control true, the default)
    report.json, curves.png
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dtrpo.apps.training import StopAtAccuracy, demo_settings, train_args
from dtrpo.evaluate import SamplingArgs, evaluate
from dtrpo.families import load_model
from dtrpo.models import init_tiny
from dtrpo.pairs import build_pairs, write_jsonl
from dtrpo.tasks import demonstration, load_task


@dataclass
class DemoArgs:
    output_dir: str = field(default="runs/demo", metadata={"help": "Run folder; every stage's output is kept here."})
    quick: bool = field(default=False, metadata={"help": "A smaller run (about 3 minutes on 2 cores)."})
    task: str = field(
        default="noisy_arithmetic:digits=2",
        metadata={
            "help": "Built-in task spec or prompts file ('arithmetic:digits=2' with --sft_target 0.3: the old demo)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of every stage."})
    hidden_size: int = field(default=96, metadata={"help": "Width of the tiny model."})
    num_layers: int = field(default=3, metadata={"help": "Layers of the tiny model."})
    block_size: int = field(default=8, metadata={"help": "Block size of the tiny model."})
    sft_examples: int = field(default=3000, metadata={"help": "Train-split problems with worked answers for SFT."})
    sft_steps: int = field(default=1500, metadata={"help": "Most SFT optimizer steps."})
    sft_learning_rate: float = field(default=2e-3, metadata={"help": "SFT learning rate (constant after warm-up)."})
    sft_target: float = field(
        default=0.5,
        metadata={
            "help": "SFT stops once greedy accuracy on train-split validation prompts reaches this (the noisy "
            "teacher's own greedy ceiling is about 0.56)."
        },
    )
    sft_check_every: int = field(default=50, metadata={"help": "SFT steps between validation checks."})
    heldout: int = field(default=500, metadata={"help": "Held-out prompts evaluated before and after dTRPO."})
    pair_prompts: int = field(default=800, metadata={"help": "Train prompts sampled to build preference pairs."})
    samples: int = field(default=8, metadata={"help": "Samples per prompt for pairs."})
    dtrpo_steps: int = field(default=200, metadata={"help": "dTRPO optimizer steps (and the controls')."})
    beta: float = field(default=0.1, metadata={"help": "beta of the dTRPO loss."})
    learning_rate: float = field(
        default=1e-3,
        metadata={"help": "dTRPO learning rate (the studies' tuned rate for rpo_alpha 4: docs/benchmarks.md)."},
    )
    targets: str = field(
        default="all_masked_weighted", metadata={"help": "Positions read per state (docs/benchmarks.md)."}
    )
    rpo_alpha: float = field(
        default=4.0, metadata={"help": "Weight of the chosen response's NLL beside the dTRPO loss (0: pure dTRPO)."}
    )
    control: bool = field(
        default=True,
        metadata={
            "help": "Also run the controls from the same checkpoint for as many steps: continued SFT, and SFT on the "
            "chosen responses of the same pairs (rejection-sampling fine-tuning)."
        },
    )
    control_learning_rate: float = field(
        default=1e-3, metadata={"help": "Learning rate of the controls (the best of the study's grid for both)."}
    )

    def __post_init__(self) -> None:
        if self.quick:
            self.heldout, self.pair_prompts, self.dtrpo_steps, self.sft_target = 200, 300, 100, 0.4


STAGES = [
    ("SFT", "sft", "#999999"),
    ("SFT + dTRPO", "dtrpo", "#3b7dd8"),
    ("SFT continued (control)", "control", "#d8a03b"),
    ("SFT on chosen (RFT control)", "rft", "#5aa469"),
]


class Stopwatch:
    """Seconds of each stage, each counted from the end of the one before."""

    def __init__(self):
        self.seconds, self.start = {}, time.perf_counter()

    def lap(self, name: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self.start, 1)
        self.start = time.perf_counter()


def run_demo(a: DemoArgs, log=print) -> dict:
    """Every stage in order (see the module's docstring), each writing into `--output_dir`; the report."""
    run = Path(a.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    task = load_task(a.task)
    clock = Stopwatch()
    model, tok, adapter, greedy, stop = train_sft(a, task, run, log)
    clock.lap("sft")

    heldout = task.prompts("heldout", a.heldout, seed=a.seed)
    log(f"[2/5] evaluating the SFT model on {len(heldout)} held-out prompts")
    before = evaluate_into(run / "eval_sft.json", model, tok, adapter, task, heldout, greedy, "eval sft")
    clock.lap("eval_sft")

    pairs, pair_stats = sample_pairs(a, task, run, model, tok, adapter, greedy.gen_length, log)
    clock.lap("pairs")

    log(f"[4/5] dTRPO on {len(pairs)} pairs, {a.dtrpo_steps} steps")
    trainer = train_dtrpo(a, run, model, tok, adapter)
    clock.lap("dtrpo")

    log("[5/5] evaluating the dTRPO model")
    after = evaluate_into(run / "eval_dtrpo.json", model, tok, adapter, task, heldout, greedy, "eval dtrpo")
    clock.lap("eval_dtrpo")

    controls = run_controls(a, task, run, pairs, heldout, greedy, clock, log) if a.control else {}
    history = [h for h in trainer.state.log_history if "loss" in h]
    report = demo_report(a, before, after, controls, pair_stats, stop.curve, clock.seconds, history)
    (run / "report.json").write_text(json.dumps(report, indent=2))
    plot(report, run / "curves.png")
    return report


def train_sft(a: DemoArgs, task, run: Path, log=print) -> tuple:
    """Stage 1: the tiny model, the teacher's worked answers, block-diffusion SFT until the validation accuracy
    reaches `--sft_target`; saved to `run/sft`. (model, tokenizer, adapter, greedy sampling, the stopper)."""
    from dtrpo.sft import DiffusionSFTConfig, DiffusionSFTTrainer

    init_tiny(run / "model", a.block_size, a.hidden_size, a.num_layers, a.seed)
    sft_rows = task.prompts("train", a.sft_examples, seed=a.seed)
    sft_data = [{"prompt": r["prompt"], "completion": demonstration(r)} for r in sft_rows]
    write_jsonl(sft_data, run / "sft_data.jsonl")
    model, tok, adapter = load_model(run / "model")
    answer_len = len(tok(sft_rows[0]["answer"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
    gen_length = -(-answer_len // a.block_size) * a.block_size
    greedy = SamplingArgs(gen_length=gen_length, batch_size=100, seed=a.seed)
    validation = task.prompts("train", 100, seed=a.seed + 2)
    stop = StopAtAccuracy(
        lambda m: evaluate(m, tok, adapter, task, validation, greedy)["accuracy"], a.sft_check_every, a.sft_target
    )
    log(
        f"[1/5] SFT on {len(sft_rows)} worked answers until validation accuracy >= {a.sft_target}"
        f" (at most {a.sft_steps} steps)"
    )
    sft_args = train_args(
        DiffusionSFTConfig,
        run / "sft",
        a.sft_steps,
        a.sft_learning_rate,
        a.seed,
        32,
        "constant_with_warmup",
        **demo_settings(),
    )
    DiffusionSFTTrainer(
        model=model,
        args=sft_args,
        adapter=adapter,
        processing_class=tok,
        train_dataset=str(run / "sft_data.jsonl"),
        callbacks=[stop],
    ).train()
    model.save_pretrained(run / "sft")
    tok.save_pretrained(run / "sft")
    return model, tok, adapter, greedy, stop


def evaluate_into(path: Path, model, tok, adapter, task, rows: list, sampling: SamplingArgs, desc: str) -> dict:
    """The held-out report of `model`, also written to `path`."""
    report = evaluate(model, tok, adapter, task, rows, sampling, desc=desc)
    path.write_text(json.dumps(report, indent=2))
    return report


def sample_pairs(a: DemoArgs, task, run: Path, model, tok, adapter, gen_length: int, log=print) -> tuple:
    """Stage 3: the SFT model's own samples of train prompts, paired by the verifier into `run/pairs.jsonl`."""
    log(f"[3/5] sampling {a.samples} answers to {a.pair_prompts} train prompts and pairing them by the verifier")
    sampling = SamplingArgs(gen_length=gen_length, temperature=1.0, batch_size=200, seed=a.seed + 1)
    pair_rows = task.prompts("train", a.pair_prompts, seed=a.seed + 1)
    pairs, pair_stats = build_pairs(
        model, tok, adapter, task, pair_rows, a.samples, sampling, model_name=str(run / "sft"), desc="pairs"
    )
    write_jsonl(pairs, run / "pairs.jsonl")
    return pairs, pair_stats


def train_dtrpo(a: DemoArgs, run: Path, model, tok, adapter):
    """Stage 4: dTRPO on the pairs, from the SFT model (trained in place); saved to `run/dtrpo`. The trainer."""
    from dtrpo.trainer import DTRPOConfig, DTRPOTrainer

    args = train_args(
        DTRPOConfig,
        run / "dtrpo",
        a.dtrpo_steps,
        a.learning_rate,
        a.seed,
        16,
        "cosine",
        beta=a.beta,
        steps_per_block=a.block_size,
        targets=a.targets,
        rpo_alpha=a.rpo_alpha,
        **demo_settings(),
    )
    trainer = DTRPOTrainer(
        model=model, args=args, adapter=adapter, processing_class=tok, train_dataset=str(run / "pairs.jsonl")
    )
    trainer.train()
    trainer.save_model(run / "dtrpo")
    return trainer


def run_controls(a: DemoArgs, task, run: Path, pairs: list, heldout: list, greedy, clock: Stopwatch, log) -> dict:
    """The two controls from the same SFT checkpoint, as many steps as dTRPO: continued SFT on the same data, and
    SFT on the chosen responses of the pairs (rejection-sampling fine-tuning). Their held-out reports by name."""
    from dtrpo.sft import DiffusionSFTConfig, DiffusionSFTTrainer

    controls = {}
    write_jsonl([{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs], run / "chosen.jsonl")
    for key, data, what in (
        ("control", "sft_data.jsonl", "continuing SFT on the same data"),
        ("rft", "chosen.jsonl", "SFT on the chosen responses of the pairs (rejection-sampling FT)"),
    ):
        log(f"[control] {what}, from the same checkpoint, {a.dtrpo_steps} steps")
        model, tok, adapter = load_model(run / "sft")
        out = run / ("sft_control" if key == "control" else "rft")
        args = train_args(
            DiffusionSFTConfig, out, a.dtrpo_steps, a.control_learning_rate, a.seed, 16, "cosine", **demo_settings()
        )
        DiffusionSFTTrainer(
            model=model, args=args, adapter=adapter, processing_class=tok, train_dataset=str(run / data)
        ).train()
        model.save_pretrained(out)
        controls[key] = evaluate_into(
            run / f"eval_{key}.json", model, tok, adapter, task, heldout, greedy, f"eval {key}"
        )
        clock.lap(key)
    return controls


REPORTED = ("accuracy", "ci95", "n", "nfe_per_batch", "tokens_per_second")  # of each stage's held-out report


def demo_report(a: DemoArgs, before, after, controls, pair_stats, sft_curve, seconds, history) -> dict:
    """report.json: the settings, each stage's held-out accuracy, the gain of dTRPO over SFT, the pairs' counts,
    the SFT validation curve, the seconds of each stage and dTRPO's training log."""
    return {
        "settings": asdict(a),
        "sft": {k: before[k] for k in REPORTED},
        "dtrpo": {k: after[k] for k in REPORTED},
        "gain": after["accuracy"] - before["accuracy"],
        **{key: {k: r[k] for k in REPORTED} for key, r in controls.items()},
        "pairs": pair_stats,
        "sft_curve": sft_curve,
        "seconds": seconds,
        "history": history,
    }


def plot(report: dict, path: Path) -> None:
    """Training curves (loss, reward margin, reward accuracy) and held-out accuracy before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = report["history"]
    steps = [r["step"] for r in h]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, title in zip(
        axes,
        ["loss", "rewards/margins", "rewards/accuracies"],
        ["dTRPO loss", "reward margin", "reward accuracy"],
        strict=False,
    ):
        ax.plot(steps, [r.get(key, float("nan")) for r in h], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes[3]
    arms = [(n, report[k], c) for n, k, c in STAGES if report.get(k)]
    accs = [r["accuracy"] for _, r, _ in arms]
    errs = [[r["accuracy"] - r["ci95"][0] for _, r, _ in arms], [r["ci95"][1] - r["accuracy"] for _, r, _ in arms]]
    ax.bar([n.replace(" (", "\n(") for n, _, _ in arms], accs, yerr=errs, capsize=6, color=[c for _, _, c in arms])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"held-out accuracy (n={report['sft']['n']}, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(report: dict) -> str:
    rows = [("stage", "accuracy", "95% interval", "NFE/batch", "tokens/s")]
    for name, key, _ in STAGES:
        r = report.get(key)
        if r is None:
            continue
        rows.append(
            (
                name,
                f"{r['accuracy']:.3f}",
                f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]",
                f"{r['nfe_per_batch']:.0f}",
                f"{r['tokens_per_second']:.0f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
