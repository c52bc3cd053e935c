"""Bad input of every kind gets one line naming the file, the row or key, and what is wrong; nothing is lost."""

import pytest

from dtrpo.cli import TrainScript, parse
from dtrpo.trainer import DTRPOConfig


def parse_preset(tmp_path, text: str):
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return parse([TrainScript, DTRPOConfig], ["--config", str(path), "--output_dir", str(tmp_path)], "dtrpo train", "")


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_steps: 2\nbeta: [1, 2\n", "line 3: not a valid YAML preset (expected ','"),
        ("beta: !!python/object/apply:os.system ['echo hi']\n", "line 1: not a valid YAML preset (could not determine"),
        ("beta: 0.1\nmax_steps: 2.5\n", "line 2: max_steps must be int, got float 2.5"),
        ("loss_type: 5\n", "line 1: loss_type must be a list of str, got int 5"),
        ("beta: yes please\n", "line 1: beta must be float, got str 'yes please'"),
        ("estimator: foo\n", "estimator must be one of 'dtrpo', 'vrpo', 'meanfield', 'trajectory', got str 'foo'"),
        ("use_peft: 1\n", "line 1: use_peft must be bool, got int 1"),
        ("- max_steps\n", "a preset is a mapping of field: value, got list"),
    ],
)
def test_bad_preset_is_one_line_naming_file_line_key_and_type(tmp_path, text, message):
    with pytest.raises(SystemExit) as e:
        parse_preset(tmp_path, text)
    assert str(e.value).startswith(f"error: {tmp_path / 'preset.yaml'}") and message in str(e.value), e.value
    assert "\n" not in str(e.value)


def test_preset_values_of_the_right_type_pass(tmp_path):
    """An int for a float, a scalar for a list (the config wraps it), a string argparse converts, an enum's value."""
    text = "beta: 1\nloss_type: sigmoid\nmax_steps: '3'\nlr_scheduler_type: cosine\nlearning_rate: 2.0e-4\n"
    script, config = parse_preset(tmp_path, text)
    assert config.beta == 1 and config.loss_type == ["sigmoid"] and config.max_steps == 3
    assert config.lr_scheduler_type == "cosine" and config.learning_rate == 2e-4
