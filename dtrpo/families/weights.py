"""Writing weight files: one model.safetensors, or shards with their index. Below every family module, so that a
family writing its own tiny checkpoint (`llada2.init_tiny`) and the loader that imports every family share it
without an import circle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_safetensors(tensors: dict[str, torch.Tensor], output: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors shards plus their index when large."""
    shards, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name], size = t.detach().contiguous().cpu(), size + n
    if len(shards) == 1:
        save_file(shards[0], output / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, output / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
