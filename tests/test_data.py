import json

import datasets
import pytest
import torch

from dtrpo.data import (
    PreferenceCollator,
    SFTCollator,
    build_preference_dataset,
    build_sft_dataset,
    load_rows,
    tokenize_preference,
)

PAD, EOS, NEWLINE = 0, 1, 99  # the char tokenizer's ids; a printable character c has id ord(c) - 28


def ids(text: str) -> list[int]:
    return [NEWLINE if c == "\n" else ord(c) - 28 for c in text]


def text(token_ids) -> str:
    return "".join({EOS: "<eos>", NEWLINE: "\n"}.get(i) or chr(i + 28) for i in token_ids)


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def bot(content: str) -> dict:
    return {"role": "assistant", "content": content}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- collators


def test_preference_collator_pads_prompts_left_and_responses_right_to_one_length():
    features = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [10, 1], "rejected_ids": [12, 13, 14, 1], "index": 4},
        {"prompt_ids": [8], "chosen_ids": [15, 16, 17, 18, 19, 1], "rejected_ids": [20, 1], "index": 9},
    ]
    out = PreferenceCollator(pad_token_id=PAD, block_size=2)(features)
    assert out["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert out["prompt_valid"].tolist() == [[True, True, True], [False, False, True]]
    # R = 6: the longest of chosen and rejected over the batch
    assert out["chosen_ids"].tolist() == [[10, 1, 0, 0, 0, 0], [15, 16, 17, 18, 19, 1]]
    assert out["chosen_valid"].tolist() == [[True, True, False, False, False, False], [True] * 6]
    assert out["rejected_ids"].tolist() == [[12, 13, 14, 1, 0, 0], [20, 1, 0, 0, 0, 0]]
    assert out["rejected_valid"].tolist() == [[True] * 4 + [False] * 2, [True] * 2 + [False] * 4]
    assert out["index"].tolist() == [4, 9]
    assert out["index"].dtype == torch.long and out["prompt_ids"].dtype == torch.long
    assert out["prompt_valid"].dtype == torch.bool


def test_sft_collator_pads_exactly():
    features = [
        {"prompt_ids": [5], "response_ids": [10, 11, 1, 1], "index": 0},
        {"prompt_ids": [6, 7], "response_ids": [12, 1], "index": 3},
    ]
    out = SFTCollator(pad_token_id=PAD, block_size=2)(features)
    assert out["prompt_ids"].tolist() == [[0, 5], [6, 7]]
    assert out["prompt_valid"].tolist() == [[False, True], [True, True]]
    assert out["response_ids"].tolist() == [[10, 11, 1, 1], [12, 1, 0, 0]]
    assert out["response_valid"].tolist() == [[True, True, True, True], [True, True, False, False]]
    assert out["index"].tolist() == [0, 3]


def test_collator_refuses_responses_off_the_block_grid():
    features = [{"prompt_ids": [5], "chosen_ids": [10, 1, 1], "rejected_ids": [11, 1, 1, 1], "index": 7}]
    with pytest.raises(ValueError, match="index 7: chosen_ids has 3 tokens, not a multiple of block_size=4"):
        PreferenceCollator(PAD, 4)(features)


# ----------------------------------------------------------------------------- files

ROWS = [{"prompt": "Q: 1+1", "chosen": "2", "rejected": "3"}, {"prompt": "Q: 2+2", "chosen": "4", "rejected": "5"}]


def _write(tmp_path, fmt: str) -> str:
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", ROWS)
    if fmt == "json-list":
        (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
        return str(tmp_path / "d.json")
    if fmt == "json-lines":
        return write_jsonl(tmp_path / "d.json", ROWS)
    if fmt == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "d")
    return str(tmp_path / "d")


@pytest.mark.parametrize("fmt", ["jsonl", "json-list", "json-lines", "parquet", "save_to_disk"])
def test_every_file_format_round_trips(tmp_path, fmt):
    assert load_rows(_write(tmp_path, fmt)).to_list() == ROWS


def test_rows_of_mixed_types_fail_to_load_as_one_table_but_validate_row_by_row(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [ROWS[0], {"prompt": [user("hi")], "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match=r"mixed\.jsonl: rows do not fit one table"):
        load_rows(path)
    with pytest.raises(ValueError, match=r"mixed\.jsonl: line 2: field 'chosen' must be a list of messages"):
        build_preference_dataset(path, tokenizer, block_size=4)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"d\.csv: unknown data format '\.csv'"):
        load_rows(tmp_path / "d.csv")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3: not valid JSON"):
        load_rows(tmp_path / "bad.jsonl")
    (tmp_path / "list.json").write_text('[{"prompt": "a"}, 3]')
    with pytest.raises(ValueError, match=r"list\.json: line 1: expected a JSON object"):
        load_rows(tmp_path / "list.json")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)}
    ).save_to_disk(tmp_path / "dd")
    with pytest.raises(ValueError, match=r"dd: holds splits \['test', 'train'\]"):
        load_rows(tmp_path / "dd")


# ----------------------------------------------------------------------------- preference rows


def test_standard_rows_tokenize_with_eos_padding_to_the_block(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q:", "chosen": "ab", "rejected": "abcd"}])
    ds, stats = build_preference_dataset(path, tokenizer, block_size=4)
    row = ds[0]
    assert row["prompt_ids"] == ids("Q:")  # no special tokens added
    assert row["chosen_ids"] == ids("ab") + [EOS, EOS]  # 2 + EOS = 3 -> 4
    assert row["rejected_ids"] == ids("abcd") + [EOS] * 4  # 4 + EOS = 5 -> 8
    assert row["index"] == 0
    assert stats == {"rows": 1, "kept": 1, "identical_dropped": 0, "prompts_truncated": 0, "responses_truncated": 0}


def test_conversational_rows_render_the_prompt_with_the_chat_template(tokenizer):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, user("hi")],
            "chosen": [bot("hello")],
            "rejected": [bot("go")],
        }
    ]
    ds, _ = build_preference_dataset(rows, tokenizer, block_size=4)
    assert text(ds[0]["prompt_ids"]) == "System: Be brief.\nUser: hi\nAssistant: "
    assert text(ds[0]["chosen_ids"]) == "hello<eos><eos><eos>"
    assert text(ds[0]["rejected_ids"]) == "go<eos><eos>"


def test_implicit_prompt_strings_split_at_the_longest_common_prefix(tokenizer):
    rows = [{"chosen": "The sky is blue", "rejected": "The sky is green"}]
    ds, _ = build_preference_dataset(rows, tokenizer, block_size=2)
    assert text(ds[0]["prompt_ids"]) == "The sky is "
    assert text(ds[0]["chosen_ids"]) == "blue<eos><eos>"
    assert text(ds[0]["rejected_ids"]) == "green<eos>"


def test_implicit_prompt_messages_share_all_but_the_last_message(tokenizer):
    turns = [
        user("a"),
        bot("b"),
        user("c"),
    ]
    rows = [
        {
            "chosen": turns + [bot("yes")],
            "rejected": turns + [bot("no")],
        }
    ]
    ds, _ = build_preference_dataset(datasets.Dataset.from_list(rows), tokenizer, block_size=4)
    # the earlier assistant turn ends with EOS as the template writes it, tokenized as the EOS token
    assert text(ds[0]["prompt_ids"]) == "User: a\nAssistant: b<eos>\nUser: c\nAssistant: "
    assert text(ds[0]["chosen_ids"]) == "yes<eos>"
    assert text(ds[0]["rejected_ids"]) == "no<eos><eos>"


def test_identical_pairs_are_dropped_with_one_warning_and_counted(tokenizer, tmp_path):
    rows = [
        {"prompt": "p", "chosen": "x", "rejected": "y"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"chosen": "same text", "rejected": "same text"},
        {"prompt": "q", "chosen": "z", "rejected": "w"},
    ]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.warns(
        UserWarning, match=r"dup\.jsonl: dropped 2 of 4 rows whose chosen equals rejected \(lines 2, 3\)"
    ):
        ds, stats = build_preference_dataset(path, tokenizer, block_size=2)
    assert ds["index"] == [0, 3]  # original row numbers survive the drop
    assert (stats["rows"], stats["kept"], stats["identical_dropped"]) == (4, 2, 2)


def test_tokenize_preference_marks_what_it_truncated(tokenizer):
    out = tokenize_preference(
        "Question: x", "ab", "abcdefghij", tokenizer, 4, max_prompt_length=3, max_response_length=8
    )
    assert out["prompt_ids"] == ids(": x")  # the LAST three tokens
    assert out["chosen_ids"] == ids("ab") + [EOS, EOS]
    assert out["rejected_ids"] == ids("abcdefgh")  # first 8 tokens, no EOS
    assert out["prompt_truncated"] is True and out["responses_truncated"] == 1


def test_truncate_policy_keeps_the_first_tokens_and_counts(tokenizer):
    rows = [
        {"prompt": "long prompt", "chosen": "abcdefg", "rejected": "abcdefgh"},  # 7 + EOS fits; 8 + EOS does not
        {"prompt": "p", "chosen": "x", "rejected": "abcdefghijk"},
    ]
    ds, stats = build_preference_dataset(rows, tokenizer, 4, max_prompt_length=4, max_response_length=8)
    assert ds["prompt_ids"] == [ids("ompt"), ids("p")]
    assert ds[0]["chosen_ids"] == ids("abcdefg") + [EOS]
    assert ds[0]["rejected_ids"] == ids("abcdefgh")  # the EOS no longer fits: truncated
    assert ds[1]["rejected_ids"] == ids("abcdefgh")
    assert (stats["prompts_truncated"], stats["responses_truncated"]) == (1, 2)


def test_error_policy_names_the_row_field_and_lengths(tokenizer, tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "abcdefghij", "rejected": "b"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    match = r"long\.jsonl: line 2: field 'chosen' is 11 tokens with its EOS, over max_response_length=8"
    with pytest.raises(ValueError, match=match):
        build_preference_dataset(path, tokenizer, 4, max_response_length=8, truncation="error")


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"max_response_length": 6}, "max_response_length"),
        ({"max_response_length": 0}, "max_response_length"),
        ({"max_prompt_length": 0}, "max_prompt_length"),
        ({"truncation": "drop"}, "truncation"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_bad_limits_name_the_option(tokenizer, kwargs, flag):
    args = {"block_size": 4, **kwargs}
    with pytest.raises(ValueError, match=flag):
        build_preference_dataset(ROWS, tokenizer, **args)


USER = [user("hi")]
BAD_PREFERENCE_ROWS = [
    ({"prompt": "p", "rejected": "b"}, "'chosen' is missing"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, "'rejected' is missing"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a list of messages, got int"),
    ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "'chosen' must be a string"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "'rejected' is empty"),
    ({"prompt": [], "chosen": [], "rejected": []}, "'prompt' is empty"),
    ({"prompt": USER, "chosen": [user("a")], "rejected": [bot("b")]}, "'chosen' must end with an assistant message"),
    ({"prompt": USER, "chosen": "a", "rejected": "b"}, "'chosen' must be a list of messages, got str"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, r"'prompt\[0\]' must be a message"),
    ({"chosen": "abc", "rejected": "xyz"}, "'chosen' shares no prefix"),
    ({"chosen": "abc", "rejected": "abcd"}, "'chosen' is empty"),
    ({"chosen": "abc", "rejected": [bot("b")]}, "'rejected' must have the type"),
    (
        {"chosen": USER + [bot("a")], "rejected": [user("yo"), bot("b")]},
        "'rejected' must repeat every message of 'chosen' but the last",
    ),
    ({"chosen": [bot("a")], "rejected": [bot("b")]}, "'chosen' needs prompt messages"),
]


@pytest.mark.parametrize(("row", "problem"), BAD_PREFERENCE_ROWS)
def test_bad_preference_rows_name_file_row_and_field(tokenizer, tmp_path, row, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: field " + problem):
        build_preference_dataset(path, tokenizer, block_size=4)


def test_in_memory_rows_are_named_memory(tokenizer):
    with pytest.raises(ValueError, match="<memory>: row 1: field 'chosen' is missing"):
        build_preference_dataset([{"prompt": "p", "rejected": "b"}], tokenizer, block_size=4)


def test_all_rows_identical_is_an_error(tokenizer):
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable rows"):
        build_preference_dataset([{"prompt": "p", "chosen": "a", "rejected": "a"}], tokenizer, block_size=4)


# ----------------------------------------------------------------------------- SFT rows


def test_sft_rows_in_every_form(tokenizer, tmp_path):
    rows = [
        {"prompt": "Q: hi", "completion": "abc"},
        {"prompt": "Q: yo", "response": "de"},  # alias
        {"messages": USER + [bot("hello")]},
        {"prompt": USER, "completion": [bot("x")]},
    ]
    ds, stats = build_sft_dataset(write_jsonl(tmp_path / "sft.jsonl", rows), tokenizer, block_size=4)
    assert [text(p) for p in ds["prompt_ids"]] == ["Q: hi", "Q: yo", "User: hi\nAssistant: ", "User: hi\nAssistant: "]
    assert [text(r) for r in ds["response_ids"]] == [
        "abc<eos>",
        "de<eos><eos>",
        "hello<eos><eos><eos>",
        "x<eos><eos><eos>",
    ]
    assert ds["index"] == [0, 1, 2, 3]
    assert stats == {"rows": 4, "kept": 4, "prompts_truncated": 0, "responses_truncated": 0}


def test_sft_truncation_both_policies(tokenizer, tmp_path):
    rows = [{"prompt": "abcdef", "completion": "0123456789"}]
    ds, stats = build_sft_dataset(rows, tokenizer, 4, max_prompt_length=2, max_response_length=4)
    assert ds[0]["prompt_ids"] == ids("ef") and ds[0]["response_ids"] == ids("0123")
    assert (stats["prompts_truncated"], stats["responses_truncated"]) == (1, 1)
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    match = r"sft\.jsonl: line 1: field 'completion' is 11 tokens .* max_response_length=4"
    with pytest.raises(ValueError, match=match):
        build_sft_dataset(path, tokenizer, 4, max_response_length=4, truncation="error")


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "p"}, "'completion' is missing"),
        ({"completion": "a"}, "'prompt' is missing"),
        ({"prompt": "p", "completion": ""}, "'completion' is empty"),
        ({"prompt": "p", "response": 5}, "'response' must be a string"),
        ({"messages": USER}, "'messages' needs prompt messages and an assistant response"),
        ({"messages": USER + USER}, "'messages' must end with an assistant message"),
    ],
)
def test_bad_sft_rows_name_file_row_and_field(tokenizer, tmp_path, row, problem):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}, row])
    with pytest.raises(ValueError, match=r"sft\.jsonl: line 2: field " + problem):
        build_sft_dataset(path, tokenizer, block_size=4)


def test_built_datasets_feed_the_collators(tokenizer):
    ds, _ = build_preference_dataset(ROWS, tokenizer, block_size=4)
    batch = PreferenceCollator(tokenizer.pad_token_id, 4)(list(ds))
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape == (2, 4)
    assert batch["index"].tolist() == [0, 1]
    sft, _ = build_sft_dataset([{"prompt": "p", "completion": "abcd"}], tokenizer, block_size=4)
    assert SFTCollator(tokenizer.pad_token_id, 4)(list(sft))["response_ids"].tolist() == [ids("abcd") + [EOS] * 4]
