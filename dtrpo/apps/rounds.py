"""`dtrpo bench rounds`: do rounds of on-policy pairs beat rejection-sampling FT and one-shot training?

A benchmark application of `dtrpo.iterate`. From one SFT checkpoint per task (built by the quality
study's `build`), every arm runs over seeds, each seed sampling its own pairs:

- `iter_rpo`: iterated dTRPO with the chosen response's likelihood term (`rpo_alpha`), the round's start
  model as reference; `iter_dtrpo`: the same without it; `iter_rft`: iterated SFT on the chosen responses;
- `iter_rpo_keep`, `iter_rft_keep` (not run by default): the iterated arms trained each round on every round's
  pairs so far (`keep_pairs`), so that a round's steps are not spent on its own few pairs alone;
- `once_rpo`, `once_rft`: one round on pairs sampled once from the SFT model, with the rounds' total
  prompts (so the same samples) and the rounds' total optimizer steps;
- `sft_more`: more SFT on the teacher's demonstrations (the SFT data), the rounds' total steps, no sampling:
  on a clean task the obvious alternative to any use of a verifier.

Every round of every arm samples the same number of prompts and answers and trains the same number of
steps, so arms compare at equal samples and steps; the forward passes (generation + training) are
counted as `iterate` counts them. Every arm gets the same tuning: seed 0 runs each rate of
`--learning_rates`, and the rate whose final model scores best on a validation split (train-split prompts
that neither the SFT nor any seed's rounds use) is the one every seed runs. One JSON per (arm, rate, seed)
in `results_dir` (a rerun skips those present; an interrupted arm resumes through `iterate`'s own resume),
then a markdown table with pooled intervals and paired differences (`quality_report.pooled` / `paired`).
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dtrpo.apps.quality import QualityArgs, build, greedy_scores, stored_scores, task_data, task_slug
from dtrpo.apps.quality_report import command_line, fmt_difference, fmt_interval, paired, pooled

# arm: (method, with the likelihood term, one-shot, training on every round's pairs so far)
ARMS = {
    "iter_rpo": ("dtrpo", True, False, False),
    "iter_dtrpo": ("dtrpo", False, False, False),
    "iter_rft": ("rft", False, False, False),
    "once_rpo": ("dtrpo", True, True, False),
    "once_rft": ("rft", False, True, False),
    "iter_rpo_keep": ("dtrpo", True, False, True),
    "iter_rft_keep": ("rft", False, False, True),
    "sft_more": ("sft", False, True, False),
}
DEFAULT_ARMS = ("iter_rpo", "iter_dtrpo", "iter_rft", "once_rpo", "once_rft", "sft_more")
SUBJECT = "iter_rpo"  # the arm the study asks about; every other arm is a control


@dataclass
class RoundsArgs:
    output_dir: str = field(default="runs/rounds", metadata={"help": "Checkpoints and round folders (not committed)."})
    results_dir: str = field(default="docs/results/rounds", metadata={"help": "One JSON per (arm, seed) (committed)."})
    report: str = field(default="docs/rounds.md", metadata={"help": "Markdown report to write."})
    task: str = field(
        default="noisy_arithmetic:digits=2",
        metadata={"help": "Built-in task: a verifier (0/1 scores) or a reward (partial credit, e.g. noisy_sort)."},
    )
    arms: str = field(default=",".join(DEFAULT_ARMS), metadata={"help": f"Comma-separated arms among {list(ARMS)}."})
    seeds: int = field(default=3, metadata={"help": "Seeds per arm; each samples its own pairs."})
    rounds: int = field(default=3, metadata={"help": "Rounds of the iterated arms."})
    prompts_per_round: int = field(default=400, metadata={"help": "Train prompts sampled per round."})
    samples: int = field(default=8, metadata={"help": "Samples per prompt at temperature 1."})
    steps: int = field(default=100, metadata={"help": "Optimizer steps per round."})
    batch_size: int = field(default=16, metadata={"help": "Pairs (or RFT examples) per optimizer step."})
    learning_rates: str = field(
        default="3e-5,2e-4,1e-3",
        metadata={
            "help": "Learning-rate grid, the same for every arm: seed 0 runs each rate, and the rate whose final model "
            "scores best on the validation split is the one every seed runs."
        },
    )
    beta: float = field(default=0.1, metadata={"help": "beta of the dTRPO arms."})
    rpo_alpha: float = field(default=1.0, metadata={"help": "rpo_alpha of the arms with the likelihood term."})
    heldout: int = field(default=500, metadata={"help": "Held-out prompts evaluated after every round."})
    validation: int = field(default=200, metadata={"help": "Validation prompts of the SFT stop (train split, unused)."})
    hidden_size: int = field(default=96, metadata={"help": "Width of the tiny model."})
    num_layers: int = field(default=3, metadata={"help": "Layers of the tiny model."})
    block_size: int = field(default=8, metadata={"help": "Block size B."})
    sft_examples: int = field(default=3000, metadata={"help": "Train-split problems with the teacher's answers."})
    sft_steps: int = field(default=2000, metadata={"help": "Most SFT steps."})
    sft_target: float = field(default=1.0, metadata={"help": "SFT stops at this validation accuracy (1.0: never)."})
    threads: int = field(default=1, metadata={"help": "torch threads."})

    def rates(self) -> list[float]:
        try:
            rates = [float(x) for x in self.learning_rates.split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"--learning_rates: a comma-separated list of numbers, got {self.learning_rates!r}"
            ) from None
        if not rates or not all(0 < r < float("inf") for r in rates):
            raise ValueError(f"--learning_rates: positive finite numbers, got {self.learning_rates!r}")
        return rates

    def arm_list(self) -> list[str]:
        names = [a for a in self.arms.split(",") if a]
        unknown = sorted(set(names) - set(ARMS))
        if unknown:
            raise ValueError(f"--arms: unknown arm(s) {unknown}; known: {list(ARMS)}")
        return names


def quality_args(args: RoundsArgs) -> QualityArgs:
    """The quality study's settings that build this study's SFT checkpoint (its pairs are not used here)."""
    return QualityArgs(
        output_dir=args.output_dir,
        results_dir=args.results_dir,
        tasks=args.task,
        heldout=args.heldout,
        validation=args.validation,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        block_size=args.block_size,
        sft_examples=args.sft_examples,
        sft_steps=str(args.sft_steps),
        sft_targets=str(args.sft_target),
        pair_prompts=args.prompts_per_round,
        samples=args.samples,
    )


def arm_config(args: RoundsArgs, arm: str, seed: int, lr: float, sft: Path, gen_length: int):
    """The `IterateConfig` of one arm and seed: every arm samples `prompts_per_round` prompts and trains `steps`
    steps per round; a one-shot arm does the rounds' total in one round."""
    from dtrpo.evaluate import SamplingArgs
    from dtrpo.iterate import IterateArgs, IterateConfig
    from dtrpo.pairs import PairArgs
    from dtrpo.tasks import TaskSpec
    from dtrpo.trainer import DTRPOConfig

    method, nll, once, keep = ARMS[arm]
    rounds, per_round, steps = (
        (1, args.rounds * args.prompts_per_round, args.rounds * args.steps)
        if once
        else (
            args.rounds,
            args.prompts_per_round,
            args.steps,
        )
    )
    train = DTRPOConfig(
        output_dir=str(Path(args.output_dir) / task_slug(args.task) / "arms" / arm / f"lr{lr:g}" / f"s{seed}"),
        max_steps=steps,
        learning_rate=lr,
        per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, steps // 10),
        beta=args.beta,
        rpo_alpha=args.rpo_alpha if nll else 0.0,
        steps_per_block=args.block_size,
        precompute_ref_log_probs=True,
        save_steps=max(steps // 4, 1),
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        max_prompt_length=64,
        max_completion_length=64,
        disable_tqdm=True,
        logging_steps=10,
        report_to=[],
    )
    return IterateConfig(
        TaskSpec(model_name_or_path=str(sft), task=args.task),
        PairArgs(samples=args.samples),
        SamplingArgs(
            gen_length=gen_length, temperature=1.0, batch_size=200, seed=seed, steps_per_block=args.block_size
        ),
        IterateArgs(
            rounds=rounds,
            prompts_per_round=per_round,
            method="rft" if method == "sft" else method,
            keep_pairs=keep,
            eval_n=args.heldout,
        ),
        train,
    )


def _scores(eval_path: Path) -> str | list[float]:
    """Every held-out item's score of one round, as the quality study stores them (0/1 digits or floats)."""
    return stored_scores([s["score"] for s in json.loads(eval_path.read_text())["samples"]])


def result_path(args: RoundsArgs, arm: str, seed: int, lr: float) -> Path:
    return Path(args.results_dir) / task_slug(args.task) / arm / f"lr{lr:g}" / f"s{seed}.json"


def validation_rows(args: RoundsArgs, d) -> list[dict]:
    """The tuning split: the quality study's validation prompts (train split, not in the SFT data) less every
    prompt that any seed's rounds sample, so that no arm has trained on the prompts that choose its rate."""
    from dtrpo.iterate import train_prompts

    used = {
        r["id"] for seed in range(args.seeds) for r in train_prompts(d.task, args.rounds * args.prompts_per_round, seed)
    }
    return [r for r in d.validation if r["id"] not in used]


def more_sft(config, sft: Path, data: Path, log) -> dict:
    """Arm `sft_more`: the rounds' total steps of SFT on the teacher's demonstrations from the SFT checkpoint,
    trained and evaluated by `iterate`'s own round stages (resumed as they resume)."""
    from dtrpo.iterate import Models, eval_stage, stage, train_on
    from dtrpo.tasks import load_task

    out = Path(config.train.output_dir)
    rd, task, models = out / "round-1", load_task(config.task.task), Models(config)
    start = eval_stage(config, task, out / "round-0", str(sft), models, "round 0 (the initial model)", log)
    n = sum(1 for _ in data.open())
    what = f"more SFT on the teacher's {n} demonstrations ({data.name})"
    train = stage(
        rd / "train.json",
        lambda: train_on(config, 1, rd, str(sft), models, [], log, data=data, n=n, what=what),
        log,
        "more SFT",
    )
    evaluation = eval_stage(config, task, rd, str(rd / "model"), models, "more SFT", log)
    row = {"round": 1, "model": str(rd / "model"), "pairs": 0, "mean_score": None, **train, **evaluation}
    return {
        "config": config.resolved(),
        "initial": start,
        "rounds": [{**row, "cumulative_passes": train["training_passes"]}],
    }


def run_arm(args: RoundsArgs, arm: str, seed: int, lr: float, d, log=print) -> dict:
    """One arm, rate and seed through `iterate` (or `more_sft`); its curve (round 0 = the SFT model) with every
    item's score, and its final model's accuracy on the validation split."""
    from dtrpo.families import load_model
    from dtrpo.iterate import iterate

    sft = d.root / "sft"
    config = arm_config(args, arm, seed, lr, sft, d.gen_length)
    out = Path(config.train.output_dir)
    done = sorted(out.parents[2].glob(f"*/*/s{seed}/round-0/eval.json"))  # the SFT model, as any arm evaluates it
    if done and not (out / "round-0").exists():
        (out / "round-0").mkdir(parents=True)
        shutil.copy(done[0], out / "round-0" / "eval.json")
    label = lambda line: log(f"[{arm} lr={lr:g} s{seed}] {line}")
    if ARMS[arm][0] == "sft":
        report = more_sft(config, sft, d.root / "sft_data.jsonl", label)
    else:
        report = iterate(config, log=label)
    start = {**report["initial"], "round": 0, "cumulative_passes": 0, "pairs": 0, "mean_score": None}
    curve = [
        {
            **{k: row[k] for k in ("round", "accuracy", "ci95", "cumulative_passes", "pairs", "mean_score")},
            "scores": _scores(out / f"round-{row['round']}" / "eval.json"),
        }
        for row in [start, *report["rounds"]]
    ]
    model, tok, adapter = load_model(report["rounds"][-1]["model"])
    rows = validation_rows(args, d)
    validation = greedy_scores(model, tok, adapter, d.task, rows, d.gen_length)
    result = {
        "task": args.task,
        "arm": arm,
        "seed": seed,
        "learning_rate": lr,
        "validation_accuracy": sum(validation) / len(validation),
        "validation_n": len(validation),
        "settings": report["config"],
        "curve": curve,
    }
    path = result_path(args, arm, seed, lr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def chosen_rate(args: RoundsArgs, arm: str) -> float | None:
    """The grid rate whose seed-0 run scores best on the validation split (ties: the first in grid order);
    None until every rate has its seed-0 result."""
    paths = [result_path(args, arm, 0, lr) for lr in args.rates()]
    if not all(p.exists() for p in paths):
        return None
    accuracy = [json.loads(p.read_text())["validation_accuracy"] for p in paths]
    return args.rates()[accuracy.index(max(accuracy))]


def run_rounds_study(args: RoundsArgs, log=print) -> Path:
    """Seed 0 of every arm at every rate, then the later seeds at each arm's chosen rate (each skipped when its
    result exists), then the report."""
    torch.set_num_threads(args.threads)
    arms, rates = args.arm_list(), args.rates()
    qargs = quality_args(args)
    build(qargs, 0, log)
    d = task_data(qargs, args.task)
    if not validation_rows(args, d):
        raise ValueError(
            f"{args.task}: no validation prompt is left once the rounds' prompts are set aside; raise --validation"
        )
    for arm in arms:
        for lr in rates:
            if not result_path(args, arm, 0, lr).exists():
                run_arm(args, arm, 0, lr, d, log)
    for seed in range(1, args.seeds):
        for arm in arms:
            lr = chosen_rate(args, arm)
            if not result_path(args, arm, seed, lr).exists():
                run_arm(args, arm, seed, lr, d, log)
    return write_rounds_report(args)


def write_rounds_report(args: RoundsArgs) -> Path:
    """The table of arms per round (accuracy pooled over seeds with its interval), the paired difference of every
    arm's final round to the best control, and the plot."""
    rates = {a: chosen_rate(args, a) for a in args.arm_list()}
    runs = {a: [json.loads(result_path(args, a, s, rates[a]).read_text()) for s in range(args.seeds)] for a in rates}
    final = {a: [r["curve"][-1] for r in rs] for a, rs in runs.items()}
    controls = [a for a in runs if a != SUBJECT]
    best = max(controls, key=lambda a: pooled(final[a])["mean"]) if controls else None
    width = max(len(r["curve"]) for rs in runs.values() for r in rs)
    lines = [
        "| arm | "
        + " | ".join(f"round {k}" for k in range(width))
        + f" | passes (final) | paired diff. to {best} | {SUBJECT} minus this arm |",
        "|---|" + "---|" * (width + 3),
    ]
    for arm, rs in runs.items():
        cells = []
        for k in range(width):
            points = [c[k] for c in (columns(arm, r, width) for r in rs) if k in c]
            cells.append(fmt_interval(pooled(points)) if len(points) == len(rs) else "")
        diff = paired(final[arm], final[best]) if best and arm != best else None
        passes = statistics.mean(p["cumulative_passes"] for p in final[arm])
        versus = paired(final[SUBJECT], final[arm]) if SUBJECT in final and arm != SUBJECT else None
        lines.append(
            f"| {arm} | "
            + " | ".join(cells)
            + f" | {passes:,.0f} | {fmt_difference(diff)} | {fmt_difference(versus)} |"
        )
    lines += ["", *round_inputs(runs, width), "", *tuning_table(args)]
    report = Path(args.report)
    figure = report.parent / "figures" / f"{report.stem}.png"  # one per report: two studies of a task never share it
    head = [
        f"# Rounds on `{args.task}`",
        "",
        f"Generated by `{command_line('dtrpo bench rounds', args)}`. Held-out accuracy (greedy) after each round, "
        "pooled over "
        f"{args.seeds} seed(s) (Wilson interval for 0/1 scores, normal otherwise; n = held-out x seeds); round 0 is "
        f"the SFT start. Every round samples "
        f"{args.prompts_per_round} prompts x {args.samples} answers and trains {args.steps} steps of "
        f"{args.batch_size}; a one-shot arm does {args.rounds} rounds' worth in one round. The paired difference is "
        "the final round's, per prompt and seed, with a bootstrap interval over prompts (per-seed in brackets), to the "
        f"best control and from the arm the study asks about ({SUBJECT}) to each other arm. "
        f"Learning rate per arm: the rate of {args.learning_rates} whose seed-0 run scores best on the validation "
        "split (train-split prompts that neither the SFT nor any round samples), the same grid for every arm; the "
        "rates and their validation accuracies are below the table. `sft_more` trains on the teacher's "
        "demonstrations (no sampling: its passes are training only).",
        "",
    ]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        "\n".join([*head, *lines, "", f"![accuracy against round and passes](figures/{figure.name})", ""])
    )
    plot_rounds(runs, figure, args.task)
    return report


def tuning_table(args: RoundsArgs) -> list[str]:
    """Each arm's seed-0 validation accuracy at every rate of the grid, the chosen one in bold."""
    rates = args.rates()
    lines = [
        "Validation accuracy of seed 0 at each learning rate (the chosen rate in bold):",
        "",
        "| arm | " + " | ".join(f"{lr:g}" for lr in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for arm in args.arm_list():
        chosen = chosen_rate(args, arm)
        cells = []
        for lr in rates:
            result = json.loads(result_path(args, arm, 0, lr).read_text())
            text = f"{result['validation_accuracy']:.3f} (n={result['validation_n']})"
            cells.append(f"**{text}**" if lr == chosen else text)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def round_inputs(runs: dict, width: int) -> list[str]:
    """What each round trained on, mean over seeds: pairs formed and the samples' mean score (the on-policy
    signal: as the model improves, fewer prompts have both a right and a wrong answer)."""
    lines = [
        "Pairs formed / samples' mean score per round (mean over seeds):",
        "",
        "| arm | " + " | ".join(f"round {k}" for k in range(1, width)) + " |",
        "|---|" + "---|" * (width - 1),
    ]
    for arm, rs in runs.items():
        cells = []
        for k in range(1, width):
            points = [c[k] for c in (columns(arm, r, width) for r in rs) if k in c]
            ok = len(points) == len(rs) and all(p["mean_score"] is not None for p in points)
            pairs = statistics.mean(p["pairs"] for p in points) if ok else None
            cells.append(f"{pairs:.0f} / {statistics.mean(p['mean_score'] for p in points):.3f}" if ok else "")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def columns(arm: str, result: dict, width: int) -> dict[int, dict]:
    """A run's curve points by round column: a one-shot arm's single round spends what `width - 1` rounds
    spend, so it stands in the last column."""
    curve = result["curve"]
    return {0: curve[0], width - 1: curve[-1]} if ARMS[arm][2] else dict(enumerate(curve))


def plot_rounds(runs: dict, path: Path, title: str) -> None:
    """Mean accuracy over seeds against round and against forward passes, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = max(len(r["curve"]) for rs in runs.values() for r in rs)
    for arm, rs in runs.items():
        points = [columns(arm, r, width) for r in rs]
        rounds = sorted(set.intersection(*(set(c) for c in points)))
        mean = [statistics.mean(c[k]["accuracy"] for c in points) for k in rounds]
        passes = [statistics.mean(c[k]["cumulative_passes"] for c in points) for k in rounds]
        style = "--" if ARMS[arm][2] else "-"
        axes[0].plot(rounds, mean, style, marker="o", label=arm)
        axes[1].plot(passes, mean, style, marker="o", label=arm)
    axes[0].set_xlabel("round")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_xlabel("sequence forward passes (generation + training)")
    for ax in axes:
        ax.set_ylabel("held-out accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
