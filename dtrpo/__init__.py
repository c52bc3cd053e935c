"""dtrpo: trajectory-reduced preference optimization (dTRPO) for masked diffusion language models.

    from dtrpo import DTRPOConfig, DTRPOTrainer, load_model

Names are imported on first use, so `import dtrpo` stays cheap.
"""

from __future__ import annotations

import importlib

__all__ = ["DTRPOConfig", "DTRPOTrainer", "DiffusionSFTConfig", "DiffusionSFTTrainer", "load_model"]
_WHERE = {
    "DTRPOConfig": "dtrpo.trainer",
    "DTRPOTrainer": "dtrpo.trainer",
    "DiffusionSFTConfig": "dtrpo.sft",
    "DiffusionSFTTrainer": "dtrpo.sft",
    "load_model": "dtrpo.families",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'dtrpo' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
