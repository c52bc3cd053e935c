"""One row per pair (the prompt once, chosen and rejected behind it, each response's last clean block
dropped) gives the packed layout's log-probabilities, on every grid and shift, with mixed prompt and
response lengths in one batch."""

from dataclasses import replace

import pytest
import torch

from dtrpo.estimators import Batch, EstimatorConfig, draw, position_logprobs, score
from dtrpo.masking import pair_layout
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


def check(adapter, model, absolute):
    p, c, r = zip(*CASES, strict=True)
    batch, noisy = pairs_batch(p, c, r, adapter.mask_token_id, adapter.block_size, absolute)
    with torch.no_grad():
        want, _ = position_logprobs(adapter, model, batch, noisy, batch.response_valid, "packed")
        got, _ = position_logprobs(adapter, model, replace(batch, pairs=True), noisy, batch.response_valid, "packed")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    return batch, noisy


@pytest.mark.parametrize("shifted", [False, True])
def test_response_grid_tiny_model(tiny, shifted):
    policy, _, adapter = tiny
    check(replace(adapter, shifted=shifted), policy, absolute=False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_absolute_grid_families(family_models, family):  # noqa: F811
    model, _, adapter = family_models[family]
    check(adapter, model, absolute=True)


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
