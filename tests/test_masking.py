"""Re-masking draws and the attention rule, against hand-written expectations."""

import pytest
import torch

from dtrpo.masking import CLEAN, NOISY, PROMPT, Layout, draw_block_states, example_seed, packed_layout

MASK = 99


def test_packed_mask_three_parts_by_hand():
    # prompt of 1 token, response of 2 blocks of 1 token: columns [x, C0, C1, N0, N1]
    layout = packed_layout(
        torch.tensor([[5]]),
        torch.tensor([[True]]),
        torch.tensor([[6, 7]]),
        torch.tensor([[True, True]]),
        torch.tensor([[MASK, MASK]]),
        block_size=1,
    )
    want = torch.tensor(
        [
            # x  C0 C1 N0 N1
            [1, 0, 0, 0, 0],  # x: prompt only
            [1, 1, 0, 0, 0],  # C0: prompt, C0
            [1, 1, 1, 0, 0],  # C1: prompt, C0, C1
            [1, 0, 0, 1, 0],  # N0: prompt, itself
            [1, 1, 0, 0, 1],  # N1: prompt, C0 (b' < b), itself
        ],
        dtype=torch.bool,
    )
    assert torch.equal(layout.dense_mask(prompt_causal=False, full=False)[0, 0], want)
    assert layout.position_ids.tolist() == [[0, 1, 2, 1, 2]]  # the noisy copy reuses the clean positions


def test_padding_never_attended_and_no_empty_rows():
    layout = Layout(
        input_ids=torch.zeros(1, 4, dtype=torch.long),
        position_ids=torch.zeros(1, 4, dtype=torch.long),
        kind=torch.tensor([[PROMPT, PROMPT, CLEAN, NOISY]]),
        block=torch.tensor([[-1, -1, 0, 0]]),
        valid=torch.tensor([[False, True, True, True]]),
        clean_start=2,
        noisy_start=3,
        response_len=1,
        block_size=1,
        tail=torch.zeros(1, dtype=torch.long),
    )
    m = layout.dense_mask(prompt_causal=True, full=False)[0, 0]
    assert not m[1:, 0].any()  # the padded prompt column is never attended by a real row
    assert m[0].tolist() == [True, False, False, False]  # the padded row attends only itself
    assert m.any(-1).all()


def test_newly_unmasked_counts_and_state():
    ids = torch.arange(16).view(1, 16) + 10
    valid = torch.ones(1, 16, dtype=torch.bool)
    st = draw_block_states(ids, valid, [3], MASK, block_size=8, steps=4, t_fixed=2)
    # T_B = 4, k = 2: at t = 2, n_before = (4 - 2) * 2 = 4 clean, 2 newly unmasked, 2 still masked per block
    blocks = (st.noisy_ids == MASK).view(2, 8)
    assert blocks.sum(-1).tolist() == [4, 4]
    assert st.newly.view(2, 8).sum(-1).tolist() == [2, 2]
    assert (st.weights[st.newly] == 4).all() and (st.weights[~st.newly] == 0).all()  # scale c = T_B
    assert (st.noisy_ids[st.newly] == MASK).all()


def test_left_to_right_and_confidence_orders():
    ids = torch.arange(4).view(1, 4) + 10
    valid = torch.ones(1, 4, dtype=torch.bool)
    st = draw_block_states(ids, valid, [0], MASK, 4, 4, order="left_to_right", t_fixed=3)  # 1 revealed, 1 new
    assert st.noisy_ids.tolist() == [[10, MASK, MASK, MASK]] and st.newly.tolist() == [[False, True, False, False]]
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.3]])  # reveal order: 1, 2, 3, 0
    st = draw_block_states(ids, valid, [0], MASK, 4, 4, order="confidence", confidence=conf, t_fixed=2)
    assert st.noisy_ids.tolist() == [[MASK, 11, 12, MASK]] and st.newly.tolist() == [[False, False, False, True]]


def test_all_masked_weighted_weights():
    ids = torch.arange(8).view(1, 8)
    st = draw_block_states(
        ids, torch.ones(1, 8, dtype=torch.bool), [0], MASK, 8, 4, targets="all_masked_weighted", t_fixed=3, scale=1
    )
    # t = 3: n_before = 2, |M_t| = 6 masked, k = 2: weight k / |M_t| = 1/3 on each masked position
    assert torch.allclose(st.weights[st.noisy_ids == MASK], torch.full((6,), 1 / 3))
    assert (st.weights[st.noisy_ids != MASK] == 0).all()


def test_draws_are_seeded_per_example_and_invalid_blocks_ignored():
    ids = torch.arange(16).view(2, 8)
    valid = torch.tensor([[True] * 8, [True] * 4 + [False] * 4])
    a = draw_block_states(ids, valid, [5, 6], MASK, 4, 2)
    b = draw_block_states(ids[:1], valid[:1], [5], MASK, 4, 2)
    assert torch.equal(a.noisy_ids[:1], b.noisy_ids)  # example 0's draw does not depend on its batch mates
    assert (a.weights[1, 4:] == 0).all()
    assert example_seed(0, 1, 0, "chosen") == example_seed(0, 1, 0, "chosen") != example_seed(0, 1, 0, "rejected")


def test_bad_options():
    ids, valid = torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="steps_per_block=3 must divide block_size=8"):
        draw_block_states(ids, valid, [0], MASK, 8, 3)
    with pytest.raises(ValueError, match="reveal_order"):
        draw_block_states(ids, valid, [0], MASK, 8, 4, order="sideways")
    with pytest.raises(ValueError, match="targets"):
        draw_block_states(ids, valid, [0], MASK, 8, 4, targets="everything")
    with pytest.raises(ValueError, match="steps_per_block must be positive"):
        draw_block_states(ids, valid, [0], MASK, 8, 0)


def test_an_examples_draw_does_not_depend_on_its_batch_width():
    """The reference precomputed in one batch and the policy scored in another must see the same state:
    an example's draw depends on its seed and its own length, not on the batch's padded width R."""
    ids = torch.arange(8).view(1, 8) + 10
    alone = draw_block_states(ids, torch.ones(1, 8, dtype=torch.bool), [5], MASK, 4, 2)
    wide = torch.cat([ids, torch.zeros(1, 8, dtype=torch.long)], 1)
    valid = torch.tensor([[True] * 8 + [False] * 8])
    padded = draw_block_states(wide, valid, [5], MASK, 4, 2)
    assert torch.equal(padded.noisy_ids[:, :8], alone.noisy_ids)
    assert torch.equal(padded.weights[:, :8], alone.weights) and (padded.weights[:, 8:] == 0).all()


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("prompt_causal, full", [(False, False), (True, False), (False, True)])
def test_dense_mask_by_runs_equals_the_rule_token_by_token(absolute, prompt_causal, full):
    """`dense_mask` evaluates the rule once per run of equal descriptors; torch's `create_mask` evaluates
    the flex `mask_mod` (the same rule) at every (query, key). They agree on padded packed and single
    layouts with mixed prompt and response lengths."""
    from torch.nn.attention.flex_attention import create_mask

    from dtrpo.masking import packed_layout, single_layout
    from tests.test_masking_pairs import pairs_batch

    batch, noisy = pairs_batch((5, 3, 7, 2), (2, 1, 3, 1), (1, 2, 1, 3), 99, 4, absolute)
    args = (batch.prompt_ids, batch.prompt_valid, batch.response_ids, batch.response_valid)
    for lay in (packed_layout(*args, noisy, 4, absolute), single_layout(*args, 4, absolute)):
        B, S = lay.input_ids.shape
        want = create_mask(lay.mask_mod(prompt_causal, full), B, 1, S, S, device="cpu")
        assert torch.equal(lay.dense_mask(prompt_causal, full), want)
