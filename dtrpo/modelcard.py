"""The model card written beside every saved model (README.md, the Hub's format: YAML metadata, then text).

It records what a reader needs to reuse or reproduce the model: the base model, the training data,
the method with the paper to cite, the resolved configuration and the final metrics, with tags in
TRL's style so that the Hub lists the model with other preference-tuned models.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version

import yaml

CITATION = """@article{dtrpo2026,
  title   = {dTRPO: Trajectory Reduction in Policy Optimization of Diffusion Large Language Models},
  journal = {arXiv preprint arXiv:2603.18806},
  year    = {2026}
}"""
METHODS = {
    "dtrpo": "dTRPO (Trajectory Reduction Policy Optimization): DPO on trajectory log-ratios of a masked diffusion "
    "LM, estimated from the newly unmasked tokens of one sampled denoising step per block, all blocks in one pass",
    "sft": "masked- or block-diffusion supervised fine-tuning",
}
CONFIG_KEYS = (
    "estimator", "mode", "steps_per_block", "reveal_order", "targets", "scale", "beta", "loss_type", "loss_weights",
    "label_smoothing", "precompute_ref_log_probs", "objective", "block_size", "max_prompt_length",
    "max_completion_length", "learning_rate", "lr_scheduler_type", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
)  # fmt: skip


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def model_card(
    method: str,
    model_name: str,
    base_model: str | None,
    dataset: str | None,
    config: dict,
    adapter: dict,
    metrics: dict,
    tags: list[str] | None = None,
) -> str:
    """README.md text of a trained model. `config` is the trainer's resolved arguments (a dict)."""
    meta = card_metadata(method, model_name, base_model, dataset, tags)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=True).strip(),
        "---",
        "",
        f"# {model_name}",
        "",
        f"A masked diffusion language model trained with **{METHODS.get(method, method)}**, using "
        "[dtrpo](https://pypi.org/project/dtrpo/).",
        "",
        f"- base model: {base_model or 'not recorded'}",
        f"- training data: {dataset or 'in-memory data (not recorded)'}",
        f"- family: {adapter.get('family')}, block size {adapter.get('block_size')}, mask token id "
        f"{adapter.get('mask_token_id')}, {'shifted' if adapter.get('shifted') else 'unshifted'} logits, "
        f"{adapter.get('attention')} attention, {adapter.get('prompt_attention')} prompt attention",
        "",
        "Load it with `dtrpo.load_model(path)` (no remote code runs).",
        "",
        *configuration_section(config),
        *metrics_section(method, metrics),
        *closing_sections(),
    ]
    return "\n".join(lines)


def card_metadata(
    method: str, model_name: str, base_model: str | None, dataset: str | None, tags: list[str] | None
) -> dict:
    """The card's YAML front matter: library, name, tags (a preference method's too), base model, data."""
    meta = {
        "library_name": "transformers",
        "model_name": model_name,
        "tags": sorted({"dtrpo", "diffusion-lm", "generated_from_trainer", *(tags or [])}),
    }
    if method == "dtrpo":
        meta["tags"] = sorted({*meta["tags"], "dpo", "preference-optimization"})
    if base_model:
        meta["base_model"] = base_model
    if dataset:
        meta["datasets"] = [dataset]
    return meta


def configuration_section(config: dict) -> list[str]:
    """The main training settings as JSON (the whole configuration is in dtrpo_config.json)."""
    shown = {k: config[k] for k in CONFIG_KEYS if config.get(k) is not None}
    return [
        "## Training configuration",
        "",
        "```json",
        json.dumps(shown, indent=2),
        "```",
        "",
        "The whole resolved configuration is in `dtrpo_config.json` beside the weights.",
        "",
    ]


def metrics_section(method: str, metrics: dict) -> list[str]:
    """The final logged metrics as a table, or a line saying none were logged."""
    lines = ["## Final metrics", ""]
    if not metrics:
        return [*lines, "None logged yet."]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    if method == "dtrpo":
        lines += ["", "`logps/*` are the estimator's log-likelihood estimates, not exact log-probabilities."]
    return lines


def closing_sections() -> list[str]:
    """Framework versions and the citation."""
    return [
        "",
        "## Framework versions",
        "",
        *(f"- {p}: {_version(p)}" for p in ("dtrpo", "transformers", "torch", "datasets", "peft", "accelerate")),
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
