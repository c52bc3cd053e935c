"""Long sequences: the dense mask is refused with the reason above its size limit (not left to run out
of memory), and activation checkpointing gives the packed layout's gradients exactly."""

import pytest
import torch

import dtrpo.models
from dtrpo.estimators import EstimatorConfig, draw, score
from dtrpo.families import load_model
from dtrpo.models import init_tiny
from tests.test_estimators import make_batch


def test_dense_mask_over_the_limit_is_refused_with_the_reason(tiny, tokenizer, monkeypatch):
    policy, _, adapter = tiny
    batch, *_ = make_batch(tokenizer)
    monkeypatch.setattr(dtrpo.models, "DENSE_MASK_BYTES", 1000)  # this batch's packed mask: 3 x 29^2 bytes
    with pytest.raises(ValueError, match=r"dense attention mask .* \(3 rows of 29 columns.*flex_attention"):
        score(adapter, policy, batch, draw(adapter, batch, [1, 2, 3], EstimatorConfig()))


def test_activation_checkpointing_keeps_the_packed_gradients(tmp_path, tokenizer):
    path = init_tiny(tmp_path / "tiny", block_size=4, hidden_size=32)
    grads = []
    for checkpointing in (False, True):
        model, _, adapter = load_model(path, gradient_checkpointing=checkpointing)
        model.train()
        batch, *_ = make_batch(tokenizer)
        value, _ = score(adapter, model, batch, draw(adapter, batch, [1, 2, 3], EstimatorConfig(steps_per_block=2)))
        value.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4)


def test_eager_and_sdpa_attention_give_the_same_packed_log_probs(tmp_path, tokenizer):
    """The additive mask is what both backends add: eager (plain softmax of QK^T + mask) gives SDPA's numbers."""
    path = init_tiny(tmp_path / "tiny", block_size=4, hidden_size=32)
    batch, *_ = make_batch(tokenizer)
    got = {}
    for backend in ("sdpa", "eager"):
        model, _, adapter = load_model(path, attn_implementation=backend)
        states = draw(adapter, batch, [1, 2, 3], EstimatorConfig(steps_per_block=2))
        with torch.no_grad():
            got[backend], _ = score(adapter, model, batch, states)
    torch.testing.assert_close(got["eager"], got["sdpa"], atol=1e-5, rtol=0)
