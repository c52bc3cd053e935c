"""Bad input of every kind gets one line naming the file, the row or key, and what is wrong; nothing is lost."""

import pytest

from dtrpo.options import parse
from dtrpo.run import TrainScript
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


# ----------------------------------------------------------------------------- data


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return text


def test_lone_surrogate_in_training_or_eval_text_names_file_line_and_field(tmp_path, tokenizer):
    from dtrpo.data import build_preference_dataset
    from dtrpo.tasks import load_task

    data = tmp_path / "pairs.jsonl"
    text = write(
        data,
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "x\\ud83d", "rejected": "c"}\n',
    )
    with pytest.raises(ValueError) as e:
        build_preference_dataset(str(data), tokenizer, 4)
    assert str(e.value) == f"{data}: line 2: field 'chosen' holds a lone surrogate '\\ud83d' at character 2"
    prompts = tmp_path / "prompts.jsonl"
    write(prompts, '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "\\ud83d", "answer": "2"}\n')
    with pytest.raises(ValueError, match=rf"^{prompts}: line 2: field 'prompt' holds a lone surrogate"):
        load_task(str(prompts))
    assert data.read_text(encoding="utf-8") == text  # nothing rewritten


def test_deeply_nested_json_is_one_line(tmp_path, tokenizer):
    from dtrpo.data import build_sft_dataset

    data = tmp_path / "sft.jsonl"
    write(data, '{"prompt": "a", "completion": "b"}\n{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(ValueError, match=rf"^{data}: line 2: JSON nested too deeply to read$"):
        build_sft_dataset(str(data), tokenizer, 4)
    listed = tmp_path / "sft.json"
    write(listed, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=rf"^{listed}: JSON nested too deeply to read$"):
        build_sft_dataset(str(listed), tokenizer, 4)


def test_dataset_dict_rows_and_damaged_arrow_files_name_the_folder(tmp_path, tokenizer):
    """A split of a `save_to_disk` folder is named by its folder, not `<memory>`; a truncated Arrow file names
    the folder and the reader's complaint."""
    import datasets

    from dtrpo.data import _dataset, build_preference_dataset

    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3 + [{"prompt": "a", "chosen": None, "rejected": "c"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'dd' / 'train'}: row 4: field 'chosen' is missing$"):
        build_preference_dataset(_dataset(str(tmp_path / "dd"), "train"), tokenizer, 4)
    (arrow,) = (tmp_path / "dd" / "train").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'dd'}: not a readable dataset folder \(a damaged file\?"):
        _dataset(str(tmp_path / "dd"), "train")


def test_special_token_text_in_user_data_stays_text(tokenizer):
    """A literal "<mask>" or "<eos>" in a prompt or response is its characters, never the token; a chat keeps its
    template's own EOS (after an earlier assistant turn) and only that one."""
    from dtrpo.data import build_preference_dataset

    chars = lambda s: [tokenizer.convert_tokens_to_ids(c) for c in s]  # noqa: E731 - the char tokenizer: one id a char
    rows = [
        {"prompt": "a<mask>", "chosen": "<eos>b", "rejected": "c"},
        {
            "prompt": [
                {"role": "user", "content": "x<eos>"},
                {"role": "assistant", "content": "y"},
                {"role": "user", "content": "z"},
            ],
            "chosen": [{"role": "assistant", "content": "<mask>"}],
            "rejected": [{"role": "assistant", "content": "w"}],
        },
    ]
    ds, _ = build_preference_dataset(rows, tokenizer, 4, max_response_length=16)
    eos = tokenizer.eos_token_id
    assert ds[0]["prompt_ids"] == chars("a<mask>") and ds[0]["chosen_ids"][:6] == chars("<eos>b")
    assert ds[1]["prompt_ids"] == chars("User: x<eos>\nAssistant: y") + [eos] + chars("\nUser: z\nAssistant: ")
    assert ds[1]["chosen_ids"][:6] == chars("<mask>") and tokenizer.mask_token_id not in ds[1]["chosen_ids"]


def test_special_token_text_in_an_eval_prompt_stays_text(tokenizer):
    from dtrpo.evaluate import encode_prompt

    ids, _ = encode_prompt(tokenizer, "1+<mask>=", chat=True)
    assert tokenizer.mask_token_id not in ids and tokenizer.decode(ids) == "User: 1+<mask>=\nAssistant: "


def test_unknown_chat_role_is_refused(tokenizer):
    from dtrpo.data import build_sft_dataset

    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 3
    rows.append({"messages": [{"role": "usr", "content": "a"}, {"role": "assistant", "content": "b"}]})
    with pytest.raises(ValueError, match=r"^<memory>: row 4: field 'messages\[0\]' has the unknown role 'usr'"):
        build_sft_dataset(rows, tokenizer, 4)


# ----------------------------------------------------------------------------- models


def test_tokenizer_or_mask_token_beyond_the_models_vocabulary_is_refused_at_load(tmp_path, capsys):
    """Before: an IndexError deep in the embedding at the first train or generate step."""
    import json

    from dtrpo.families import load_model
    from dtrpo.models import init_tiny, load_tokenizer
    from tests.test_cli import cli

    init_tiny(tmp_path / "tiny", block_size=4)
    tokenizer = load_tokenizer(tmp_path / "tiny")
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "tiny")
    assert str(e.value) == (
        f"{tmp_path / 'tiny'}: the tokenizer has 101 tokens but the model's vocabulary has 100 ids: any id from 100 "
        "up would fail; use the tokenizer saved with this model"
    )
    init_tiny(tmp_path / "masked", block_size=4)
    config = json.loads((tmp_path / "masked" / "config.json").read_text())
    (tmp_path / "masked" / "config.json").write_text(json.dumps({**config, "mask_token_id": 100}))
    res = cli("generate", "--model_name_or_path", tmp_path / "masked", "--prompt", "1+1=", ok=False, capsys=capsys)
    assert res.stderr.strip().endswith(
        f"error: {tmp_path / 'masked'}: mask_token_id 100 is outside the model's vocabulary of 100 ids (0-99)"
    )
    (tmp_path / "masked" / "config.json").write_text('{"architectures": ')
    res = cli("generate", "--model_name_or_path", tmp_path / "masked", "--prompt", "1+1=", ok=False, capsys=capsys)
    assert f"error: {tmp_path / 'masked' / 'config.json'}: not valid JSON (Expecting value" in res.stderr


def test_gen_length_past_the_models_positions_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    """The tiny model has 4096 positions: `--gen_length 4096` after any prompt would not fit (before: eval ran for
    more than 600 s). The check comes before the first sampler call."""
    import dtrpo.evaluate
    from dtrpo.models import init_tiny
    from tests.test_cli import cli

    init_tiny(tmp_path / "tiny", block_size=8)
    monkeypatch.setattr(dtrpo.evaluate, "generate", lambda *a, **k: pytest.fail("sampled"))
    args = ("--model_name_or_path", tmp_path / "tiny", "--gen_length", 4096)
    res = cli("eval", *args, "--task", "arithmetic:digits=2", "--n", 2, ok=False, capsys=capsys)
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: --gen_length 4096 after a prompt of ") and line.endswith(
        "over the model's max_position_embeddings=4096: use --gen_length 4088 or less"
    )
    res = cli("generate", *args, "--prompt", "1+1=", ok=False, capsys=capsys)
    assert "error: --gen_length 4096 after a prompt of 4 tokens needs 4100 positions, over the model's " in res.stderr
