"""The CLI commands of the whole loop, end to end on the tiny model: init-tiny, sft, eval, pairs, generate,
train with LoRA, export."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from dtrpo.cli import main


def cli(*args, ok=True, capsys=None):
    """Runs `dtrpo ARGS` in this process; returns returncode, stdout and stderr like subprocess.run."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 2
        if not isinstance(exit.code, int):
            print(exit.code, file=sys.stderr)
    out, err = capsys.readouterr() if capsys else ("", "")
    if ok:
        assert code == 0, err[-3000:]
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    cli("init-tiny", "--output", tmp / "tiny", "--block_size", 8)
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(10, 40)]
    (tmp / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli(
        "sft",
        "--model_name_or_path",
        tmp / "tiny",
        "--dataset_name",
        tmp / "sft.jsonl",
        "--output",
        tmp / "sft",
        "--max_steps",
        3,
        "--per_device_train_batch_size",
        8,
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
    )
    return tmp


def test_eval_pairs_generate_commands(sft_model, capsys):
    tmp = sft_model
    cli(
        "eval",
        "--model_name_or_path",
        tmp / "sft",
        "--task",
        "arithmetic:digits=2",
        "--n",
        10,
        "--gen_length",
        16,
        "--output",
        tmp / "eval.json",
    )
    report = json.loads((tmp / "eval.json").read_text())
    assert report["n"] == 10 and 0 <= report["ci95"][0] <= report["accuracy"] <= report["ci95"][1] <= 1
    assert report["nfe_per_batch"] > 0 and report["tokens_per_second"] > 0
    out = cli(
        "pairs",
        "--model_name_or_path",
        tmp / "sft",
        "--task",
        "arithmetic:digits=2",
        "--n",
        6,
        "--samples",
        4,
        "--temperature",
        1.0,
        "--gen_length",
        16,
        "--output",
        tmp / "pairs.jsonl",
        capsys=capsys,
    )
    assert "pairs" in out.stdout
    for line in (tmp / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["chosen_score"] > row["rejected_score"] and row["provenance"]["samples"] == 4
    out = cli("generate", "--model_name_or_path", tmp / "sft", "--prompt", "12+12=", "--gen_length", 16, capsys=capsys)
    assert '"prompt": "12+12="' in out.stdout and "NFE" in out.stdout


def test_bad_sampler_settings_are_clear_errors(sft_model, capsys):
    out = cli(
        "generate",
        "--model_name_or_path",
        sft_model / "sft",
        "--prompt",
        "1+1=",
        "--steps_per_block",
        3,
        ok=False,
        capsys=capsys,
    )
    assert out.returncode != 0 and "error:" in out.stderr and "Traceback" not in out.stderr
    out = cli("eval", "--model_name_or_path", sft_model / "sft", "--task", "nope.jsonl", ok=False, capsys=capsys)
    assert out.returncode != 0 and "nope.jsonl" in out.stderr


def test_lora_train_then_export(sft_model, capsys):
    from dtrpo.families import load_model

    tmp = sft_model
    rows = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(8)]
    (tmp / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli(
        "train",
        "--model_name_or_path",
        tmp / "sft",
        "--dataset_name",
        tmp / "p.jsonl",
        "--output",
        tmp / "lora",
        "--lora_r",
        4,
        "--max_steps",
        2,
        "--per_device_train_batch_size",
        4,
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
        "--learning_rate",
        1e-2,
        capsys=capsys,
    )
    base, _, _ = load_model(tmp / "sft")
    merged, _, adapter = load_model(tmp / "lora")  # the merged model, loadable like any checkpoint
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all(("proj" in n) for n in changed)  # only LoRA-targeted projections moved
    cli(
        "export",
        "--model_name_or_path",
        tmp / "lora",
        "--output",
        tmp / "exported",
        "--format",
        "native",
        capsys=capsys,
    )
    again, _, adapter2 = load_model(tmp / "exported")
    assert adapter2 == adapter
    assert all(torch.equal(p, merged.state_dict()[n]) for n, p in again.named_parameters())


def test_old_output_flag_of_train_warns_and_fills_output_dir(tmp_path, capsys):
    """`--output` where the folder is `--output_dir` works for one release; eval keeps its own `--output` file."""
    from dtrpo.models import init_tiny
    from tests.test_trainer import PAIRS

    init_tiny(tmp_path / "tiny", block_size=4)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    flags = ["--max_steps", 1, "--per_device_train_batch_size", 4, "--use_cpu", "true", "--report_to", "none"]
    data = ["--model_name_or_path", tmp_path / "tiny", "--dataset_name", tmp_path / "pairs.jsonl"]
    res = cli("train", *data, "--output", tmp_path / "out", *flags, capsys=capsys)
    assert "warning: --output is deprecated; use --output_dir" in res.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    res = cli("train", *data, f"--output_dir={tmp_path / 'new'}", *flags, capsys=capsys)
    assert "deprecated" not in res.stderr and (tmp_path / "new" / "model.safetensors").is_file()
    res = cli("eval", "--model_name_or_path", tmp_path / "out", "--task", "arithmetic:digits=1", "--n", 2,
              "--gen_length", 4, "--output", tmp_path / "eval.json", capsys=capsys)  # fmt: skip
    assert "deprecated" not in res.stderr and (tmp_path / "eval.json").is_file()
