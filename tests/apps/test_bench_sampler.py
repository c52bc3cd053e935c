"""`dtrpo bench sampler` end to end at a tiny size: the report's shape, and forward counts that follow
from the decoding rule (autoregressive: one per token; one token per step without a cache: one per
position; k per step: one per k positions)."""

import json
from pathlib import Path

import pytest

from dtrpo.apps.bench_sampler import (
    FULL_ONLY,
    SETTINGS,
    BenchSamplerArgs,
    format_before_after,
    format_table,
    run_bench,
)
from dtrpo.cli import main

B, NEW = 8, 16  # block size; new tokens of the fixed workload: two blocks


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    args = BenchSamplerArgs(
        models=f"block_causal:16x1:4x{NEW},full:16x1:4x{NEW}",
        models_dir=str(tmp_path_factory.mktemp("models")),
        heldout=4,
        batch_size=2,
        repeats=2,
        block_size=B,
        sft_examples=16,
        sft_steps=2,
        sft_check_every=100,
    )
    logs = []
    return args, run_bench(args, log=logs.append), logs


def test_report_has_every_arm_with_sane_numbers(bench):
    args, report, _ = bench
    assert report["threads"] == args.threads and set(report["models"]) == {"block_causal_16x1", "full_16x1"}
    for name, m in report["models"].items():
        arms = set(m["task"]["arms"]) - {"autoregressive"}
        other = FULL_ONLY if name.startswith("block") else ("one_per_step_no_cache",)
        assert arms | set(m["settings_not_in_sampler"]) == set(SETTINGS) - set(other)
        assert m["task"]["n"] == 4 and m["task"]["gen_length"] == 16  # answers of 10 tokens with EOS: two blocks
        for workload in ("task", "fixed"):
            for arm, r in m[workload]["arms"].items():
                assert r["tokens_per_second"] > 0 and len(r["seconds_repeats"]) == args.repeats, (name, arm)
                assert min(r["seconds_repeats"]) <= r["seconds"] <= max(r["seconds_repeats"])  # their median
        ar = m["task"]["arms"]["autoregressive"]
        assert ar["ratio_to_autoregressive"] == 1.0 and ar["accuracy_meaningful"] is False
        assert ar["nfe_per_batch"] == 16 and ar["positions"] == 4 * 16  # EOS does not stop it: whole blocks' worth
        for arm, r in m["task"]["arms"].items():  # the sampler decodes whole blocks: at most two, at least one
            assert 4 * 8 <= r["positions"] <= 4 * 16 and r["tokens"] <= r["positions"], (name, arm)
        for arm, r in m["task"]["arms"].items():
            assert 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1, (name, arm)
        assert m["task"]["arms"]["one_per_step"]["accuracy_minus_one_per_step"]["difference"] == 0


def test_forwards_follow_the_decoding_rule(bench):
    _, report, _ = bench
    steps, blocks = NEW, NEW // B  # the fixed workload ignores EOS: every block is decoded
    for name, m in report["models"].items():
        fixed = m["fixed"]["arms"]
        ar = fixed["autoregressive"]
        assert ar["nfe_per_batch"] == NEW and ar["tokens_per_forward"] == 1.0  # HF generate: a forward per token
        exact = fixed["one_per_step_no_cache" if name.startswith("block") else "one_per_step"]
        assert exact["nfe_per_batch"] == steps and exact["tokens_per_forward"] == 1.0
        if name.startswith("block"):  # the KV cache may add a prefill and a commit per block, no more
            assert steps <= fixed["one_per_step"]["nfe_per_batch"] <= steps + blocks
            assert steps // 2 <= fixed["two_per_step"]["nfe_per_batch"] <= steps // 2 + blocks
        else:
            assert fixed["two_per_step"]["nfe_per_batch"] == steps // 2
            assert fixed["two_per_step"]["tokens_per_forward"] == 2.0
        for arm in ("threshold_0.7", "threshold_0.9", "fast_dllm_v2_sub4"):  # at least one reveal per step
            assert blocks <= fixed[arm]["nfe_per_batch"] <= steps + blocks, (name, arm)


def test_checkpoints_are_reused(bench):
    args, _, logs = bench
    assert any(line.startswith("SFT of") for line in logs)
    marker = next(iter(Path(args.models_dir).glob("*/bench_sft.json")))
    before = marker.stat().st_mtime_ns
    again = []
    run_bench(BenchSamplerArgs(**{**vars(args), "models": "block_causal:16x1", "repeats": 1}), log=again.append)
    assert any(line.startswith("reusing") for line in again) and not any(line.startswith("SFT of") for line in again)
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text())["steps"] == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--models", "block_causal:96"], "--models: 'block_causal:96'"),
        (["--models", "sliding:96x3"], "--models: 'sliding:96x3'"),
        (["--settings", "one_per_step,fast"], "--settings: unknown setting 'fast'"),
        (["--settings", "two_per_step"], "--settings must include 'one_per_step'"),
        (["--heldout", "0"], "--heldout must be positive"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "sampler", *flags])
    assert message in str(err.value)


def test_before_after_table_pairs_each_setting(bench):
    _, report, _ = bench
    before = json.loads(json.dumps(report))
    del before["models"]["full_16x1"]["task"]["arms"]["two_per_step"]  # a setting the older sampler lacked
    table = format_before_after(before, report)
    row = next(line for line in table.splitlines() if line.startswith("| one_per_step |"))
    ratio = report["models"]["block_causal_16x1"]["task"]["arms"]["one_per_step"]["ratio_to_autoregressive"]
    assert f"| {ratio:.2f} -> {ratio:.2f} |" in row
    assert any(line.startswith("| two_per_step | - -> ") for line in table.splitlines())


def test_table_has_a_row_per_arm_with_its_ratio(bench):
    _, report, _ = bench
    lines = format_table(report).splitlines()
    for m in report["models"].values():
        for arm, r in m["task"]["arms"].items():
            assert any(
                line.startswith(f"| {arm} | ") and f"| {r['ratio_to_autoregressive']:.2f} |" in line for line in lines
            )
