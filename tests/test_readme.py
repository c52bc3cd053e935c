"""Every `dtrpo` command line in the README names a real command and only flags that command takes."""

import re
import shlex
from pathlib import Path

import pytest

from dtrpo.cli import COMMANDS, main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    out = []
    for line in lines:
        words = shlex.split(line.split("#")[0])
        for i, w in enumerate(words):
            command = i == 0 or words[i - 1] in ("&&", ";", "|") or "/" in w  # not `--model dtrpo`
            if w.endswith("dtrpo") and command and i + 1 < len(words):
                out.append(words[i + 1 :])
    return out


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def test_readme_commands_use_real_commands_and_flags(capsys):
    commands = readme_commands()
    assert {c[0] for c in commands} >= {"demo", "init-tiny", "sft", "eval", "pairs", "train", "generate", "bench"}
    for words in commands:
        assert words[0] in COMMANDS, words
        flags = {w.split("=")[0] for w in words if w.startswith("--")}
        text = help_text(words[0], capsys)
        for flag in flags - {"--any_field"}:
            name = "--output_dir" if flag == "--output" and "--output_dir" in text else flag
            assert re.search(re.escape(name) + r"\b", text), f"README: dtrpo {words[0]} has no flag {flag}"
