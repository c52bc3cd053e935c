"""Every family decodes by its own rule unless told otherwise.

A family's spec declares its public sampler's settings as `DecodingDefaults` (`dtrpo/families/spec.py`,
filled in each family's file). The sampler flags of `generate`, `eval`, `pairs`, `iterate` and the
`lm-eval` model_args are unset (None) by default; `resolve` gives each unset one the family's value, and
a flag given overrides that one setting only. `--threshold 0` and `--sub_block_size 0` switch a family's
threshold or sub-blocks off (the threshold off also drops the family's sub-blocks unless a flag sets
them, since sub-blocks need a threshold). The tiny model and native folders of no known family use
`GENERIC`: the block size in steps (one token a step), low-confidence remasking, nothing else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dtrpo.families.spec import DecodingDefaults

FIELDS = ("steps_per_block", "remasking", "threshold", "sub_block_size", "fix_first_token")
GENERIC = DecodingDefaults(source="dtrpo: one token a step by confidence")


def family_defaults(family: str) -> DecodingDefaults:
    """The decoding defaults of a family by name (`ModelAdapter.family`); GENERIC for any other."""
    from dtrpo.families import FAMILIES

    spec = FAMILIES.get(family)
    return spec.decoding if spec is not None else GENERIC


def folder_family(path: str | Path, family: str | None = None) -> str:
    """The family a model folder loads as (`--family` first), read from its config.json without loading it: a
    native folder (the tiny model, a native export) by the family it records."""
    from dtrpo.families import detect_family
    from dtrpo.models import read_config_json

    if family:
        return family
    config = read_config_json(Path(path))
    found = detect_family(config, path)
    return str(config.get("dtrpo_family", "native")) if found == "native" else found


def given(s) -> list[str]:
    """The decoding settings a flag (or a preset, or the caller) set on unresolved sampler settings `s`."""
    return [name for name in FIELDS if getattr(s, name) is not None]


def resolve(s, family: str):
    """Sampler settings `s` (a `SamplingArgs`) with every unset decoding setting taken from `family`'s defaults.
    Idempotent: a resolved value is never None where the family's is not, and 0 stays 0 (off)."""
    defaults = family_defaults(family)
    values = {name: getattr(defaults, name) if getattr(s, name) is None else getattr(s, name) for name in FIELDS}
    if not values["threshold"] and s.sub_block_size is None and values["sub_block_size"]:
        values["sub_block_size"] = 0  # the family's sub-blocks need its threshold, switched off
    return dataclasses.replace(s, **values)


def sampler_kwargs(s) -> dict:
    """The decoding settings of resolved `s` as `sampler.generate` takes them (0: off, as None)."""
    return {
        "remasking": s.remasking,
        "threshold": s.threshold or None,
        "sub_block_size": s.sub_block_size or None,
        "fix_first_token": bool(s.fix_first_token),
    }


def describe(resolved, family: str, flags: list[str]) -> str:
    """The one line printed at the start: each decoding setting, the ones set by a flag marked."""

    def show(name: str) -> str:
        value = getattr(resolved, name)
        if name == "steps_per_block" and value is None:
            text = "block size (one token a step)"
        elif name in ("threshold", "sub_block_size") and not value:
            text = "off"
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
        return f"{name} {text}" + (" (flag)" if name in flags else "")

    return f"decoding ({family} defaults unless a flag): " + ", ".join(show(name) for name in FIELDS)


def announce(s, family: str, say) -> object:
    """`s` resolved against `family`'s rule (`resolve`), with its one line (`describe`) handed to `say`: what
    `generate`, `eval`, `pairs`, `iterate` and the lm-eval model each do at their start."""
    resolved = resolve(s, family)
    say(describe(resolved, family, given(s)))
    return resolved
