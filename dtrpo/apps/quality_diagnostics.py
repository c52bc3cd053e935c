"""Estimator diagnostics of `dtrpo bench quality` (no training of arms, a few minutes on one core).

1. Block-causal (the tiny model of the study, SFT on the noisy task, then 40 dTRPO steps so that policy
   and reference differ as they do in training): for every estimator option and T_B, over `draws` draws
   on the same 16 pairs, the bias and spread of the per-sequence log-ratio against the exact trajectory
   (the trajectory estimator averaged over the same number of reveal orders, at the same T_B), and the
   cosine between one draw's loss gradient and the exact-trajectory gradient.
2. Full attention (the LLaDA layout: a tiny model trained by masked-diffusion SFT with full attention):
   the bias and cost of `packed` and `remasked` against `exact`, and the held-out accuracy of training
   with each.

Every number comes from `DTRPOTrainer.pair_losses`, the trainer's own loss code.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from dtrpo.apps.quality import QualityArgs, diagnostics_path, greedy_scores, task_data
from dtrpo.apps.training import train_args
from dtrpo.estimators import EstimatorConfig
from dtrpo.families import load_model
from dtrpo.models import init_tiny
from dtrpo.pairs import write_jsonl
from dtrpo.tasks import demonstration

# the losses the full-attention model trains with, one seed each, lr 2e-4, beta 0.1
FULL_ATTENTION_TRAINING = {
    "dTRPO": {"targets": "newly_unmasked", "rpo_alpha": 0.0},
    "dTRPO all_masked_weighted + rpo_alpha 1": {"targets": "all_masked_weighted", "rpo_alpha": 1.0},
}


def _trainer(policy, ref, tok, adapter, pairs: Path, out: Path, steps: int = 1, lr: float = 2e-4, **extra):
    from dtrpo.trainer import DTRPOConfig, DTRPOTrainer

    args = train_args(DTRPOConfig, out, steps, lr, 0, 16, "cosine", beta=0.1, **{"rpo_alpha": 0.0, **extra})
    return DTRPOTrainer(
        model=policy, ref_model=ref, args=args, adapter=adapter, processing_class=tok, train_dataset=str(pairs)
    )


def _draws(trainer, inputs, cfg: EstimatorConfig, draws: int, grads: bool = True):
    """Per-sequence log-ratios (draws, 2n), flattened loss gradients (draws, P) and seconds per draw."""
    trainer.estimator_config = cfg
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    ratios, gradients, start = [], [], time.perf_counter()
    for k in range(draws):
        trainer.args.seed = 1000 + k  # the draw's per-example seeds derive from it
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grads):
            losses, metrics = trainer.pair_losses(model, inputs)
        if grads:
            losses.mean().backward()
            gradients.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
        beta = trainer.args.beta
        ratios.append(torch.cat([metrics["rewards/chosen"], metrics["rewards/rejected"]]) / beta)
    seconds = (time.perf_counter() - start) / draws
    return torch.stack(ratios), (torch.stack(gradients) if grads else None), seconds


def _summary(ratios, grads, truth_ratios, truth_grad, seconds) -> dict:
    cos = torch.nn.functional.cosine_similarity
    out = {
        # per sequence: |mean over draws - exact|, then averaged over sequences; the spread of one draw
        "abs_bias": (ratios.mean(0) - truth_ratios.mean(0)).abs().mean().item(),
        "bias": (ratios.mean(0) - truth_ratios.mean(0)).mean().item(),
        "std": ratios.std(0).mean().item(),
        # what |bias| would be from noise alone: the standard error of (mean of draws - exact mean)
        "noise_floor": (ratios.var(0) / len(ratios) + truth_ratios.var(0) / len(truth_ratios)).sqrt().mean().item(),
        "seconds_per_draw": seconds,
    }
    if grads is not None:
        out["grad_cosine"] = cos(grads, truth_grad[None], dim=-1).mean().item()
        out["grad_cosine_of_mean"] = cos(grads.mean(0), truth_grad, dim=0).item()
    return out


def _policy(root: Path, ref_path: Path, out: Path, steps: int = 40, **extra):
    """The reference checkpoint and a policy trained from it for `steps` dTRPO steps on the task's pairs."""
    policy, tok, adapter = load_model(ref_path)
    ref, _, _ = load_model(ref_path)
    _trainer(policy, ref, tok, adapter, root / "pairs.jsonl", out, steps=steps, **extra).train()
    return policy, ref, tok, adapter


def block_causal(args: QualityArgs, draws: int, log=print) -> dict:
    d = task_data(args, args.task_list()[0])
    torch.set_num_threads(args.threads)
    policy, ref, tok, adapter = _policy(d.root, d.root / "sft", d.root / "diag_policy")
    trainer = _trainer(policy, ref, tok, adapter, d.root / "pairs.jsonl", d.root / "diag")
    inputs = trainer._prepare_inputs(
        trainer.data_collator([trainer.train_dataset[i] for i in range(min(16, len(trainer.train_dataset)))])
    )
    B = adapter.block_size
    rows = []
    truths = {}
    for T in dict.fromkeys((B, B // 2, B // 4, 1)):
        base = EstimatorConfig(steps_per_block=T, targets="newly_unmasked")
        truth_cfg = replace(base, estimator="trajectory", trajectory_mode="packed")
        truths[T] = _draws(trainer, inputs, truth_cfg, draws)
        tr, tg, ts = truths[T]
        rows.append({"option": "trajectory (exact)", "T_B": T, **_summary(tr, tg, tr, tg.mean(0), ts)})
        for name, cfg in (("dtrpo", base), ("dtrpo all_masked_weighted", replace(base, targets="all_masked_weighted"))):
            r, g, s = _draws(trainer, inputs, cfg, draws)
            rows.append({"option": name, "T_B": T, **_summary(r, g, tr, tg.mean(0), s)})
        log(f"diagnostics T_B={T}: {rows[-2:]}")
    tr, tg, _ = truths[B]
    for name, cfg in (
        *((f"vrpo n={n}", EstimatorConfig(estimator="vrpo", vrpo_samples=n)) for n in (1, 2, 4, 8)),
        ("meanfield", EstimatorConfig(estimator="meanfield")),
    ):
        r, g, s = _draws(trainer, inputs, cfg, draws)
        rows.append({"option": name, "T_B": B, **_summary(r, g, tr, tg.mean(0), s)})
    return {
        "task": d.spec,
        "pairs": 16,
        "draws": draws,
        "policy": "SFT + 40 dTRPO steps (lr 2e-4, beta 0.1)",
        "rows": rows,
    }


def full_attention(args: QualityArgs, draws: int, train: bool, log=print) -> dict:
    """A full-attention tiny model (LLaDA layout) trained by masked-diffusion SFT on the first task."""
    from dtrpo.sft import DiffusionSFTConfig, DiffusionSFTTrainer

    d = task_data(args, args.task_list()[0])
    torch.set_num_threads(args.threads)
    root = d.root / "full_attention"
    if not (root / "sft" / "config.json").exists():
        init_tiny(root / "model", args.block_size, args.hidden_size, args.num_layers, 0)
        config = json.loads((root / "model" / "config.json").read_text())
        (root / "model" / "config.json").write_text(json.dumps({**config, "dtrpo_attention": "full"}, indent=2))
        model, tok, adapter = load_model(root / "model")
        rows = d.task.prompts("train", args.sft_examples, seed=0)
        write_jsonl([{"prompt": r["prompt"], "completion": demonstration(r)} for r in rows], root / "sft_data.jsonl")
        steps = min(1500, args.per_task(args.sft_steps, int)[0])
        sft = train_args(DiffusionSFTConfig, root / "sft", steps, 2e-3, 0, 32, "constant_with_warmup")
        DiffusionSFTTrainer(
            model=model, args=sft, adapter=adapter, processing_class=tok, train_dataset=str(root / "sft_data.jsonl")
        ).train()
        model.save_pretrained(root / "sft")
        tok.save_pretrained(root / "sft")
    model, tok, adapter = load_model(root / "sft")
    sft_acc = sum(greedy_scores(model, tok, adapter, d.task, d.heldout, d.gen_length)) / len(d.heldout)
    log(f"full-attention SFT model: held-out {sft_acc:.3f} (objective masked, attention {adapter.attention})")
    # pairs: the block-causal study's pairs (same prompts; a preference pair is model-agnostic data)
    policy, ref, tok, adapter = _policy(d.root, root / "sft", root / "diag_policy", mode="exact")
    trainer = _trainer(policy, ref, tok, adapter, d.root / "pairs.jsonl", root / "diag")
    inputs = trainer._prepare_inputs(
        trainer.data_collator([trainer.train_dataset[i] for i in range(min(16, len(trainer.train_dataset)))])
    )
    exact = _draws(trainer, inputs, EstimatorConfig(steps_per_block=adapter.block_size, mode="exact"), draws)
    rows = []
    for mode in ("exact", "packed", "remasked"):
        cfg = EstimatorConfig(steps_per_block=adapter.block_size, mode=mode)
        r, g, s = exact if mode == "exact" else _draws(trainer, inputs, cfg, draws)
        paired = (r - exact[0]).mean(0)  # same seeds: the bias of the mode on the same states
        rows.append(
            {
                "mode": mode,
                **_summary(r, g, exact[0], exact[1].mean(0), s),
                "paired_bias": paired.mean().item(),
                "paired_abs_bias": paired.abs().mean().item(),
            }
        )
    out = {"sft_heldout_accuracy": sft_acc, "draws": draws, "rows": rows}
    if train:
        out["training"] = []
        for loss, extra in FULL_ATTENTION_TRAINING.items():
            for mode in ("exact", "packed", "remasked"):
                model, tok, adapter = load_model(root / "sft")
                t = time.perf_counter()
                pairs = d.root / "pairs.jsonl"
                _trainer(model, None, tok, adapter, pairs, root / mode, steps=args.steps, mode=mode, **extra).train()
                seconds = time.perf_counter() - t
                acc = sum(greedy_scores(model, tok, adapter, d.task, d.heldout, d.gen_length)) / len(d.heldout)
                row = {"loss": loss, "mode": mode, "heldout_accuracy": acc, "train_seconds": seconds}
                out["training"].append({**row, "steps": args.steps, "lr": 2e-4, "beta": 0.1, "seed": 0})
                log(f"full attention, {loss}, training with mode={mode}: held-out {acc:.3f} ({seconds:.0f}s)")
    return out


def run_diagnostics(args: QualityArgs, part: str, log=print, train_full: bool = True) -> Path:
    """Write one part of the diagnostics ('block_causal' or 'full_attention') as JSON (skipped when present)."""
    path = diagnostics_path(args, part)
    if path.exists():
        return path
    if part == "block_causal":
        result = block_causal(args, args.draws, log)
    elif part == "full_attention":
        result = full_attention(args, args.draws, train_full, log)
    else:
        raise ValueError(f"--diagnostics: unknown part {part!r}; expected block_causal or full_attention")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path
