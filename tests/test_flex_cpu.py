"""The flex-attention path run on a CPU. FlexAttention runs *forward* on a CPU in torch 2.13 (its backward is
GPU-only), so every no-gradient pass through a model loaded with `attn_implementation="flex_attention"` (packed
pairs, the reference precompute, the trainer's evaluation, lm-eval's loglikelihood) is checked here against the
same pass under SDPA with the dense mask. By default flex_attention runs unfused (eager; seconds): the model's
BlockMask and transformers' flex backend are the real ones, only the kernel is not compiled. The compiled kernel,
as a GPU runs it, compiles for minutes on 2 shared CPU cores (140 s measured for the first case): `slow`."""

import json
from dataclasses import replace

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers.integrations.flex_attention import WrappedFlexAttention

from dtrpo.estimators import position_logprobs
from dtrpo.families import load_model
from dtrpo.models import init_tiny
from tests.families.test_loading import FLEX_SHAPES, WRITERS
from tests.test_masking_pairs import pairs_batch
from tests.test_trainer import PAIRS

BACKENDS = ("sdpa", "flex_attention")


@pytest.fixture(params=["unfused", pytest.param("compiled", marks=pytest.mark.slow)])
def flex(request, monkeypatch):
    """How flex_attention runs: unfused (torch's eager implementation) or compiled, as transformers calls it."""
    if request.param == "unfused":
        monkeypatch.setattr(WrappedFlexAttention, "__call__", lambda self: flex_attention)
        yield request.param
        return
    # torch 2.13's CPU flex kernel fails to build once dynamo recompiles it for dynamic shapes (C++ error:
    # 'cur_kvSplitSize0' was not declared): one static compile per shape instead
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
        yield request.param


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model at width 64 with 4 heads: head dimension 16, the least flex accepts."""
    root = tmp_path_factory.mktemp("flex_cpu")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return init_tiny(root / "tiny", block_size=4, hidden_size=64), root / "pairs.jsonl"


@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2"])
def test_flex_equals_sdpa_on_packed_pairs(family, flex, tmp_path):
    """Several pairs packed into one row on the absolute grid: the flex BlockMask gives the dense mask's log-probs
    (the `gpu` test of tests/families/test_loading.py, on the CPU)."""
    torch.manual_seed(0)
    path = WRITERS[family](tmp_path / family, **FLEX_SHAPES[family])
    p, c, r = zip(*[(5, 4, 4), (3, 1, 1), (4, 1, 2), (2, 1, 1)], strict=True)
    got = {}
    for attn in BACKENDS:
        model, _, adapter = load_model(path, attn_implementation=attn)
        adapter = adapter.with_block_size(4)
        batch, noisy = pairs_batch(p, c, r, adapter.mask_token_id, 4, True)
        batch = replace(batch, pairs=True, pack=True)
        with torch.no_grad():
            got[attn], _ = position_logprobs(adapter, model, batch, noisy, batch.response_valid, "packed")
    assert model.config._attn_implementation == "flex_attention"
    torch.testing.assert_close(got["flex_attention"], got["sdpa"], atol=1e-4, rtol=0)


def test_reference_precompute_and_evaluation_through_flex(tiny, flex, tmp_path):
    """The reference precompute and the trainer's evaluation loss (policy and live reference, both without
    gradients) under flex equal SDPA's; the flex model really gets BlockMasks."""
    from dtrpo import DTRPOConfig, DTRPOTrainer
    from dtrpo.masking import packed_layout

    path, data = tiny
    ref, loss = {}, {}
    for attn in BACKENDS:
        model, tokenizer, adapter = load_model(path, attn_implementation=attn)
        args = dict(output_dir=str(tmp_path / attn), use_cpu=True, report_to=[], disable_tqdm=True, steps_per_block=2)
        precompute = DTRPOConfig(
            **args, precompute_ref_log_probs=True, ref_log_probs_file=str(tmp_path / f"{attn}.json")
        )
        trainer = DTRPOTrainer(model, args=precompute, processing_class=tokenizer, train_dataset=str(data))
        ref[attn] = list(trainer.train_dataset["ref_chosen"]) + list(trainer.train_dataset["ref_rejected"])
        live = DTRPOConfig(**args, per_device_eval_batch_size=4)
        trainer = DTRPOTrainer(model, args=live, processing_class=tokenizer, eval_dataset=str(data))
        loss[attn] = trainer.evaluate()["eval_loss"]
        batch = trainer.data_collator([trainer.eval_dataset[0]])
        ids, valid = batch["chosen_ids"], batch["chosen_valid"]
        layout = packed_layout(batch["prompt_ids"], batch["prompt_valid"], ids, valid, ids, 4)
        assert isinstance(adapter.attention_mask(model, layout), BlockMask) == (attn == "flex_attention")
    torch.testing.assert_close(torch.tensor(ref["flex_attention"]), torch.tensor(ref["sdpa"]), atol=1e-4, rtol=0)
    assert loss["flex_attention"] == pytest.approx(loss["sdpa"], abs=1e-5)


def test_lm_eval_loglikelihood_through_flex(tiny, flex):
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from dtrpo.harness import DTRPOLM

    path, _ = tiny
    requests = [SimpleNamespace(args=("1+1=", "2")), SimpleNamespace(args=("12+3=", "15"))]
    got = {attn: DTRPOLM(pretrained=str(path), mc_samples=4, attn_implementation=attn) for attn in BACKENDS}
    assert got["flex_attention"].model.config._attn_implementation == "flex_attention"
    scores = {attn: [s for s, _ in lm.loglikelihood(requests)] for attn, lm in got.items()}
    assert scores["flex_attention"] == pytest.approx(scores["sdpa"], abs=1e-4)
