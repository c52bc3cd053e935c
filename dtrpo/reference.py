"""Precomputed reference scores: what they were computed from, and where they are kept.

The reference's estimate of each pair depends only on the reference weights, the tokenized pair, the
estimator options, the seed and the epoch (one draw per epoch, as the on-the-fly path draws). All of
that goes into a fingerprint saved with the scores, beside the data; a later run reuses the file when
its fingerprint matches (then no reference model is needed at all), and refuses it with the fields
that differ named otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

FORMAT = "dtrpo-reference-scores/1"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and a strided sample of its values (at most 4096
    per tensor: any real change of weights, fine-tuning or another checkpoint, changes the sample).

    The weights are read whole under every engine, so that one model gives one fingerprint on one process,
    under DDP, FSDP and DeepSpeed at any number of processes: a DeepSpeed engine or DDP wrapper is looked
    through, an FSDP2 DTensor is gathered (`full_tensor`), a ZeRO-3 parameter (an empty placeholder on each
    rank) is gathered one at a time. Those gathers are collectives: under FSDP or ZeRO-3 every rank calls it."""
    if type(model).__name__ in ("DeepSpeedEngine", "DistributedDataParallel"):
        model = model.module
    h = hashlib.sha256()
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, p in sorted(model.state_dict().items()):
        if "lora_" in name:  # the reference of a PEFT model is its base, adapters disabled
            continue
        with _whole(params.get(name, p)) as full:
            shown = name.removeprefix("base_model.model.").replace(".base_layer", "")  # PEFT's names of base weights
            flat = full.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
            h.update(f"{shown}|{tuple(full.shape)}|{full.dtype}|".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _whole(p: torch.Tensor):
    """The whole tensor behind `p`: gathered from a ZeRO-3 partition or an FSDP2 DTensor, else `p` itself."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            yield p.data
    elif hasattr(p, "full_tensor"):
        yield p.full_tensor()
    else:
        yield p


def data_fingerprint(dataset) -> str:
    """sha256 of the tokenized pairs (ids and row index), in order: of each column's JSON list, written a
    batch of rows at a time (a memory-mapped dataset is never held whole as Python lists)."""
    h = hashlib.sha256()
    for key in ("index", "prompt_ids", "chosen_ids", "rejected_ids"):
        h.update(b"[")
        for start in range(0, len(dataset), 4096):
            values = dataset[start : start + 4096][key]
            h.update((", " if start else "").encode() + json.dumps(values)[1:-1].encode())
        h.update(b"]")
    return h.hexdigest()


def fingerprint(reference: torch.nn.Module, dataset, estimator, adapter, seed: int) -> dict:
    """What the scores depend on, field by field (the epochs are checked apart: more is fine)."""
    return {
        "reference_weights": weights_fingerprint(reference),
        "data": data_fingerprint(dataset),
        "estimator": asdict(estimator),
        "adapter": {k: v for k, v in vars(adapter).items() if k != "family"},
        "seed": seed,
    }


def rank_shard(dataset, world_size: int, rank: int):
    """(shard, n_real): this rank's contiguous share of the pairs, padded with repeats of row 0 to the
    largest share's length, so every rank runs the same number of reference forwards (a model sharded
    with FSDP or ZeRO-3 needs every rank in every forward); only the first n_real rows are kept.

    7 pairs on 2 ranks: rank 0 scores rows 0-3, rank 1 rows 4-6 and row 0 again (not kept).
    """
    from datasets import concatenate_datasets

    shard = (
        dataset.shard(num_shards=world_size, index=rank, contiguous=True) if rank < len(dataset) else dataset.select([])
    )
    n_real, longest = len(shard), math.ceil(len(dataset) / world_size)
    if n_real < longest:
        shard = concatenate_datasets([shard, dataset.select([0] * (longest - n_real))])
    return shard, n_real


def planned_epochs(max_steps: int, num_train_epochs: float, updates_per_epoch: int) -> int:
    """Epochs a run will start: from max_steps when set, else num_train_epochs (a fraction starts one)."""
    if max_steps and max_steps > 0:
        return max(1, math.ceil(max_steps / max(updates_per_epoch, 1)))
    return max(1, math.ceil(num_train_epochs))


def load_scores(
    path: Path, want: dict, epochs: int, index: list[int] | None = None
) -> dict[int, list[tuple[float, float]]] | None:
    """{row index: [(chosen, rejected) per epoch]} from `path` when its fingerprint matches; None when
    there is no file; an error naming the fields that differ otherwise. A damaged or hand-edited file
    (not JSON, a missing field, a score that is not a finite number, a row of `index` missing) is refused
    with what is wrong: it is never overwritten, since it may not be a file dtrpo wrote."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable reference-scores file ({e}); {REDO}") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{path}: not a dtrpo reference-scores file (format {found!r})")
    problem = _layout_problem(saved)
    if problem:
        raise ValueError(f"{path}: damaged reference-scores file ({problem}); {REDO}")
    differ = [k for k in want if saved["fingerprint"].get(k) != want[k]]
    if saved["epochs"] < epochs:
        differ.append(f"epochs ({saved['epochs']} saved, {epochs} planned)")
    if differ:
        raise ValueError(
            f"{path}: precomputed reference scores do not match this run ({', '.join(differ)} differ); delete the "
            "file to recompute it, or name another file with --ref_log_probs_file"
        )
    problem = _scores_problem(saved["scores"], epochs, index)
    if problem:
        raise ValueError(f"{path}: damaged reference-scores file ({problem}); {REDO}")
    return {int(k): [tuple(x) for x in v[:epochs]] for k, v in saved["scores"].items()}


REDO = "delete it to recompute the scores, or name another file with --ref_log_probs_file"


def _layout_problem(saved: dict) -> str | None:
    if not isinstance(saved.get("fingerprint"), dict):
        return "no 'fingerprint' object"
    epochs = saved.get("epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        return f"'epochs' is {epochs!r}, not a positive integer"
    if not isinstance(saved.get("scores"), dict):
        return f"'scores' is {type(saved.get('scores')).__name__}, not an object of rows"
    return None


def _scores_problem(scores: dict, epochs: int, index: list[int] | None) -> str | None:
    """What is wrong with {row: [[chosen, rejected] per epoch]}: a row that is not an integer, too few epochs,
    a score that is not a finite number, a row of `index` without scores."""
    for key, per_epoch in scores.items():
        if not key.lstrip("-").isdigit():
            return f"row {key!r} is not a row index"
        if not isinstance(per_epoch, list) or len(per_epoch) < epochs:
            return f"row {key}: expected a list of {epochs} [chosen, rejected] pairs, got {per_epoch!r:.80}"
        for epoch, pair in enumerate(per_epoch[:epochs]):
            ok = isinstance(pair, list) and len(pair) == 2
            if not (ok and all(_finite(x) for x in pair)):
                return f"row {key}, epoch {epoch}: expected two finite scores [chosen, rejected], got {pair!r:.80}"
    missing = sorted(set(index or ()) - {int(k) for k in scores})
    if missing:
        return f"no scores for rows {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def save_scores(path: Path, want: dict, epochs: int, scores: dict[int, list[tuple[float, float]]]) -> None:
    """Write the scores and their fingerprint (aside, then renamed, so a crash leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    body = {"format": FORMAT, "fingerprint": want, "epochs": epochs, "scores": {str(k): v for k, v in scores.items()}}
    tmp.write_text(json.dumps(body))
    tmp.replace(path)
