"""Loading a model folder: detect its family from config.json and hand back (model, tokenizer, adapter).

Families:
- `native`: a transformers-native causal LM marked as a diffusion LM in its config (`mask_token_id`,
  `block_size`), such as the built-in tiny model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dtrpo.models import ModelAdapter, load_native, read_config_json

LOADERS = {"native": load_native}


def detect_family(config: dict, path: str | Path = "") -> str:
    """The family of a checkpoint from its config.json contents."""
    if "dtrpo_family" in config:
        return config["dtrpo_family"]
    if "block_size" in config and "mask_token_id" in config:
        return "native"
    raise ValueError(
        f"{path}/config.json: unknown model family (model_type={config.get('model_type')!r}); "
        f"known families: {sorted(LOADERS)}; pass --family to choose one"
    )


def load_model(path: str | Path, family: str | None = None, dtype: torch.dtype = torch.float32):
    """Load a local checkpoint folder; returns (model, tokenizer, adapter). No remote code runs."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    family = family or detect_family(read_config_json(path), path)
    if family not in LOADERS:
        raise ValueError(f"unknown model family {family!r}; known families: {sorted(LOADERS)}")
    model, tokenizer, adapter = LOADERS[family](path, dtype=dtype)
    assert isinstance(adapter, ModelAdapter)
    return model, tokenizer, adapter
