"""Every family decodes by its own rule unless told otherwise (`dtrpo.decoding`): each family's defaults as its
public sampler sets them, resolved from a checkpoint folder, a flag overriding one of them, the line printed at
the start, and `generate` / `eval` / lm-eval decoding by the rule with no sampler flags (Fast-dLLM v2: against the
rule written alone in test_fast_dllm_rule)."""

from __future__ import annotations

import json

import pytest
import torch

from dtrpo.decoding import describe, folder_family, given, resolve
from dtrpo.evaluate import SamplingArgs, encode_prompts, sample_texts
from dtrpo.families import load_model
from dtrpo.sampler import generate
from tests.families.test_fast_dllm_rule import GEN, reference_decode
from tests.families.test_llada2 import write_llada2
from tests.families.test_loading import WRITERS, write_fast_dllm
from tests.test_cli import cli

# (steps_per_block, remasking, threshold, sub_block_size, fix_first_token), read from each family's public sampler:
EXPECTED = {
    # ML-GSAI/LLaDA generate.py: steps = gen_length in blocks of 32 (one token a step), low_confidence
    "llada": (None, "low_confidence", None, None, False),
    # DreamLM/Dream README: diffusion_generate(steps = max_new_tokens, alg="entropy")
    "dream": (None, "entropy", None, None, False),
    # JetAstra/SDAR generate.py: block_length 4 = denoising_steps 4, low_confidence_dynamic, threshold 0.85
    "sdar": (None, "low_confidence", 0.85, None, False),
    # NVlabs/Fast-dLLM v2 run_chatbot.py: small_block_size 8, threshold 0.9; batch_sample fixes the first token
    "fast_dllm_v2": (None, "low_confidence", 0.9, 8, True),
    # inclusionAI/dFactory modeling_llada2_moe.py generate: block_length 32 = steps 32, threshold 0.95
    "llada2": (None, "low_confidence", 0.95, None, False),
    # the tiny model: one token a step by confidence (dtrpo's sampler as before)
    "native": (None, "low_confidence", None, None, False),
}
FIELDS = ("steps_per_block", "remasking", "threshold", "sub_block_size", "fix_first_token")


def settings(s: SamplingArgs) -> tuple:
    return tuple(getattr(s, name) for name in FIELDS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    from dtrpo.models import init_tiny

    root = tmp_path_factory.mktemp("decoding")
    torch.manual_seed(0)
    folders = {name: write(root / name) for name, write in WRITERS.items()}
    folders["llada2"] = write_llada2(root / "llada2")
    folders["native"] = init_tiny(root / "tiny", block_size=4)
    return folders


@pytest.mark.parametrize("family", list(EXPECTED))
def test_each_family_resolves_to_its_public_samplers_settings(checkpoints, family):
    assert folder_family(checkpoints[family]) == family  # from config.json, before any weight loads
    _, _, adapter = load_model(checkpoints[family])
    assert adapter.family == family
    resolved = resolve(SamplingArgs(), adapter.family)
    assert settings(resolved) == EXPECTED[family]
    assert resolve(resolved, family) == resolved  # resolving again changes nothing


def test_a_flag_overrides_one_setting_and_zero_switches_off():
    want = EXPECTED["fast_dllm_v2"]
    assert settings(resolve(SamplingArgs(threshold=0.5), "fast_dllm_v2")) == (*want[:2], 0.5, *want[3:])
    assert settings(resolve(SamplingArgs(fix_first_token=False), "fast_dllm_v2")) == (*want[:4], False)
    assert settings(resolve(SamplingArgs(remasking="margin"), "dream"))[1] == "margin"
    # the threshold off drops the family's sub-blocks too (they need one), unless a flag sets them
    assert settings(resolve(SamplingArgs(threshold=0), "fast_dllm_v2")) == (None, "low_confidence", 0, 0, True)
    assert settings(resolve(SamplingArgs(threshold=0, sub_block_size=4), "fast_dllm_v2"))[3] == 4
    assert settings(resolve(SamplingArgs(threshold=0.7), "llada")) == (None, "low_confidence", 0.7, None, False)


def test_the_printed_line():
    asked = SamplingArgs(threshold=0.5)
    line = describe(resolve(asked, "fast_dllm_v2"), "fast_dllm_v2", given(asked))
    assert line == (
        "decoding (fast_dllm_v2 defaults unless a flag): steps_per_block block size (one token a step), remasking "
        "low_confidence, threshold 0.5 (flag), sub_block_size 8, fix_first_token true"
    )
    line = describe(resolve(SamplingArgs(), "llada"), "llada", [])
    assert "threshold off, sub_block_size off, fix_first_token false" in line and "(flag)" not in line


# ----------------------------------------------------------------------------- Fast-dLLM v2 decoded by its rule


@pytest.fixture(scope="module")
def fast_dllm(tmp_path_factory):
    """A tiny Fast-dLLM v2 (blocks of 8, as test_fast_dllm_rule's reference) sharpened so that the 0.9 threshold
    is passed at some positions and not at others."""
    torch.manual_seed(0)
    path = write_fast_dllm(tmp_path_factory.mktemp("fdllm") / "ckpt", bd_size=8)
    model, tokenizer, adapter = load_model(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    return path, model, tokenizer, adapter


PROMPTS = ["hello there", "a", "the quick brown fox jumps", "12345678"]


def test_no_sampler_flags_decode_by_the_rule_written_alone(fast_dllm):
    _, model, tokenizer, adapter = fast_dllm
    s = SamplingArgs(gen_length=GEN, batch_size=2)
    texts, _ = sample_texts(model, tokenizer, adapter, PROMPTS, s, seed=0)
    ids, _ = encode_prompts(tokenizer, PROMPTS, s, adapter)
    want = [reference_decode(model, p, 8, adapter.mask_token_id) for p in ids]
    assert texts == [tokenizer.decode(w, skip_special_tokens=True) for w in want]
    generic = dict(gen_length=GEN, steps_per_block=8)  # the sampler's plain rule differs on these prompts
    assert generate(adapter, model, ids, **generic).sequences != want


def test_generate_prints_the_line_and_a_flag_overrides(fast_dllm, capsys):
    path, _, _, _ = fast_dllm
    model, tokenizer, adapter = load_model(path)  # the saved (unsharpened) weights the command reads
    base = ["generate", "--model_name_or_path", path, "--prompt", "hello there", "--gen_length", GEN]
    for flags, threshold in (((), 0.9), (("--threshold", 0.5), 0.5)):
        res = cli(*base, *flags, capsys=capsys)
        marked = " (flag)" if flags else ""
        assert f"remasking low_confidence, threshold {threshold}{marked}, sub_block_size 8, fix_first_token true" in (
            res.stderr
        )
        ids, _ = encode_prompts(tokenizer, ["hello there"], SamplingArgs(gen_length=GEN), adapter)
        rule = dict(threshold=threshold, sub_block_size=8, fix_first_token=True)
        out = generate(adapter, model, ids, GEN, 8, eos_token_id=tokenizer.eos_token_id, **rule)
        printed = json.loads(res.stdout.splitlines()[0])
        assert printed["response"] == tokenizer.decode(out.sequences[0], skip_special_tokens=True)


def test_eval_prints_the_generic_line_for_the_tiny_model(checkpoints, capsys):
    res = cli("eval", "--model_name_or_path", checkpoints["native"], "--n", 2, "--gen_length", 4, capsys=capsys)
    assert "decoding (native defaults unless a flag): steps_per_block block size" in res.stderr
    assert "accuracy" in res.stdout


def test_lm_eval_takes_the_family_rule(fast_dllm, caplog):
    pytest.importorskip("lm_eval")
    from dtrpo.harness import DTRPOLM

    path = fast_dllm[0]
    with caplog.at_level("INFO", logger="lm_eval.models.dtrpo"):
        lm = DTRPOLM(pretrained=str(path))
    assert settings(lm.decoding) == EXPECTED["fast_dllm_v2"]
    assert {k: lm.sampling[k] for k in ("threshold", "sub_block_size", "fix_first_token")} == {
        "threshold": 0.9,
        "sub_block_size": 8,
        "fix_first_token": True,
    }
    assert "decoding (fast_dllm_v2 defaults unless a flag)" in caplog.text
    lm = DTRPOLM(pretrained=str(path), threshold=0, fix_first_token=False)  # off, and one flag
    assert (lm.sampling["threshold"], lm.sampling["sub_block_size"], lm.sampling["fix_first_token"]) == (
        None,
        None,
        False,
    )
