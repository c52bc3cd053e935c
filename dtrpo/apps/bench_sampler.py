"""`dtrpo bench sampler`: speed and accuracy of each decoding setting beside autoregressive decoding.

For each model (the block-causal tiny model at two widths, and the tiny model run with full attention:
LLaDA's layout, unshifted, bidirectional prompt) the bench trains an SFT checkpoint with the demo's
recipe (or reuses the one cached under `--models_dir`), then times every decoding setting side by side
in one process: each repeat runs every arm once, in turn, so that machine noise hits them alike, and
the report gives medians and the ratio to HF `generate` (autoregressive, KV cache) measured in the same
run on the same weights. Two workloads:

- `task`: the demo's held-out problems, greedy, stopping at EOS; accuracy with its 95% interval, and
  each setting's paired difference to one-token-per-step decoding (the exact reference) on the same items.
  The autoregressive arm's accuracy is not meaningful: the weights are a diffusion model's.
- `fixed`: random prompts of a fixed length, a fixed number of new tokens, EOS ignored (speed only),
  the shapes of issue 16's measurements.

HF `generate` never stops at EOS here (it may come anywhere on a diffusion model's weights): it decodes
as many positions as the block sampler, which decodes whole blocks, and `ratio_to_autoregressive` is the
ratio of decoded positions per second.

Settings whose keyword the sampler does not take (found by inspecting `generate`'s signature, e.g. the
approximate caches of full-attention models) are left out and listed in the report.
"""

from __future__ import annotations

import inspect
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dtrpo.evaluate import Moments, SamplingArgs, compare, encode_prompts, evaluate
from dtrpo.tasks import demonstration, load_task, score_batch

# name -> keywords of `dtrpo.sampler.generate`; `steps` is a fraction of the block: 1 = one token per step
SETTINGS: dict[str, dict] = {
    "one_per_step": {"steps": 1},
    "one_per_step_no_cache": {"steps": 1, "use_cache": False},
    "two_per_step": {"steps": 2},
    "threshold_0.7": {"steps": 1, "threshold": 0.7},
    "threshold_0.9": {"steps": 1, "threshold": 0.9},
    "fast_dllm_v2_sub4": {"steps": 1, "threshold": 0.9, "sub_block_size": 4, "fix_first_token": True},
    "fast_dllm_v2_sub8": {"steps": 1, "threshold": 0.9, "sub_block_size": 8, "fix_first_token": True},
    "prefix_cache": {"steps": 1, "cache": "prefix"},
    "dual_cache": {"steps": 1, "cache": "dual"},
    "dual_cache_threshold_0.9": {"steps": 1, "threshold": 0.9, "cache": "dual"},
}
BLOCK_CAUSAL_ONLY = ("one_per_step_no_cache",)  # full attention always recomputes: the same as one_per_step
FULL_ONLY = ("prefix_cache", "dual_cache", "dual_cache_threshold_0.9")  # Fast-dLLM's approximate caches
REFERENCE = "one_per_step"


@dataclass
class BenchSamplerArgs:
    output: str = field(default="bench_sampler.json", metadata={"help": "JSON report to write."})
    models: str = field(
        default="block_causal:96x3:16x64,block_causal:256x6:64x128,full:96x3:16x64",
        metadata={
            "help": "Comma-separated attention:WIDTHxLAYERS:PROMPTxNEW, attention block_causal or full (LLaDA's "
            "layout); PROMPTxNEW is the fixed-length workload's shape (omit it to skip that workload)."
        },
    )
    models_dir: str = field(
        default="runs/bench_sampler", metadata={"help": "SFT checkpoints are trained into and reused from here."}
    )
    settings: str = field(
        default=",".join(SETTINGS), metadata={"help": f"Decoding settings to time: {list(SETTINGS)}."}
    )
    task: str = field(default="noisy_arithmetic:digits=2", metadata={"help": "Task of the SFT data and the accuracy."})
    heldout: int = field(default=500, metadata={"help": "Held-out problems decoded per arm (accuracy and speed)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per sampler call (both workloads)."})
    repeats: int = field(default=3, metadata={"help": "Timed repeats of every arm (after one warm-up round)."})
    threads: int = field(default=1, metadata={"help": "torch.set_num_threads for the whole run (training too)."})
    block_size: int = field(default=8, metadata={"help": "Block size of the tiny models."})
    seed: int = field(default=0, metadata={"help": "Seed of the models, the SFT data and the prompts."})
    sft_examples: int = field(default=3000, metadata={"help": "Train-split problems with worked answers for SFT."})
    sft_steps: int = field(default=1500, metadata={"help": "Most SFT optimizer steps."})
    sft_learning_rate: float = field(default=2e-3, metadata={"help": "SFT learning rate (the demo's)."})
    sft_target: float = field(default=0.5, metadata={"help": "SFT stops at this greedy validation accuracy."})
    sft_check_every: int = field(default=50, metadata={"help": "SFT steps between validation checks."})

    def __post_init__(self) -> None:
        for name in ("heldout", "batch_size", "repeats", "threads", "block_size", "sft_steps", "sft_check_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        unknown = [s for s in self.setting_names() if s not in SETTINGS]
        if unknown:
            raise ValueError(f"--settings: unknown setting {unknown[0]!r}; known: {list(SETTINGS)}")
        if REFERENCE not in self.setting_names():
            raise ValueError(f"--settings must include {REFERENCE!r}, the reference of the accuracy differences")
        for s in self.setting_names():
            split = SETTINGS[s].get("sub_block_size", SETTINGS[s]["steps"])
            if self.block_size % split:
                raise ValueError(f"--block_size {self.block_size} must be a multiple of {split} for setting {s!r}")
        self.model_specs()  # fails here, naming the flag, rather than after training

    def setting_names(self) -> list[str]:
        return [s.strip() for s in self.settings.split(",") if s.strip()]

    def model_specs(self) -> list[ModelSpec]:
        return [ModelSpec.parse(item) for item in self.models.split(",") if item.strip()]


@dataclass(frozen=True)
class ModelSpec:
    attention: str  # block_causal | full
    width: int
    layers: int
    prompt_length: int | None = None  # fixed-length workload; None: skipped
    new_tokens: int | None = None

    @property
    def name(self) -> str:
        return f"{self.attention}_{self.width}x{self.layers}"

    @classmethod
    def parse(cls, item: str) -> ModelSpec:
        parts = item.strip().split(":")
        try:
            if len(parts) not in (2, 3) or parts[0] not in ("block_causal", "full"):
                raise ValueError
            width, layers = (int(x) for x in parts[1].split("x"))
            shape = [int(x) for x in parts[2].split("x")] if len(parts) == 3 else [None, None]
            spec = cls(parts[0], width, layers, *shape)
        except ValueError:
            raise ValueError(
                f"--models: {item!r} is not attention:WIDTHxLAYERS[:PROMPTxNEW] with attention block_causal or full "
                "(e.g. block_causal:96x3:16x64)"
            ) from None
        if min(width, layers, *(x for x in shape if x is not None)) <= 0 or width % 4:
            raise ValueError(f"--models: {item!r}: sizes must be positive and the width a multiple of 4 (4 heads)")
        return spec


# ----------------------------------------------------------------------------- SFT checkpoints


def sft_checkpoint(spec: ModelSpec, a: BenchSamplerArgs, log=print) -> Path:
    """The SFT checkpoint of `spec` under `--models_dir`, trained with the demo's recipe (block-diffusion SFT
    for the block-causal model, LLaDA's masked-diffusion SFT for full attention, stopped at a validation
    accuracy) unless a folder trained with the same recipe is already there."""
    from dtrpo.apps.training import StopAtAccuracy, demo_settings, train_args
    from dtrpo.models import adapter_from_config, make_char_tokenizer, make_tiny_model
    from dtrpo.pairs import write_jsonl
    from dtrpo.sft import DiffusionSFTConfig, DiffusionSFTTrainer

    folder = Path(a.models_dir) / spec.name
    recipe = _recipe(spec, a)
    marker = folder / "bench_sft.json"
    if marker.is_file() and json.loads(marker.read_text()).get("recipe") == recipe:
        log(f"reusing the SFT checkpoint {folder}")
        return folder
    task, tok = load_task(a.task), make_char_tokenizer()
    model = make_tiny_model(tok, a.block_size, spec.width, spec.layers, seed=a.seed)
    model.config.dtrpo_attention = spec.attention  # 'full': LLaDA's layout (unshifted, bidirectional)
    adapter = adapter_from_config(model.config, tok)
    rows = task.prompts("train", a.sft_examples, seed=a.seed)
    data = folder / "sft_data.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl([{"prompt": r["prompt"], "completion": demonstration(r)} for r in rows], data)
    greedy = SamplingArgs(gen_length=_gen_length(tok, rows[0], a.block_size), batch_size=100, seed=a.seed)
    validation = task.prompts("train", 100, seed=a.seed + 2)
    stop = StopAtAccuracy(
        lambda m: evaluate(m, tok, adapter, task, validation, greedy)["accuracy"], a.sft_check_every, a.sft_target
    )
    log(f"SFT of {spec.name} until validation accuracy >= {a.sft_target} (at most {a.sft_steps} steps)")
    start = time.perf_counter()
    args = train_args(
        DiffusionSFTConfig,
        folder,
        a.sft_steps,
        a.sft_learning_rate,
        a.seed,
        32,
        "constant_with_warmup",
        **demo_settings(),
    )
    trainer = DiffusionSFTTrainer(
        model=model, args=args, adapter=adapter, processing_class=tok, train_dataset=str(data), callbacks=[stop]
    )
    trainer.train()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    info = {"steps": trainer.state.global_step, "seconds": time.perf_counter() - start, "curve": stop.curve}
    marker.write_text(json.dumps({"recipe": recipe, **info}, indent=2))
    return folder


def _recipe(spec: ModelSpec, a: BenchSamplerArgs) -> dict:
    keys = ("task", "block_size", "seed", "sft_examples", "sft_steps", "sft_learning_rate", "sft_target")
    return {"model": spec.name, "sft_check_every": a.sft_check_every, **{k: getattr(a, k) for k in keys}}


def _gen_length(tok, row: dict, block_size: int) -> int:
    """New tokens for the task: the answer plus EOS, rounded up to whole blocks (as the demo does)."""
    answer = len(tok(row["answer"], add_special_tokens=False)["input_ids"]) + 1
    return -(-answer // block_size) * block_size


# ----------------------------------------------------------------------------- one arm on one batch


@dataclass
class Run:
    """One arm on one batch: the responses (cut before EOS), the decoded positions, forwards and seconds."""

    sequences: list[list[int]]
    positions: int  # positions decoded, summed over the batch (past EOS too, as the decoder ran them)
    nfe: int
    seconds: float


def run_sampler(model, adapter, prompts: list[list[int]], gen_length: int, kw: dict, eos: int | None) -> Run:
    from dtrpo.sampler import generate

    kw = dict(kw)
    steps = adapter.block_size // kw.pop("steps")
    start = time.perf_counter()
    out = generate(adapter, model, prompts, gen_length, steps, eos_token_id=eos, **kw)
    seconds = _synced(model, start)
    return Run(out.sequences, sum(len(r) for r in out.reveal_step), out.nfe, seconds)


def run_autoregressive(model, pad_id: int, prompts: list[list[int]], gen_length: int) -> Run:
    """HF `generate`, greedy, with its KV cache, always `gen_length` new tokens: EOS is never chosen (on a
    diffusion model's weights it may come first), so that it decodes as many positions as the block sampler,
    which decodes whole blocks. Forwards are counted by a hook on the model's forward."""
    from transformers import GenerationConfig

    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], device=model.device)  # (B, P) left-padded
    valid = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=model.device)  # (B, P)
    # min_new_tokens keeps EOS from stopping it (the model's own generation_config would otherwise supply one)
    config = GenerationConfig(
        max_new_tokens=gen_length, min_new_tokens=gen_length, do_sample=False, pad_token_id=pad_id
    )
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=valid, generation_config=config)  # (B, P + new)
        seconds = _synced(model, start)
    finally:
        hook.remove()
    new = out[:, P:].tolist()
    return Run(new, len(new) * len(new[0]), len(calls), seconds)


def _synced(model, start: float) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- arms side by side


def available_settings(names: list[str], attention: str) -> tuple[dict[str, dict], list[str]]:
    """The settings this model and this sampler can run, and those whose keyword the sampler's signature
    lacks. A setting meant for the other attention is dropped (it would repeat another arm)."""
    from dtrpo.sampler import generate

    takes = set(inspect.signature(generate).parameters)
    arms, missing = {}, []
    for name in names:
        if name in (FULL_ONLY if attention == "block_causal" else BLOCK_CAUSAL_ONLY):
            continue
        kw = dict(SETTINGS[name])
        if "use_cache" in kw and "use_cache" not in takes:  # a sampler that names its caches: no cache is 'none'
            kw = {**{k: v for k, v in kw.items() if k != "use_cache"}, "cache": "none"}
        if set(kw) - {"steps"} <= takes:
            arms[name] = kw
        else:
            missing.append(name)
    return arms, missing


def side_by_side(model, adapter, tok, batches: list[list[list[int]]], gen_length: int, arms: dict, eos, repeats, log):
    """Every arm over every batch, arms alternating within each round; round 0 warms up on the first batch.
    Returns per arm the runs of the first timed round and the seconds of each timed round."""
    results = {name: {"runs": None, "seconds": []} for name in ["autoregressive", *arms]}
    for rep in range(repeats + 1):
        for name in results:
            runs = [
                run_autoregressive(model, tok.pad_token_id, b, gen_length)
                if name == "autoregressive"
                else run_sampler(model, adapter, b, gen_length, arms[name], eos)
                for b in (batches if rep else batches[:1])
            ]
            log(f"  {'warm-up' if rep == 0 else f'round {rep}'}: {name} {sum(r.seconds for r in runs):.2f} s")
            if rep:
                results[name]["seconds"].append(sum(r.seconds for r in runs))
                if results[name]["runs"] is None:
                    results[name]["runs"] = runs
                elif [r.sequences for r in runs] != [r.sequences for r in results[name]["runs"]]:
                    raise RuntimeError(f"{name}: greedy decoding gave different tokens in two repeats")
    return results


def speed_row(result: dict) -> dict:
    """Median seconds over the repeats; NFE and tokens per forward (positions decoded per batch row per
    forward: 1 for autoregressive decoding) from the first timed round (greedy: every round decodes alike).
    `tokens` are the responses' (cut before EOS); `positions` all that the decoder decoded, past EOS too."""
    runs, seconds = result["runs"], statistics.median(result["seconds"])
    tokens = sum(len(s) for r in runs for s in r.sequences)
    positions = sum(r.positions for r in runs)
    return {
        "positions_per_second": positions / seconds,
        "tokens_per_second": tokens / seconds,
        "seconds": seconds,
        "seconds_repeats": result["seconds"],
        "tokens": tokens,
        "positions": positions,
        "nfe_per_batch": sum(r.nfe for r in runs) / len(runs),
        "tokens_per_forward": positions / sum(r.nfe * len(r.sequences) for r in runs),
    }


def task_workload(model, adapter, tok, a: BenchSamplerArgs, arms: dict, log=print) -> dict:
    task = load_task(a.task)
    rows = task.prompts("heldout", a.heldout, seed=a.seed)
    gen_length = _gen_length(tok, rows[0], adapter.block_size)
    ids, _ = encode_prompts(tok, [r["prompt"] for r in rows], SamplingArgs(gen_length=gen_length), adapter)
    batches = [ids[i : i + a.batch_size] for i in range(0, len(ids), a.batch_size)]
    log(f" task: {len(rows)} held-out problems, {gen_length} new tokens, batches of {a.batch_size}")
    results = side_by_side(model, adapter, tok, batches, gen_length, arms, tok.eos_token_id, a.repeats, log)
    report = speed_table(results)
    items = {}
    for name, result in results.items():
        texts = [tok.decode(s, skip_special_tokens=True) for r in result["runs"] for s in r.sequences]
        scores = score_batch(task, rows, texts)
        items[name] = {
            "samples": [{"id": r["id"], "prompt": r["prompt"], "score": s} for r, s in zip(rows, scores, strict=True)]
        }
        moments = Moments.of(scores)
        report[name].update(accuracy=moments.total / moments.n, ci95=list(moments.interval95()))
    for name in results:
        paired = compare(items[REFERENCE], items[name], (REFERENCE, name))
        report[name]["accuracy_minus_" + REFERENCE] = {k: paired[k] for k in ("difference", "ci95")}
    report["autoregressive"]["accuracy_meaningful"] = False  # the weights are a diffusion model's
    return {"task": task.name, "n": len(rows), "gen_length": gen_length, "batch_size": a.batch_size, "arms": report}


def fixed_workload(model, adapter, tok, spec: ModelSpec, a: BenchSamplerArgs, arms: dict, log=print) -> dict:
    """Random prompts of `spec.prompt_length` printable characters, `spec.new_tokens` new tokens, EOS ignored."""
    g = torch.Generator().manual_seed(a.seed)
    lo, hi = min(tok.convert_tokens_to_ids(["0", "z"])), max(tok.convert_tokens_to_ids(["0", "z"]))
    ids = torch.randint(lo, hi + 1, (a.batch_size, spec.prompt_length), generator=g).tolist()
    log(f" fixed: {a.batch_size} prompts of {spec.prompt_length}, {spec.new_tokens} new tokens, EOS ignored")
    results = side_by_side(model, adapter, tok, [ids], spec.new_tokens, arms, None, a.repeats, log)
    return {
        "prompt_length": spec.prompt_length,
        "gen_length": spec.new_tokens,
        "prompts": a.batch_size,
        "arms": speed_table(results),
    }


def speed_table(results: dict) -> dict:
    """Each arm's speed row with its speed ratio to the autoregressive arm's from the same run: decoded
    positions per second, i.e. the same work (every arm decodes gen_length positions per prompt unless a
    whole batch stops at EOS early)."""
    rows = {name: speed_row(r) for name, r in results.items()}
    base = rows["autoregressive"]["positions_per_second"]
    for row in rows.values():
        row["ratio_to_autoregressive"] = row["positions_per_second"] / base
    return rows


# ----------------------------------------------------------------------------- the bench


def run_bench(a: BenchSamplerArgs, log=print) -> dict:
    from dtrpo.families import load_model
    from dtrpo.sampler import generate

    torch.set_num_threads(a.threads)
    report = {
        "settings": asdict(a),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sampler_signature": str(inspect.signature(generate)),
        "models": {},
    }
    for spec in a.model_specs():
        folder = sft_checkpoint(spec, a, log)
        model, tok, adapter = load_model(folder)
        model.eval()
        arms, missing = available_settings(a.setting_names(), spec.attention)
        log(f"{spec.name}: timing {['autoregressive', *arms]} ({a.repeats} repeats, {a.threads} threads)")
        entry = {
            "checkpoint": str(folder),
            "attention": adapter.attention,
            "block_size": adapter.block_size,
            "sft": {k: v for k, v in json.loads((folder / "bench_sft.json").read_text()).items() if k != "recipe"},
            "settings_not_in_sampler": missing,
            "task": task_workload(model, adapter, tok, a, arms, log),
        }
        if spec.prompt_length is not None:
            entry["fixed"] = fixed_workload(model, adapter, tok, spec, a, arms, log)
        report["models"][spec.name] = entry
    return report


def format_table(report: dict) -> str:
    """One markdown table per model: each arm's speed on both workloads and its task accuracy."""
    out = []
    for name, m in report["models"].items():
        t, f = m["task"], m.get("fixed")
        head = f"{name}: task n={t['n']}, {t['gen_length']} new tokens, batches of {t['batch_size']}"
        if f:
            head += f"; fixed {f['prompts']} prompts of {f['prompt_length']}, {f['gen_length']} new tokens"
        out += [f"**{head}**", ""]
        out.append(
            "| setting | positions/s | x AR | NFE/batch | tok/fwd | accuracy [95%] | vs one/step |"
            + (" fixed tok/s | x AR | NFE | tok/fwd |" if f else "")
        )
        out.append("|---" * (11 if f else 7) + "|")
        out += [_table_row(arm, r, f["arms"][arm] if f else None) for arm, r in t["arms"].items()]
        if m["settings_not_in_sampler"]:
            out.append(f"\nnot offered by this sampler: {', '.join(m['settings_not_in_sampler'])}")
        out.append("")
    return "\n".join(out)


def _table_row(arm: str, r: dict, fixed: dict | None) -> str:
    """One arm: task speed, accuracy and its paired difference to the reference; the fixed workload's speed."""
    acc, diff = "n/a (AR on diffusion weights)", ""
    if arm != "autoregressive":
        acc = f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
    if arm not in ("autoregressive", REFERENCE):
        d = r[f"accuracy_minus_{REFERENCE}"]
        diff = f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
    line = (
        f"| {arm} | {r['positions_per_second']:.0f} | {r['ratio_to_autoregressive']:.2f} | "
        f"{r['nfe_per_batch']:.1f} | {r['tokens_per_forward']:.2f} | {acc} | {diff} |"
    )
    if fixed is not None:
        line += (
            f" {fixed['tokens_per_second']:.0f} | {fixed['ratio_to_autoregressive']:.2f} | "
            f"{fixed['nfe_per_batch']:.0f} | {fixed['tokens_per_forward']:.2f} |"
        )
    return line


def format_before_after(before: dict, after: dict) -> str:
    """One markdown table per model held by both reports: each setting's speed ratio to autoregressive decoding
    on both workloads, forwards of the fixed workload, and task accuracy, before -> after."""
    out = []
    for name in [n for n in after["models"] if n in before["models"]]:
        b, a = before["models"][name], after["models"][name]
        out += [
            f"**{name}**",
            "",
            "| setting | x AR task | x AR fixed | NFE fixed | accuracy (task) |",
            "|---" * 5 + "|",
        ]
        for arm, r in a["task"]["arms"].items():
            was = b["task"]["arms"].get(arm)
            cells = [_change(was, r, "ratio_to_autoregressive", "{:.2f}")]
            fb, fa = b.get("fixed", {}).get("arms", {}).get(arm), a.get("fixed", {}).get("arms", {}).get(arm)
            cells += [_change(fb, fa, "ratio_to_autoregressive", "{:.2f}"), _change(fb, fa, "nfe_per_batch", "{:.0f}")]
            cells.append("n/a" if arm == "autoregressive" else _change(was, r, "accuracy", "{:.3f}"))
            out.append(f"| {arm} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _change(was: dict | None, now: dict | None, key: str, fmt: str) -> str:
    if now is None:
        return ""
    return (fmt.format(was[key]) if was else "-") + " -> " + fmt.format(now[key])
