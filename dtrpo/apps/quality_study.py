"""`dtrpo bench quality`: the study's driver. It runs every missing run of `quality.py` in order (`--workers N`:
N processes that claim runs, so none runs twice), then the diagnostics (`quality_diagnostics.py`), then writes
the report (`quality_report.py`). The only module of the study that imports the other three."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dtrpo.apps.quality import (
    Job,
    QualityArgs,
    build,
    choose,
    complete,
    diagnostics_path,
    jobs_in_order,
    run_job,
    task_slug,
)
from dtrpo.apps.quality_diagnostics import run_diagnostics
from dtrpo.apps.quality_report import write_report


def _claim(path: Path) -> bool:
    claim = path.with_suffix(".claim")
    claim.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def work(args: QualityArgs, log=print) -> None:
    """Run every missing job in order, claiming each so that parallel workers never run the same one.
    A final-seed job waits for its arm's tuning to finish (another worker may hold it)."""
    torch.set_num_threads(args.threads)
    n_tasks = len(args.task_list())
    todo = [t for t in range(n_tasks) if not complete(args, t)]  # a finished task needs no checkpoint
    for t in range(n_tasks):  # worker k builds task k first, then the rest
        i = (t + max(args.worker, 0)) % n_tasks
        if i in todo and _claim(Path(args.output_dir) / task_slug(args.task_list()[i]) / "build"):
            build(args, i, log)
    for t in todo:
        while not (Path(args.output_dir) / task_slug(args.task_list()[t]) / "build.json").exists():
            time.sleep(5)
    for stage, t, arm, point in jobs_in_order(args):
        if stage == "diagnostics":
            if not diagnostics_path(args, point).exists() and _claim(diagnostics_path(args, point)):
                run_diagnostics(args, point, log)
                diagnostics_path(args, point).with_suffix(".claim").unlink(missing_ok=True)
            continue
        if stage == "tune":
            job = Job(t, arm.name, point[0], point[1], 0)
        else:
            while (chosen := choose(args, t, arm)) is None:
                time.sleep(5)
            job = Job(t, arm.name, chosen[0], chosen[1], point)
        path = job.path(args)
        if path.exists() or not _claim(path):
            continue
        start = time.perf_counter()
        result = run_job(args, job)
        acc, seconds = result["curve"][-1]["accuracy"], time.perf_counter() - start
        log(f"[{stage}] {job} held-out {acc:.3f} val {result['validation_accuracy']:.3f} ({seconds:.0f}s)")
        path.with_suffix(".claim").unlink(missing_ok=True)


def wait_all(procs: list[subprocess.Popen], poll: float = 1.0) -> None:
    """Wait for every worker; the first that fails stops the others (they would wait for its tuning results
    forever) and raises, naming the exit codes."""
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            codes = [p.wait() for p in procs]
            raise RuntimeError(
                f"a quality worker failed (exit codes {codes}); the others were stopped: rerun to resume"
            )
        time.sleep(poll)
    codes = [p.returncode for p in procs]
    if any(codes):
        raise RuntimeError(f"quality workers exited with {codes}")


def run_study(args: QualityArgs, argv: list[str], log=print) -> None:
    """Launch `workers` processes (or work here), then write the report."""
    if args.worker >= 0:  # one of the launcher's workers
        work(args, log)
        return
    if not args.report_only:
        for claim in Path(args.results_dir).rglob("*.claim"):  # left by an interrupted run
            claim.unlink()
        for claim in Path(args.output_dir).glob("*/build.claim"):
            if not (claim.parent / "build.json").exists():
                claim.unlink()
        if args.workers > 1:
            base = [sys.executable, "-m", "dtrpo.cli", "bench", "quality", *argv]
            wait_all([subprocess.Popen([*base, "--worker", str(k)]) for k in range(args.workers)])
        else:
            work(args, log)
    for part in filter(None, args.diagnostics.split(",")):
        run_diagnostics(args, part, log)
    if args.report:
        write_report(args)
        log(f"wrote {args.report}")
