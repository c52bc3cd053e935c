"""Options from dataclasses: one flag per field (one help line each), a YAML preset (`--config`) that overrides their
defaults, flags that override the preset, and one-line errors naming the flag, the key or the file.

    config, = parse([MyArgs], sys.argv[1:], "prog", "what it does")
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import sys
import types
import typing
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser


def load_preset(path: str | Path, dataclass_types) -> dict:
    """A YAML preset as a dict, refusing malformed YAML, tags, keys that no config dataclass has (with a close
    match) and values of the wrong type (argparse applies preset values as defaults without converting them)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: config preset {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # line numbers of the keys, before any value is built
        preset = yaml.safe_load(text) or {}
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SystemExit(f"error: {path}:{where}: not a valid YAML preset ({problem})") from None
    if not isinstance(preset, dict):
        raise SystemExit(f"error: {path}: a preset is a mapping of field: value, got {type(preset).__name__}")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
    fields = {f.name: hint for t in dataclass_types for f, hint in _field_types(t)}
    for key, value in preset.items():
        where = f"{path}: line {lines[key]}" if key in lines else str(path)
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SystemExit(f"error: {where}: unknown config key {key!r}{hint}")
        if not _fits(value, fields[key]):
            raise SystemExit(
                f"error: {where}: {key} must be {_type_name(fields[key])}, got {type(value).__name__} {value!r}"
            )
    return preset


def _field_types(dataclass_type) -> list:
    """(field, resolved type) of a config dataclass; a type that cannot be resolved is `Any` (not checked)."""
    try:
        hints = typing.get_type_hints(dataclass_type)
    except Exception:  # noqa: BLE001 - a field annotation naming an optional dependency
        hints = {}
    return [(f, hints.get(f.name, typing.Any)) for f in dataclasses.fields(dataclass_type)]


def _fits(value, hint) -> bool:
    """Whether a YAML value can stand for a field of type `hint`: an int for a float, a scalar for a list (the
    config wraps it), a string that argparse converts with the field's type. Types not listed here pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return not args or all(_fits(v, args[0]) for v in items)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"))
    if hint in (int, float):
        if isinstance(value, str):
            return _converts(value, hint)
        return not isinstance(value, bool) and isinstance(value, (int, float) if hint is float else int)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in {m.value for m in hint} or isinstance(value, hint)
    return True


def _converts(text: str, kind: type) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


class OldOutputFlag(argparse.Action):
    """`--output` where the folder is `--output_dir`: still works for one release, with a warning. An exact
    option string wins over argparse's prefix matching, which finds `--output` ambiguous between the
    `--output_dir` and `--output-dir` that HfArgumentParser registers."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        print("warning: --output is deprecated; use --output_dir (removed in the next release)", file=sys.stderr)
        setattr(namespace, self.dest, value)


def parse(dataclass_types, argv: list[str], prog: str, description: str, shared: bool = False):
    """Dataclasses from `--config preset.yaml` plus command-line flags (flags win). With `shared`, a field that
    several dataclasses declare is one flag (the last dataclass's default and help) whose value each receives."""
    names = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    conflicts = {"conflict_handler": "resolve"} if shared else {}
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description, **conflicts)
    parser.add_argument("--config", help="YAML preset whose keys override the defaults below.")
    if known.config:
        parser.set_defaults(**load_preset(known.config, dataclass_types))
    if "output_dir" in names and "output" not in names:  # eval, pairs, bench and export keep their own --output
        parser.add_argument(
            "--output", dest="output_dir", action=OldOutputFlag, default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    args = rest + (["--config", known.config] if known.config else [])
    try:
        if shared:  # HfArgumentParser hands a value to the first dataclass only: each reads it here
            namespace, unknown = parser.parse_known_args(args)
            parsed = [_from_namespace(t, namespace) for t in dataclass_types]
        else:
            *parsed, _, unknown = parser.parse_args_into_dataclasses(args, return_remaining_strings=True)
    except ValueError as err:  # a config __post_init__ names the flag
        raise SystemExit(f"error: {err}") from None
    if unknown:
        refuse_unknown(unknown, names, prog)
    return parsed


def _from_namespace(dataclass_type, namespace):
    values = vars(namespace)
    return dataclass_type(**{f.name: values[f.name] for f in dataclasses.fields(dataclass_type) if f.init})


def refuse_unknown(unknown: list[str], names: set[str], prog: str) -> None:
    """An error for the first argument no dataclass takes, with the closest flag when one is close."""
    flags = sorted({f"--{n}" for n in names} | {"--config"})
    word = unknown[0].split("=")[0]
    if not word.startswith("-"):
        raise SystemExit(f"error: {prog}: unexpected argument {word!r} (flags take the form --name value)")
    close = difflib.get_close_matches(word, flags, n=1, cutoff=0.7)
    hint = f"; did you mean {close[0]}?" if close else f"; see {prog} --help"
    raise SystemExit(f"error: {prog}: unknown flag {word}{hint}")


def require(args, *names: str) -> None:
    missing = [n for n in names if getattr(args, n) in (None, "")]
    if missing:
        raise SystemExit("error: the following arguments are required: " + ", ".join(f"--{n}" for n in missing))


def deprecated(args, old: str, new: str) -> None:
    """An old flag still works for one release: its value moves to the new one, with a warning."""
    value = getattr(args, old)
    if value is not None:
        print(f"warning: --{old} is deprecated; use --{new} (removed in the next release)", file=sys.stderr)
        setattr(args, new, value)
        setattr(args, old, None)
