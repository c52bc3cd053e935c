"""The report of `dtrpo bench quality`: tables and plots from the per-run JSON results, as markdown.

Intervals: accuracy over seeds is pooled (n = held-out prompts x seeds) with a Wilson interval, the
seed-to-seed range shown beside it; a paired difference between two arms is averaged over the same
prompts and seeds, with a 95% bootstrap interval over prompts (resampled jointly for every seed).
"""

from __future__ import annotations

import json
import random
import shlex
import statistics
from pathlib import Path

from dtrpo.apps.quality import Job, QualityArgs, choose, diagnostics_path, grid, selected_arms, task_slug
from dtrpo.evaluate import interval95

CONTROLS = ("sft", "rft")
NOTES = "benchmarks_notes.md"  # the hand-written reading, next to the report, included verbatim


def load_runs(args: QualityArgs, task_index: int) -> dict:
    """{arm: {"chosen": (lr, beta), "grid": {(lr, beta): result}, "seeds": [result per seed]}} for finished arms."""
    out = {}
    for arm in selected_arms(args, task_index):
        tuning = {}
        for lr, beta in grid(args, arm):
            path = Job(task_index, arm.name, lr, beta, 0).path(args)
            if path.exists():
                tuning[(lr, beta)] = json.loads(path.read_text())
        chosen = choose(args, task_index, arm)
        if chosen is None:
            continue
        seeds = [tuning[chosen]]
        for seed in range(1, args.seeds):
            path = Job(task_index, arm.name, chosen[0], chosen[1], seed).path(args)
            if path.exists():
                seeds.append(json.loads(path.read_text()))
        out[arm.name] = {"chosen": chosen, "grid": tuning, "seeds": seeds}
    return out


def _bits(scores: str | list[float]) -> list[float]:
    """Per-prompt scores as stored: a string of 0/1 digits for a verifier, a list of floats for a reward."""
    return [float(c) for c in scores]


def point_at(result: dict, step: int | None = None, passes: float | None = None) -> dict | None:
    """The curve point at `step`, or the last one within `passes` forward passes."""
    if step is not None:
        return next((p for p in result["curve"] if p["step"] == step), None)
    within = [p for p in result["curve"] if p["forward_passes"] <= passes + 1e-6]
    return within[-1] if within else None


def pooled(points: list[dict]) -> dict:
    scores = [s for p in points for s in _bits(p["scores"])]
    accs = [p["accuracy"] for p in points]
    low, high = interval95(scores)
    return {"mean": sum(scores) / len(scores), "low": low, "high": high, "seeds": accs}


def paired(a: list[dict], b: list[dict], reps: int = 2000) -> dict:
    """Mean of a - b over the same prompts and seeds (seeds matched by position), with a 95% bootstrap
    interval over prompts."""
    n = min(len(a), len(b))
    xs = [_bits(p["scores"]) for p in a[:n]]
    ys = [_bits(p["scores"]) for p in b[:n]]
    m = len(xs[0])
    diffs = [sum(x[i] - y[i] for x, y in zip(xs, ys, strict=True)) / n for i in range(m)]  # per prompt
    rng = random.Random(0)
    boot = sorted(sum(diffs[rng.randrange(m)] for _ in range(m)) / m for _ in range(reps))
    return {
        "mean": sum(diffs) / m,
        "low": boot[int(0.025 * reps)],
        "high": boot[int(0.975 * reps) - 1],
        "per_seed": [sum(x) / m - sum(y) / m for x, y in zip(xs, ys, strict=True)],
    }


def fmt_interval(p: dict | None) -> str:
    if p is None:
        return "-"
    return f"{p['mean']:.3f} [{p['low']:.3f}, {p['high']:.3f}]"


def fmt_difference(p: dict | None) -> str:
    if p is None:
        return "-"
    seeds = ", ".join(f"{d:+.2f}" for d in p["per_seed"])
    return f"{p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}] ({seeds})"


def _pooled(points: list[dict] | None) -> dict | None:
    return pooled(points) if points else None


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def _history_change(result: dict, key: str) -> str:
    h = [r[key] for r in result["history"] if key in r]
    return f"{h[0]:.2f} -> {h[-1]:.2f}" if h else "-"


def task_section(args: QualityArgs, t: int, runs: dict, figures: Path) -> tuple[str, dict]:
    """The report's section of task `t`: its SFT start, the results table, the tuning and training tables, the
    figures; with the task's summary for summary.json."""
    spec = args.task_list()[t]
    slug = task_slug(spec)
    build = json.loads((Path(args.results_dir) / slug / "build.json").read_text())
    sft_scores = _bits(build["heldout_scores"])
    sft = {"mean": sum(sft_scores) / len(sft_scores), **dict(zip(("low", "high"), interval95(sft_scores), strict=True))}
    sft_steps = build["sft_curve"][-1]["step"] if build["sft_curve"] else "?"
    budget = args.steps * args.batch_size * 4  # dTRPO's forward passes (4 per pair) at the full step count
    summary = arm_summary(args, runs, budget)
    controls = [c for c in CONTROLS if c in summary]
    best = max(controls, key=lambda c: pooled(summary[c]["final"])["mean"]) if controls else None
    text = [
        f"## Task `{spec}`",
        "",
        f"SFT start: held-out **{sft['mean']:.3f}** [{sft['low']:.3f}, {sft['high']:.3f}] (n = {len(sft_scores)}), "
        f"validation {build['validation_accuracy']:.3f}, SFT stopped at step {sft_steps} "
        f"({build['sft_seconds']:.0f} s). Pairs: {build['pairs']['pairs']} from {build['pairs']['prompts']} prompts "
        f"x {args.samples} samples at temperature 1 (mean sample score {build['pairs']['mean_score']:.3f}).",
        "",
        "Held-out accuracy, mean over seeds with a Wilson interval pooled over seeds (n = held-out x seeds); the "
        "paired difference is per prompt and seed against the best control, with a bootstrap interval over prompts, "
        "per-seed differences in brackets.",
        "",
        *results_table(args, runs, summary, best, budget),
        "",
        f"![accuracy against steps and compute]({figures.name}/{slug}_accuracy.png)",
        "",
        *tuning_table(runs),
        "",
        *training_table(runs),
        "",
        f"![training curves, every grid point]({figures.name}/{slug}_training.png)",
        "",
    ]
    plot_accuracy(summary, sft["mean"], figures / f"{slug}_accuracy.png", spec)
    plot_training(runs, figures / f"{slug}_training.png", spec)
    return "\n".join(text), {"sft": sft, "best_control": best, "arms": summary}


def arm_summary(args: QualityArgs, runs: dict, budget: int) -> dict:
    """Each arm's last curve point per seed, its points at the full step count and at dTRPO's compute `budget`
    (None where a seed did not reach it), and its runs."""
    summary = {}
    for name, r in runs.items():
        seeds = r["seeds"]
        last = [s["curve"][-1] for s in seeds]
        same_step = [point_at(s, step=args.steps) for s in seeds]
        same_step = None if None in same_step else same_step
        compute = [point_at(s, passes=budget) for s in seeds]
        compute = None if None in compute else compute
        summary[name] = {"final": last, "equal_step": same_step, "equal_compute": compute, "runs": seeds}
    return summary


def results_table(args: QualityArgs, runs: dict, summary: dict, best: str | None, budget: int) -> list[str]:
    """One row per arm: its chosen rate, held-out accuracy at equal steps and equal compute, the paired difference
    to the best control (also stored in `summary` as diff_to_best_control)."""
    header = (
        "| arm | lr | beta | val. acc. (seed 0) | seeds | held-out at step "
        f"{args.steps} | held-out at dTRPO's compute ({budget} passes) | steps run | passes/step | "
        f"train s (seed 0) | paired diff. to {best or 'best control'} (final) |"
    )
    lines = [header, "|" + "---|" * 11]
    for name, s in summary.items():
        r = runs[name]
        seed0 = r["seeds"][0]
        diff = paired(s["final"], summary[best]["final"]) if best and name != best else None
        s["diff_to_best_control"] = diff
        lines.append(
            f"| {name} | {r['chosen'][0]:g} | {_g(r['chosen'][1])} "
            f"| {seed0['validation_accuracy']:.3f} | {len(s['final'])} | {fmt_interval(_pooled(s['equal_step']))} "
            f"| {fmt_interval(_pooled(s['equal_compute']))} | {seed0['steps']} "
            f"| {seed0['forward_passes_per_step']:.0f} "
            f"| {seed0['curve'][-1]['train_seconds']:.0f} | {fmt_difference(diff)} |"
        )
    return lines


def tuning_table(runs: dict) -> list[str]:
    """Seed 0's validation accuracy at every grid point of each arm."""
    text = [
        "### Tuning (seed 0, validation accuracy at the last step, per grid point lr / beta)",
        "",
        "| arm | validation accuracy |",
        "|---|---|",
    ]
    for name, r in runs.items():
        cells = [f"{lr:g} / {_g(beta)}: {res['validation_accuracy']:.3f}" for (lr, beta), res in r["grid"].items()]
        text.append(f"| {name} | " + "; ".join(cells) + " |")
    return text


def training_table(runs: dict) -> list[str]:
    """What happened in training at every grid point of the preference arms: margin, reward accuracy, the two
    log-probability estimates and the NLL, first -> last logged window."""
    text = [
        "### What happened in training (seed 0, every grid point; first -> last logged window of 10 steps)",
        "",
        "Log-probability estimates are each estimator's own (trajectory, ELBO or mean-field), so compare them within "
        "an arm; a collapse is both falling while the margin grows, and held-out accuracy falling with them.",
        "",
        "| arm | lr / beta | held-out (final) | reward margin | reward accuracy | log p chosen | log p rejected "
        "| rpo NLL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        for (lr, beta), res in r["grid"].items():
            if res["kind"] != "preference":
                continue
            text.append(
                f"| {name} | {lr:g} / {_g(beta)} | {res['curve'][-1]['accuracy']:.3f} "
                f"| {_history_change(res, 'rewards/margins')} | {_history_change(res, 'rewards/accuracies')} "
                f"| {_history_change(res, 'logps/chosen')} | {_history_change(res, 'logps/rejected')} "
                f"| {_history_change(res, 'rpo/nll')} |"
            )
    return text


def _mean_curve(runs: list[dict], key: str) -> tuple[list, list]:
    steps = [p["step"] for p in runs[0]["curve"]]
    xs = [statistics.mean(r["curve"][i][key] for r in runs) for i in range(len(steps))] if key != "step" else steps
    ys = [statistics.mean(r["curve"][i]["accuracy"] for r in runs) for i in range(len(steps))]
    return xs, ys


def plot_accuracy(summary: dict, sft: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for ax, key, label in zip(
        axes,
        ("step", "forward_passes", "train_seconds"),
        ("optimizer steps", "sequence forward passes", "training seconds (1 core)"),
        strict=True,
    ):
        for i, (name, s) in enumerate(summary.items()):
            xs, ys = _mean_curve(s["runs"], key)
            style = (
                "--" if name in CONTROLS else ("-." if name.startswith(("vrpo", "trajectory", "meanfield")) else "-")
            )
            ax.plot(xs, ys, style, marker="o", ms=3, label=name, color=plt.cm.tab20(i % 20))
        ax.axhline(sft, color="grey", lw=1, ls=":", label="SFT start")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (mean over seeds)")
        if key != "step":
            ax.set_xscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_training(runs: dict, path: Path, title: str) -> None:
    """One row per grid point of seed 0 (so the collapsed runs show beside the chosen ones): reward margin,
    chosen and rejected log-probability estimates, reward accuracy, held-out accuracy over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("rewards/margins", "logps/chosen", "logps/rejected", "rewards/accuracies")
    prefs = {n: r for n, r in runs.items() if r["seeds"][0]["kind"] == "preference"}
    points = list(dict.fromkeys(p for r in prefs.values() for p in r["grid"]))
    fig, grid_axes = plt.subplots(len(points), len(keys) + 1, figsize=(22, 4.2 * len(points)), squeeze=False)
    for axes, point in zip(grid_axes, points, strict=True):
        for i, (name, r) in enumerate(prefs.items()):
            if point not in r["grid"]:
                continue
            res, color = r["grid"][point], plt.cm.tab20(i % 20)
            h = res["history"]
            for ax, key in zip(axes, keys, strict=False):
                ax.plot([x["step"] for x in h if key in x], [x[key] for x in h if key in x], label=name, color=color)
                ax.set_title(f"{key}  (lr {point[0]:g}, beta {_g(point[1])})")
                ax.set_xlabel("step")
            xs, ys = _mean_curve([res], "step")
            axes[-1].plot(xs, ys, marker="o", ms=3, label=name, color=color)
        axes[1].set_yscale("symlog")
        axes[2].set_yscale("symlog")
        axes[-1].set_title(f"held-out accuracy  (lr {point[0]:g})")
        axes[-1].set_xlabel("step")
    grid_axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(title + " - seed 0, every grid point")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _ms(row: dict) -> str:
    return f"{row['seconds_per_draw'] * 1e3:.0f}"


def diagnostics_section(args: QualityArgs) -> str:
    paths = {part: diagnostics_path(args, part) for part in ("block_causal", "full_attention")}
    d = {part: json.loads(p.read_text()) for part, p in paths.items() if p.exists()}
    if "block_causal" not in d:
        return "## Estimator diagnostics\n\nNot run.\n"
    bc = d["block_causal"]
    text = [
        "## Estimator diagnostics (no training; the trainer's own `pair_losses`)",
        "",
        f"Task `{bc['task']}`; reference = the study's SFT checkpoint, policy = {bc['policy']}; {bc['pairs']} pairs, "
        f"{bc['draws']} draws per option. Exact = the trajectory estimator (every step of every block) averaged over "
        "the same number of reveal orders at the same T_B (VRPO and mean-field against T_B = B). Per sequence: "
        "|bias| = |mean of draws - exact mean| (averaged over sequences; `noise floor` is what noise alone gives), "
        "std = one draw's spread of the log-ratio; gradient cosine = cosine between one draw's loss gradient and "
        "the exact-trajectory gradient (mean over draws), and of the draws' mean gradient.",
        "",
        "| option | T_B | bias | abs. bias | noise floor | std of log-ratio | grad. cosine (one draw) "
        "| grad. cosine (mean) | ms / draw |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bc["rows"]:
        text.append(
            f"| {r['option']} | {r['T_B']} | {r['bias']:+.3f} | {r['abs_bias']:.3f} | {r['noise_floor']:.3f} | "
            f"{r['std']:.3f} | {r['grad_cosine']:.3f} | {r['grad_cosine_of_mean']:.3f} | {_ms(r)} |"
        )
    fa = d.get("full_attention")
    if fa is None:
        return "\n".join(text) + "\n\n## Full attention\n\nNot run.\n"
    text += [
        "",
        "## Full attention (the LLaDA layout)",
        "",
        f"A tiny model of the same size with full attention, trained by masked-diffusion SFT on the same teacher data "
        f"(held-out {fa['sft_heldout_accuracy']:.3f}); policy = it + 40 dTRPO steps with `mode=exact`. dTRPO at "
        f"T_B = B with each state-evaluation mode, {fa['draws']} draws on the same states (paired with `exact`):",
        "",
        "| mode | paired bias vs exact | paired abs. bias | std of log-ratio | grad. cosine to exact (one draw) "
        "| grad. cosine (mean) | ms / draw |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in fa["rows"]:
        text.append(
            f"| {r['mode']} | {r['paired_bias']:+.3f} | {r['paired_abs_bias']:.3f} | {r['std']:.3f} | "
            f"{r['grad_cosine']:.3f} | {r['grad_cosine_of_mean']:.3f} | {_ms(r)} |"
        )
    if fa.get("training"):
        text += [
            "",
            f"Training with each mode from that SFT model ({fa['sft_heldout_accuracy']:.3f}; one seed, lr 2e-4, "
            "beta 0.1, the study's pairs):",
            "",
            "| loss | mode | held-out | train s |",
            "|---|---|---|---|",
        ]
        for r in fa["training"]:
            text.append(
                f"| {r.get('loss', 'dTRPO')} | {r['mode']} | {r['heldout_accuracy']:.3f} (steps {r['steps']}) "
                f"| {r['train_seconds']:.0f} |"
            )
    return "\n".join(text) + "\n"


def write_report(args: QualityArgs) -> Path:
    report = Path(args.report)
    figures = report.parent / "figures"
    sections, summary = [], {}
    for t, spec in enumerate(args.task_list()):
        if not (Path(args.results_dir) / task_slug(spec) / "build.json").exists():
            continue
        runs = load_runs(args, t)
        if not runs:
            continue
        text, summary[spec] = task_section(args, t, runs, figures)
        sections.append(text)
    notes = report.parent / NOTES
    command = command_line("dtrpo bench quality", args, skip=("workers", "worker", "report_only", "threads"))
    origin = (
        "Generated by `dtrpo bench quality --workers 2` (runs only what `docs/results/quality/` lacks, then writes "
        "this page and `docs/figures/`)"
        if command == "dtrpo bench quality"
        else f"Generated by `{command}` (runs only what `{args.results_dir}` lacks, then writes "
        "this page and the figures beside it)"
    )
    head = [
        "# Benchmarks: does dTRPO help, against every alternative, at equal compute?",
        "",
        origin
        + (
            f"; the reading in the next section is hand-written in `docs/{NOTES}` and included here."
            if notes.exists()
            else "."
        ),
        "",
        f"Scale of this run: {len(args.task_list())} tasks; {args.seeds} seeds per arm (seed 0 tunes); "
        f"{args.steps} optimizer steps of {args.batch_size} pairs ({args.expensive_steps} for VRPO(8) and the "
        f"trajectory); grid lr {{{args.learning_rates}}} x beta {{{args.betas}}} for preference arms, lr "
        f"{{{args.control_learning_rates}}} for controls; held-out n = {args.heldout}, "
        f"validation n = {args.validation}; "
        f"tiny model {args.hidden_size} wide, {args.num_layers} layers, B = {args.block_size}; greedy decoding.",
        "",
        "",
    ]
    body = "\n".join(head) + (notes.read_text() + "\n" if notes.exists() else "") + "\n\n".join(sections)
    body += "\n" + diagnostics_section(args)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(body)
    (Path(args.results_dir) / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1))
    return report


def command_line(command: str, args, skip: tuple[str, ...] = ()) -> str:
    """`command` with the flags of `args` (a dataclass) that differ from their defaults, quoted for a shell;
    `skip` names settings of how it ran rather than what it measured."""
    from dataclasses import fields

    changed = [f.name for f in fields(args) if f.name not in skip and getattr(args, f.name) != f.default]
    return " ".join([command, *(f"--{name} {shlex.quote(str(getattr(args, name)))}" for name in changed)])


def _jsonable(summary: dict) -> dict:
    """The summary without the raw runs (they are in their own files)."""
    out = {}
    for spec, s in summary.items():
        arms = {}
        for name, a in s["arms"].items():
            arms[name] = {
                "final": pooled(a["final"]),
                "equal_step": a["equal_step"] and pooled(a["equal_step"]),
                "equal_compute": a["equal_compute"] and pooled(a["equal_compute"]),
                "diff_to_best_control": a.get("diff_to_best_control"),
                "lr": a["runs"][0]["lr"],
                "beta": a["runs"][0]["beta"],
            }
        out[spec] = {"sft": s["sft"], "best_control": s["best_control"], "arms": arms}
    return out
