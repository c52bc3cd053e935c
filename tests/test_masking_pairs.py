"""One row per pair (the prompt once, chosen and rejected behind it, each response's last clean block
dropped) gives the packed layout's log-probabilities, on every grid and shift, with mixed prompt and
response lengths in one batch; so do several pairs packed into one row (padding-free)."""

from dataclasses import replace

import pytest
import torch

from dtrpo import masking
from dtrpo.estimators import Batch, EstimatorConfig, draw, position_logprobs, score
from dtrpo.masking import pack_bins, pair_layout
from tests.families.test_grid import FAMILIES, family_models  # noqa: F401  (fixture)


def pairs_batch(prompt_lens, chosen_lens, rejected_lens, mask_id, bs, absolute, seed=0):
    """n pairs stacked as 2n rows (chosen first), responses ending on the grid, a random noisy state."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 60, (p,), generator=g).tolist() for p in prompt_lens]

    def response(p, nb):
        lead = p % bs if absolute else 0
        return torch.randint(10, 60, (nb * bs - lead,), generator=g).tolist()

    responses = [response(p, nb) for p, nb in zip(prompt_lens, chosen_lens, strict=True)]
    responses += [response(p, nb) for p, nb in zip(prompt_lens, rejected_lens, strict=True)]
    P, R = max(prompt_lens), max(map(len, responses))
    prompt_rows = [[0] * (P - len(p)) + p for p in prompts] * 2
    batch = Batch(
        torch.tensor(prompt_rows),
        torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts] * 2),
        torch.tensor([r + [0] * (R - len(r)) for r in responses]),
        torch.tensor([[True] * len(r) + [False] * (R - len(r)) for r in responses]),
    )
    masked = (torch.rand(batch.response_ids.shape, generator=g) < 0.5) & batch.response_valid
    return batch, torch.where(masked, mask_id, batch.response_ids)


CASES = [(5, 2, 3), (8, 1, 2), (7, 3, 1), (3, 2, 2)]  # prompt length, chosen blocks, rejected blocks


def check(adapter, model, absolute, pack=False, cases=CASES):
    p, c, r = zip(*cases, strict=True)
    batch, noisy = pairs_batch(p, c, r, adapter.mask_token_id, adapter.block_size, absolute)
    shared = replace(batch, pairs=True, pack=pack)
    with torch.no_grad():
        want, _ = position_logprobs(adapter, model, batch, noisy, batch.response_valid, "packed")
        got, cost = position_logprobs(adapter, model, shared, noisy, batch.response_valid, "packed")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    return cost


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("shifted", [False, True])
def test_response_grid_tiny_model(tiny, shifted, pack):
    policy, _, adapter = tiny
    check(replace(adapter, shifted=shifted), policy, absolute=False, pack=pack)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_absolute_grid_families(family_models, family, pack):  # noqa: F811
    model, _, adapter = family_models[family]
    check(adapter, model, absolute=True, pack=pack)


def test_pack_bins_first_fit_decreasing():
    """[5, 3, 4, 2] into 6: 5 opens bin 0, 4 opens bin 1, 3 fits neither (1 and 2 left) and opens bin 2,
    2 goes to bin 1 (2 left); [7] alone is wider than the capacity and gets its own bin."""
    assert pack_bins([5, 3, 4, 2], 6) == [[0], [2, 3], [1]]
    assert pack_bins([7, 1], 6) == [[0], [1]]
    assert pack_bins([2, 2, 2], 6) == [[0, 1, 2]]


def test_packing_fills_rows_and_keeps_pairs_apart(tiny, monkeypatch):
    """Packing puts the 4 pairs in fewer rows with less padding, and the estimates hold only because no
    query sees another pair: with the pair part of the rule removed they change."""
    policy, _, adapter = tiny
    cases = [(5, 4, 4), (3, 1, 1), (4, 1, 2), (2, 1, 1)]  # one long pair, three short ones
    unpacked, packed = check(adapter, policy, False, cases=cases), check(adapter, policy, False, True, cases)
    assert packed.columns < unpacked.columns and packed.tokens == unpacked.tokens
    assert packed.padding_fraction < unpacked.padding_fraction
    monkeypatch.setattr(masking, "same_pair", lambda q, k: (k % 3 == 0) | (k == q))  # any pair's prompt
    with pytest.raises(AssertionError):
        check(adapter, policy, False, True, cases)


def test_fewer_columns_and_the_same_dtrpo_estimate(tiny):
    policy, ref, adapter = tiny
    p, c, r = zip(*CASES, strict=True)
    batch, noisy = pairs_batch(p, c, r, adapter.mask_token_id, 4, absolute=False)
    pl = pair_layout(
        batch.prompt_ids[:4], batch.prompt_valid[:4], batch.response_ids, batch.response_valid, noisy, 4, False, False
    )
    # packed: 8 rows of P + 2R = 8 + 24 columns; pairs: 4 rows of at most P + 2R_w + 2R_l - 2B real columns
    assert pl.layout.valid.sum() < 8 * (8 + 2 * 12) and pl.layout.input_ids.shape[0] == 4
    seeds = list(range(8))
    states = draw(adapter, batch, seeds, EstimatorConfig(steps_per_block=2))
    with torch.no_grad():
        a, _ = score(adapter, policy, batch, states)
        b, _ = score(adapter, policy, replace(batch, pairs=True), states)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_padding_free_training_gives_the_same_losses(tmp_path, tokenizer):
    """Two steps over 8 pairs, 2 long and 6 short: packing changes the padding, not the losses or rewards."""
    import copy

    from dtrpo.models import make_tiny_model
    from tests.test_trainer import make_args, train

    data = [
        {"prompt": f"{i}+{i}=", "chosen": "a" * (2 + 24 * (i % 4 == 0)), "rejected": "z" * (1 + i % 3)}
        for i in range(8)
    ]
    init = make_tiny_model(tokenizer, block_size=4)
    runs = [
        train(
            copy.deepcopy(init),
            tokenizer,
            make_args(tmp_path / str(p), max_steps=2, padding_free=p, per_device_train_batch_size=8),
            data,
        )
        for p in (False, True)
    ]
    (a, b) = ([h for h in r.state.log_history if "loss" in h] for r in runs)
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["rewards/margins"] - y["rewards/margins"]) < 1e-5
        assert 0 <= y["padding_fraction"] < x["padding_fraction"]


@pytest.mark.parametrize("absolute", [False, True])
def test_flex_rule_equals_the_dense_mask_on_packed_pairs(absolute):
    """The flex `mask_mod` (evaluated densely by torch's own `create_mask`) and the dense SDPA mask agree
    on every (query, key) of a padding-free batch, so the GPU path attends as the tested CPU path does."""
    from torch.nn.attention.flex_attention import create_mask

    cases = [(5, 4, 4), (3, 1, 1), (4, 1, 2), (2, 1, 1)]
    p, c, r = zip(*cases, strict=True)
    batch, noisy = pairs_batch(p, c, r, 99, 4, absolute)
    lay = pair_layout(
        batch.prompt_ids[:4], batch.prompt_valid[:4], batch.response_ids, batch.response_valid, noisy, 4, absolute,
        True, pack=True,
    ).layout  # fmt: skip
    assert lay.input_ids.shape[0] < 4  # pairs share rows
    for causal in (False, True):
        B, S = lay.input_ids.shape
        flex = create_mask(lay.mask_mod(causal, False), B, 1, S, S, device="cpu")
        assert torch.equal(flex, lay.dense_mask(causal, False))
