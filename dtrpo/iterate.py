"""`dtrpo iterate`: rounds of on-policy preference training (or rejection-sampling FT) from one model.

Round r, in `<output_dir>/round-<r>/`, samples the current model on a slice of training prompts, scores
the samples with the task's verifier or reward and forms pairs (`pairs.run_pairs`: `pairs.jsonl` and
`pairs.samples.jsonl`), trains from the current model (`DTRPOTrainer`; for `method=rft`,
`DiffusionSFTTrainer` on the pairs' chosen responses, same steps) into `model/`, and evaluates it on the
held-out split (`evaluate.run_eval`: `eval.json`). The reference of round r is the model that started it
(`reference=previous`, as iterative RPO, Pang et al. 2024), or the initial model (`initial`);
`round-0/eval.json` is the initial model's evaluation.

Each stage writes its result into a small JSON file, atomically, once it is finished. A rerun reads the
finished stages and resumes the stage a kill interrupted by that stage's own resume: the sampler's
chunks, the trainer's newest complete checkpoint (`save_steps` sets how often there is one), the
evaluation's chunks. The resolved settings are kept in `iterate_config.json`; a rerun with other settings
is refused with them named, except `rounds`, which may grow to extend a run. One process only (no
torchrun); no LoRA.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from transformers import TrainerCallback

from dtrpo.base import LOCK_FILE, RESUME_FREE, RunFinished, claim_output_dir, earlier_run, last_checkpoint
from dtrpo.evaluate import SamplingArgs, run_eval
from dtrpo.locks import hold
from dtrpo.pairs import PairArgs, run_pairs
from dtrpo.reward_model import reward_record
from dtrpo.tasks import TaskSpec, stream_prompts
from dtrpo.trainer import DTRPOConfig

CONFIG_FILE = "iterate_config.json"
ROUND_SEED_STRIDE = 1_000_000  # round r samples with seed + r * stride: its chunks' seeds never meet another round's
# settings a resumed run may change: the rounds (to extend it), and those that change no result
FREE = {"loop.rounds", "task.reward_timeout"} | {f"train.{k}" for k in RESUME_FREE}


@dataclass
class IterateArgs:
    """The loop's own settings; the task, pairs, sampler and training settings are those of `dtrpo pairs` and
    `dtrpo train`."""

    rounds: int = field(
        default=3,
        metadata={"help": "Rounds of sample, pair, train, evaluate; a rerun may raise it to extend a finished run."},
    )
    prompts_per_round: int = field(
        default=256,
        metadata={
            "help": "Train-split prompts sampled per round: a fresh slice each round while the split lasts, then "
            "the same slices again (the log says which)."
        },
    )
    method: Literal["dtrpo", "rft"] = field(
        default="dtrpo",
        metadata={
            "help": "dtrpo: preference training on the round's pairs; rft: SFT on their chosen responses "
            "(rejection-sampling FT) with the same steps and training settings."
        },
    )
    reference: Literal["previous", "initial"] = field(
        default="previous",
        metadata={"help": "Reference of round r: the model that started the round (previous) or the initial model."},
    )
    keep_pairs: bool = field(
        default=False, metadata={"help": "Train each round on the pairs of every round so far, not its own only."}
    )
    eval_n: int = field(default=500, metadata={"help": "Prompts evaluated after every round (the same each round)."})
    eval_split: Literal["train", "heldout"] = field(default="heldout", metadata={"help": "Split evaluated on."})
    eval_temperature: float = field(
        default=0.0,
        metadata={"help": "Temperature of the evaluation (0: greedy); its other sampler settings: the pairs'."},
    )

    def __post_init__(self) -> None:
        if not math.isfinite(self.eval_temperature) or self.eval_temperature < 0:
            raise ValueError(f"--eval_temperature must be a finite number, 0 or more, got {self.eval_temperature}")
        for name in ("rounds", "prompts_per_round", "eval_n"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        choices = {"method": ("dtrpo", "rft"), "reference": ("previous", "initial"), "eval_split": ("train", "heldout")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")


@dataclass
class IterateConfig:
    """Everything a run reads: the model and task (`dtrpo pairs`' flags), pairing, sampling, the loop, and
    every `dtrpo train` option (`train.output_dir` is the run folder)."""

    task: TaskSpec
    pairs: PairArgs
    sampling: SamplingArgs
    loop: IterateArgs
    train: DTRPOConfig

    def resolved(self) -> dict:
        """The settings as JSON values, by section (what `iterate_config.json` holds)."""
        sections = {k: asdict(getattr(self, k)) for k in ("task", "pairs", "sampling", "loop")}
        return json.loads(json.dumps({**sections, "train": json.loads(self.train.to_json_string())}))


# ----------------------------------------------------------------------------- files and stages


def _write_json(path: Path, obj: dict) -> None:
    """`obj` as JSON at `path`, whole or not at all (a kill leaves the old file or none)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


REDO = "delete it to redo that stage"


def read_stage(path: Path, keys: tuple[str, ...], fix: str = REDO) -> dict:
    """A stage file's JSON object, holding `keys`; a damaged one (cut, edited, not an object) is one error
    naming the file and `fix`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a JSON object; {fix}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{path}: has no {', '.join(missing)}; {fix}")
    return data


PAIRS_KEYS = ("prompts_from", "prompts", "pairs", "mean_score", "generation_passes", "seconds")
TRAIN_KEYS = ("trained", "training_passes", "steps", "seconds")
EVAL_KEYS = ("accuracy", "ci95", "n", "nfe_per_batch", "seconds")


def stage(path: Path, run: Callable[[], dict], log, what: str, keys: tuple[str, ...] = ()) -> dict:
    """A finished stage's result read from `path` (it must hold `keys`), or `run()` timed and written there
    once it returns."""
    if path.is_file():
        log(f"{what}: done earlier ({path})")
        return read_stage(path, keys)
    start = time.perf_counter()
    result = {**run(), "seconds": time.perf_counter() - start}
    _write_json(path, result)
    return result


def claim_run(out: Path, config: IterateConfig, task, log) -> None:
    """Store the settings (and the prompts file's content digest) in a new run folder; in a folder holding a
    run, refuse other settings (naming each flag that differs) or an edited prompts file unless
    `overwrite_output_dir`, which deletes that run first. A folder holding a `train` run is refused too. A
    reward model's record (its weights' fingerprint) is kept and checked with the settings, so another reward
    model at the same path is refused too."""
    scorer = reward_record(task)
    path, content = out / CONFIG_FILE, getattr(task, "content", None)
    now = {**config.resolved(), **({"scorer": scorer} if scorer else {})}
    if path.is_file() and config.train.overwrite_output_dir:
        log(f"overwrite_output_dir: deleting the earlier run in {out}")
        for old in [*out.glob("round-*"), path, out / "report.json", out / "rounds.png"]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    found = [p.name for p in earlier_run(out)]
    if found and not path.is_file() and not config.train.overwrite_output_dir:
        raise ValueError(
            f"--output_dir {out} holds a training run or a model ({', '.join(found[:4])}), not an iterate run; "
            "choose another --output_dir, or pass --overwrite_output_dir true to delete it"
        )
    if found and not path.is_file():
        claim_output_dir(config.train)  # deletes that run's checkpoints and files
    if path.is_file():
        fix = "restore it, or pass --overwrite_output_dir true to start afresh"
        before = read_stage(path, ("loop",), fix)
        for s in now:
            if not isinstance(before.get(s, {}), dict):
                raise ValueError(f"{path}: section {s!r} is a {type(before[s]).__name__}, not an object; {fix}")
        differ = [
            f"--{key} ({before.get(s, {}).get(key)!r} then, {now[s].get(key)!r} now)"
            for s in now
            for key in sorted(set(now[s]) | set(before.get(s, {})))
            if f"{s}.{key}" not in FREE and before.get(s, {}).get(key) != now[s].get(key)
        ]
        if differ:
            raise ValueError(
                f"--output_dir {out} holds an iterate run with other settings: {'; '.join(differ)}. Rerun with its "
                "settings (only --rounds may change, to extend it), pass --overwrite_output_dir true to start "
                "afresh, or choose another --output_dir"
            )
        if before.get("task_content", content) != content:
            raise ValueError(
                f"--task {config.task.task}: the prompts file was edited since the run in {out} started (content "
                f"{before['task_content']} then, {content} now): its rounds would sample, train and evaluate on "
                "other prompts or answers. Restore the file, pass --overwrite_output_dir true to start afresh, or "
                "choose another --output_dir"
            )
        log(f"resuming the run in {out} ({before['loop'].get('rounds')} rounds planned then, {config.loop.rounds} now)")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, {**now, "task_content": content})


# ----------------------------------------------------------------------------- prompts


def train_prompts(task, n: int, seed: int) -> list[dict]:
    """The first `n` prompts of the task's train split in a fixed order, or all of them when it holds fewer:
    a prompts file in file order; a built-in task as `prompts` draws them for `seed`, whose first n rows
    are the same whatever larger n is asked."""
    stream = getattr(task, "stream", None)
    if stream is not None:
        return list(itertools.islice(stream("train"), n))
    try:
        return task.prompts("train", n, seed)
    except ValueError:  # a built-in split holds fewer distinct problems: the largest count it can give
        low, high = 0, n - 1
        while low < high:
            mid = (low + high + 1) // 2
            try:
                task.prompts("train", mid, seed)
                low = mid
            except ValueError:
                high = mid - 1
        return task.prompts("train", low, seed) if low else []


def round_prompts(task, r: int, per_round: int, seed: int) -> tuple[list[dict], str]:
    """Round r's prompts (r from 1) and what they are: slice r of the train split while it lasts, then the
    full slices again in turn (re-sampled by the current model)."""
    pool = train_prompts(task, r * per_round, seed)
    if len(pool) == r * per_round:
        return pool[-per_round:], f"fresh (prompts {(r - 1) * per_round + 1}-{r * per_round} of the train split)"
    if not pool:
        raise ValueError(f"{task.name}: the train split holds no prompts to sample")
    slices = max(len(pool) // per_round, 1)
    k = (r - 1) % slices
    rows = pool[k * per_round : (k + 1) * per_round]
    return rows, f"re-sampled (prompts {k * per_round + 1}-{k * per_round + len(rows)}; the split holds {len(pool)})"


# ----------------------------------------------------------------------------- models


class Models:
    """The model in memory and the folder its weights equal: sampling leaves it as it is, training moves it to
    the round's output, so an uninterrupted run loads each model once and a resumed one reads it from disk."""

    def __init__(self, config: IterateConfig):
        self.config, self.path, self.loaded = config, None, None

    def load(self, path: str | Path):
        """(model, tokenizer, adapter) of a folder, loaded afresh (the initial model's `--family` applies to it
        only: a round's model is saved in the native format)."""
        spec = self.config.task
        family = spec.family if str(path) == spec.model_name_or_path else None
        return replace(spec, model_name_or_path=str(path), family=family).load(self.config.sampling.block_size)

    def get(self, path: str | Path):
        if self.path != str(path):
            self.loaded = None  # the old one freed before the next loads
            self.loaded, self.path = self.load(path), str(path)
        return self.loaded

    def moved(self, path: str | Path) -> None:
        self.path = str(path)


# ----------------------------------------------------------------------------- the stages of a round


def pairs_stage(config: IterateConfig, task, r: int, rd: Path, start: str, models: Models, log) -> dict:
    loop, p = config.loop, config.pairs
    rows, which = round_prompts(task, r, loop.prompts_per_round, config.sampling.seed)
    log(f"round {r}: sampling {p.samples} answers to each of {len(rows)} {which} train prompts")
    model, tokenizer, adapter = models.get(start)
    sampling = replace(config.sampling, seed=config.sampling.seed + r * ROUND_SEED_STRIDE)
    stats = run_pairs(
        model,
        tokenizer,
        adapter,
        task,
        rows,
        p,
        sampling,
        model_name=start,
        output=rd / "pairs.jsonl",
        desc=f"round {r} samples",
    )
    log(
        f"round {r}: {stats['pairs']} pairs from {stats['prompts']} prompts ({stats['ties_dropped']} ties dropped), "
        f"samples' mean score {stats['mean_score']:.3f}"
    )
    return {**stats, "prompts_from": which}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_data(config: IterateConfig, r: int, rd: Path) -> tuple[Path, int]:
    """The file round r trains on and its rows: its own pairs (or every round's with `keep_pairs`), as pairs
    for dTRPO or as their chosen responses for RFT."""
    rounds = range(1, r + 1) if config.loop.keep_pairs else [r]
    pairs = [row for k in rounds for row in _read_jsonl(rd.parent / f"round-{k}" / "pairs.jsonl")]
    if config.loop.method == "rft":
        rows, path = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs], rd / "chosen.jsonl"
    elif config.loop.keep_pairs:
        rows, path = pairs, rd / "train_pairs.jsonl"
    else:
        return rd / "pairs.jsonl", len(pairs)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)
    return path, len(rows)


def round_args(config: IterateConfig, r: int, out: Path, fresh: bool):
    """Round r's training arguments: every `dtrpo train` setting, the round's output folder and seed, the
    reference scores beside the round's data; for RFT, the same settings as a `DiffusionSFTConfig`."""
    from dtrpo.sft import DiffusionSFTConfig

    changes = {"output_dir": str(out), "seed": config.train.seed + r - 1, "overwrite_output_dir": fresh}
    if config.loop.method == "dtrpo":
        return replace(config.train, ref_log_probs_file=None, resume_from_checkpoint=None, **changes)
    common = {f.name for f in fields(DiffusionSFTConfig) if f.init} & {f.name for f in fields(DTRPOConfig) if f.init}
    kept = {name: getattr(config.train, name) for name in common - set(changes) - {"resume_from_checkpoint"}}
    return DiffusionSFTConfig(**kept, **changes)


def examples_seen(n: int, steps: int, batch: int, accumulation: int = 1, drop_last: bool = False) -> int:
    """Examples that `steps` optimizer steps read from `n`, `batch` per forward batch (all processes together)
    and `accumulation` batches per step, epoch after epoch; an epoch's last batch and step may be short.

    n=20, batch=8, accumulation=1, 4 steps: batches 8, 8, 4 per epoch, so 8 + 8 + 4 + 8 = 28.
    """
    sizes = [min(batch, n - i) for i in range(0, n, batch) if not (drop_last and n - i < batch)]
    per_step = [sum(sizes[i : i + accumulation]) for i in range(0, len(sizes), accumulation)]
    if not per_step:
        return 0
    epochs, rest = divmod(steps, len(per_step))
    return epochs * sum(per_step) + sum(per_step[:rest])


class LogLastStep(TrainerCallback):
    """Logs the last step whatever `logging_steps` is, so the run's metrics (the estimator's forward passes per
    pair among them) are in the log history."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


def training_passes(trainer, n: int) -> int:
    """Sequence forward passes of a finished training run on `n` examples: per pair the estimator's own count
    (policy and reference, chosen and rejected), plus the reference precompute (one draw per planned epoch);
    per SFT example one."""
    from dtrpo.reference import planned_epochs

    a = trainer.args
    batch = a.per_device_train_batch_size * a.world_size
    seen = examples_seen(n, trainer.state.global_step, batch, a.gradient_accumulation_steps, a.dataloader_drop_last)
    metric = "estimator/forward_passes_per_pair"
    per_pair = next((h[metric] for h in reversed(trainer.state.log_history) if metric in h), None)
    if per_pair is None:  # the SFT trainer: one pass per example
        return seen
    precompute = 0
    if getattr(a, "precompute_ref_log_probs", False):
        updates = math.ceil(math.ceil(n / batch) / a.gradient_accumulation_steps)
        precompute = n * planned_epochs(a.max_steps, a.num_train_epochs, updates) * per_pair
    return round(seen * per_pair + precompute)


def train_stage(config, r: int, rd: Path, start: str, models: Models, callbacks, log) -> dict:
    data, n = training_data(config, r, rd)
    if not n:
        log(f"round {r}: no pairs to train on (no prompt had samples of different scores): the model carries over")
        return {"trained": False, "examples": 0, "steps": 0, "training_passes": 0}
    reference = "the initial model" if config.loop.reference == "initial" else f"round {r}'s start model"
    what = (
        f"SFT on the chosen responses of {n} pairs"
        if config.loop.method == "rft"
        else f"dTRPO on {n} pairs, reference {reference}"
    )
    return train_on(config, r, rd, start, models, callbacks, log, data=data, n=n, what=what)


def train_on(config, r: int, rd: Path, start: str, models: Models, callbacks, log, *, data: Path, n: int, what: str):
    """Round r's training from `start` on the `n` rows of `data` (pairs, or SFT examples for `method=rft`) into
    `<rd>/model`, resumed from its newest checkpoint; the stage's result."""
    from dtrpo.sft import DiffusionSFTTrainer
    from dtrpo.trainer import DTRPOTrainer

    loop, out = config.loop, rd / "model"
    resume, _ = last_checkpoint(out)
    args = round_args(config, r, out, fresh=resume is None)
    log(f"round {r}: {what}, {args.max_steps} steps" + (f"; resuming from {resume}" if resume else ""))
    model, tokenizer, adapter = models.get(start)
    common = dict(adapter=adapter, processing_class=tokenizer, train_dataset=str(data))
    callbacks = [LogLastStep(), *callbacks]
    if loop.method == "rft":
        trainer = DiffusionSFTTrainer(model=model, args=args, callbacks=callbacks, **common)
    else:
        initial = config.task.model_name_or_path
        ref = models.load(initial)[0] if loop.reference == "initial" and start != initial else None
        trainer = DTRPOTrainer(model=model, ref_model=ref, args=args, callbacks=callbacks, **common)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except RunFinished:  # killed after its final save, before the checkpoints went: the same model written again
        trainer.restore(resume)
    trainer.save_model(str(out))
    models.moved(out)
    for checkpoint in out.glob("checkpoint-*"):  # only a resume reads them; the round's model stays
        shutil.rmtree(checkpoint)
    last = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
    return {
        "trained": True,
        "examples": n,
        "steps": trainer.state.global_step,
        "training_passes": training_passes(trainer, n),
        "last_log": last,
    }


def eval_stage(config: IterateConfig, task, rd: Path, model_path: str, models: Models, label: str, log) -> dict:
    """The evaluation of a round's model (`run_eval`'s report in `eval.json`, the stage's own marker)."""
    path, loop = rd / "eval.json", config.loop
    if path.is_file():
        log(f"{label} eval: done earlier ({path})")
    else:
        model, tokenizer, adapter = models.get(model_path)
        rows = stream_prompts(task, loop.eval_split, loop.eval_n, seed=config.sampling.seed)
        sampling = replace(config.sampling, temperature=loop.eval_temperature)
        rd.mkdir(parents=True, exist_ok=True)
        run_eval(model, tokenizer, adapter, task, rows, sampling, path, desc=f"{label} eval")
    report = read_stage(path, EVAL_KEYS)
    summary = {k: report[k] for k in EVAL_KEYS}
    if not (isinstance(summary["ci95"], list) and len(summary["ci95"]) == 2):
        raise ValueError(f"{path}: ci95 is {summary['ci95']!r}, not a [low, high] pair; {REDO}")
    low, high = summary["ci95"]
    log(f"{label}: {loop.eval_split} accuracy {summary['accuracy']:.3f} [{low:.3f}, {high:.3f}] (n={summary['n']})")
    return summary


# ----------------------------------------------------------------------------- the loop


def run_round(config: IterateConfig, task, r: int, start: str, models: Models, callbacks, log) -> dict:
    """One round's stages, each skipped when finished; its summary row."""
    rd = Path(config.train.output_dir) / f"round-{r}"
    rd.mkdir(parents=True, exist_ok=True)
    pairs = stage(
        rd / "pairs.json",
        lambda: pairs_stage(config, task, r, rd, start, models, log),
        log,
        f"round {r} pairs",
        PAIRS_KEYS,
    )
    train = stage(
        rd / "train.json",
        lambda: train_stage(config, r, rd, start, models, callbacks, log),
        log,
        f"round {r} training",
        TRAIN_KEYS,
    )
    for checkpoint in (rd / "model").glob("checkpoint-*"):  # left by a kill after the stage was written
        shutil.rmtree(checkpoint)
    model = str(rd / "model") if train["trained"] else start  # the folder, not a path kept in a file: runs move
    evaluation = eval_stage(config, task, rd, model, models, f"round {r}", log)
    return {
        "round": r,
        "start_model": start,
        "model": model,
        "prompts_from": pairs["prompts_from"],
        "prompts": pairs["prompts"],
        "pairs": pairs["pairs"],
        "mean_score": pairs["mean_score"],
        "generation_passes": pairs["generation_passes"],
        "training_passes": train["training_passes"],
        "steps": train["steps"],
        "accuracy": evaluation["accuracy"],
        "ci95": evaluation["ci95"],
        "n": evaluation["n"],
        "seconds": pairs["seconds"] + train["seconds"] + evaluation["seconds"],
    }


def _family_decoding(config: IterateConfig, log) -> SamplingArgs:
    """The sampler settings with the initial model's family rule where no flag was given, logged in one line (kept
    resolved in iterate_config.json, so a rerun compares the settings it samples with)."""
    from dtrpo.decoding import announce, folder_family

    return announce(config.sampling, folder_family(config.task.model_name_or_path, config.task.family), log)


def iterate(config: IterateConfig, log: Callable[[str], None] = print, callbacks=()) -> dict:
    """Run (or resume, or extend) `config.loop.rounds` rounds; returns the report (also `report.json`), with
    a table printed by `log` and the plot `rounds.png` in the run folder. `callbacks` go to every trainer."""
    from dtrpo.pairs import check_sampling

    out = Path(config.train.output_dir)
    check_sampling(config.pairs.samples, config.sampling)
    t = config.task
    task = t.load_task()
    if not Path(t.model_name_or_path).is_dir():  # checked before the settings are recorded, as every flag is
        raise FileNotFoundError(f"--model_name_or_path {t.model_name_or_path}: no such model folder")
    config = replace(config, sampling=_family_decoding(config, log))
    with hold(out / LOCK_FILE, f"--output_dir {out}"):  # one run at a time, before anything is deleted or written
        return run_rounds(config, task, out, log, callbacks)


def run_rounds(config: IterateConfig, task, out: Path, log, callbacks) -> dict:
    """`iterate`'s work, under the run folder's lock."""
    claim_run(out, config, task, log)
    models = Models(config)
    initial = config.task.model_name_or_path
    start = eval_stage(config, task, out / "round-0", initial, models, "round 0 (the initial model)", log)
    rows, passes, model = [], 0, initial
    for r in range(1, config.loop.rounds + 1):
        row = run_round(config, task, r, model, models, list(callbacks), log)
        passes += row["generation_passes"] + row["training_passes"]
        rows.append({**row, "cumulative_passes": passes})
        model = row["model"]
    report = {"config": config.resolved(), "initial": {**start, "model": initial}, "rounds": rows}
    _write_json(out / "report.json", report)
    plot(report, out / "rounds.png")
    log(format_table(report))
    log(f"report: {out / 'report.json'}   plot: {out / 'rounds.png'}")
    return report


# ----------------------------------------------------------------------------- output


def format_table(report: dict) -> str:
    head = ("round", "accuracy", "95% interval", "pairs", "mean score", "gen. passes", "train passes", "seconds")
    start = report["initial"]
    rows = [head, ("0", f"{start['accuracy']:.3f}", _interval(start), "", "", "", "", f"{start['seconds']:.0f}")]
    for r in report["rounds"]:
        rows.append(
            (
                str(r["round"]),
                f"{r['accuracy']:.3f}",
                _interval(r),
                str(r["pairs"]),
                f"{r['mean_score']:.3f}",
                f"{r['generation_passes']:,}",
                f"{r['training_passes']:,}",
                f"{r['seconds']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _interval(row: dict) -> str:
    return f"[{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}]"


def plot(report: dict, path: Path) -> None:
    """Accuracy (95% interval) against round and against sequence forward passes (generation + training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    points = [{**report["initial"], "round": 0, "cumulative_passes": 0}, *report["rounds"]]
    accuracy = [p["accuracy"] for p in points]
    errors = [[p["accuracy"] - p["ci95"][0] for p in points], [p["ci95"][1] - p["accuracy"] for p in points]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in zip(
        axes, ("round", "cumulative_passes"), ("round", "sequence forward passes (generation + training)"), strict=True
    ):
        ax.errorbar([p[key] for p in points], accuracy, yerr=errors, marker="o", capsize=4)
        ax.set_xlabel(label)
        ax.set_ylabel(f"accuracy (n={points[0]['n']}, 95% CI)")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    loop = report["config"]["loop"]
    fig.suptitle(f"dtrpo iterate: {loop['method']}, reference {loop['reference']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
