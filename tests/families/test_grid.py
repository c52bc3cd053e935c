"""The absolute block grid of SDAR/TraDo, Fast-dLLM v2 and LLaDA2, against the families' own attention.

The reference here shares no code with `dtrpo.masking`: from models.md ("Verified facts: how the
block-causal families attend"), a sequence of n tokens is cut into blocks of B counted from position
0, prompt included, and position q attends position k exactly when k // B <= q // B. A state of the
response's block b is the prompt, the response's earlier blocks clean, block b in its state (the
prompt tail, when the prompt ends inside the block, clean as the sampler holds it), and nothing after
block b. Every dtrpo layout (packed, exact, remasked) and every sampler step must give the logits this
one separate forward gives (1e-5), for every prompt remainder P % B, in mixed-length batches, on
loaded checkpoints of the three families (SDAR and LLaDA2 unshifted, Fast-dLLM v2 shifted).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dtrpo.data import PreferenceCollator, tokenize_preference
from dtrpo.estimators import Batch, EstimatorConfig, draw, position_logprobs, score
from dtrpo.families import load_model
from dtrpo.masking import draw_block_states
from dtrpo.sampler import generate
from tests.families.test_llada2 import write_llada2
from tests.families.test_loading import write_fast_dllm, write_sdar

BS = 4
PROMPT_LENS = (4, 5, 6, 7, 3)  # every remainder P % 4, and a prompt shorter than one block
FAMILIES = {"sdar": write_sdar, "fast_dllm_v2": write_fast_dllm, "llada2": write_llada2}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    torch.manual_seed(0)
    return {name: load_model(write(root / name)) for name, write in FAMILIES.items()}


def family_logits(model, ids: list[int], bs: int) -> torch.Tensor:
    """One forward of an unpadded sequence under the family's attention, the mask built by loops. (n, V)"""
    n = len(ids)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            mask[q, k] = k // bs <= q // bs
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=mask[None, None], position_ids=torch.arange(n)[None])
    return out.logits[0].float()


def grid_batch(prompt_lens, n_blocks, mask_id, pad=0, seed=0):
    """Prompts of the given lengths, responses that end on the absolute grid after n_blocks[i] response
    blocks (the first shared with the prompt tail), left/right padded; and a random noisy state."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 60, (p,), generator=g).tolist() for p in prompt_lens]
    responses = [
        torch.randint(10, 60, ((p // BS + nb) * BS - p,), generator=g).tolist()
        for p, nb in zip(prompt_lens, n_blocks, strict=True)
    ]
    P, R = max(prompt_lens), max(map(len, responses))
    batch = Batch(
        torch.tensor([[pad] * (P - len(p)) + p for p in prompts]),
        torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts]),
        torch.tensor([r + [pad] * (R - len(r)) for r in responses]),
        torch.tensor([[True] * len(r) + [False] * (R - len(r)) for r in responses]),
    )
    masked = torch.rand(batch.response_ids.shape, generator=g) < 0.6
    noisy = torch.where(masked & batch.response_valid, mask_id, batch.response_ids)
    return batch, prompts, responses, noisy


def reference_logprob(model, prompt, response, noisy_row, j, shifted, mode) -> float:
    """log p(response[j]) in the state the family's sampler is in when it decodes response token j."""
    P = len(prompt)
    b = (P + j) // BS  # absolute block of token j
    end = (b + 1) * BS - P  # response tokens up to the end of that block
    if mode == "remasked":  # every block in its own state at once, one pass
        state = noisy_row[: len(response)]
    else:
        start = b * BS - P  # response tokens before block b (negative: block b starts in the prompt)
        state = response[: max(start, 0)] + noisy_row[max(start, 0) : end]
    logits = family_logits(model, prompt + state, BS)
    read = P + j - 1 if shifted else P + j
    return F.log_softmax(logits[read], -1)[response[j]].item()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["packed", "exact", "remasked"])
def test_layouts_equal_the_familys_own_forward_for_every_remainder(family_models, family, mode):
    model, _, adapter = family_models[family]
    assert adapter.absolute_grid and adapter.block_size == BS
    batch, prompts, responses, noisy = grid_batch(PROMPT_LENS, (3, 2, 3, 1, 2), adapter.mask_token_id)
    with torch.no_grad():
        got, _ = position_logprobs(adapter, model, batch, noisy, batch.response_valid, mode)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        for j in range(len(r)):
            want = reference_logprob(model, p, r, noisy[i].tolist(), j, adapter.shifted, mode)
            assert abs(got[i, j].item() - want) < 1e-5, (family, mode, len(p), j)
    assert (got[~batch.response_valid] == 0).all()


def test_the_old_response_grid_differs_from_the_familys_forward(family_models):
    """The check above can fail: the same batch scored with blocks starting at the response and a
    token-causal prompt (dtrpo before the absolute grid) is measurably off the family's own forward."""
    from dataclasses import replace

    model, _, adapter = family_models["sdar"]
    batch, prompts, responses, noisy = grid_batch(PROMPT_LENS, (3, 2, 3, 1, 2), adapter.mask_token_id)
    old = replace(adapter, prompt_attention="causal")
    with torch.no_grad():
        got, _ = position_logprobs(old, model, batch, noisy, batch.response_valid, "packed")
    i, p, r = 1, prompts[1], responses[1]  # P % B = 1
    diffs = [
        abs(got[i, j].item() - reference_logprob(model, p, r, noisy[i].tolist(), j, False, "packed"))
        for j in range(len(r))
    ]
    assert max(diffs) > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("use_cache", [True, False])
def test_sampler_steps_equal_the_familys_own_forward(family_models, family, use_cache):
    """Each step's logits equal one family forward of the canvas as it stands at that step: earlier
    blocks final, the block's revealed positions final and the rest [MASK], the prompt tail inside the
    first block. The canvas is rebuilt from the tokens and the step each position was revealed at."""
    model, _, adapter = family_models[family]
    prompts = [list(range(10, 10 + n)) for n in PROMPT_LENS]
    out = generate(
        adapter, model, prompts, gen_length=2 * BS, steps_per_block=2, use_cache=use_cache, output_logits=True
    )
    k = 2  # tokens per step
    assert out.lengths == [2 * BS + (BS - n % BS) % BS for n in PROMPT_LENS]  # up to the end of a block
    it = iter(out.step_logits)
    for b in range(out.blocks):
        slots = [[(n // BS + b) * BS + s - n for s in range(BS)] for n in PROMPT_LENS]  # response column per slot
        todo = [sum(0 <= c < out.lengths[i] for c in row) for i, row in enumerate(slots)]
        for step in range(-(-max(todo) // k)):
            logits = next(it)  # (B, BS, V)
            for i, (prompt, row) in enumerate(zip(prompts, slots, strict=True)):
                seq, when = out.sequences[i], out.reveal_step[i]
                if row[0] >= out.lengths[i]:  # this example's response ended a block earlier
                    continue
                end = row[-1] + 1
                state = [
                    seq[c] if c < row[0] or (c >= row[0] and when[c] < step) else adapter.mask_token_id
                    for c in range(end)
                ]
                ref = family_logits(model, prompt + state, BS)
                for s, c in enumerate(row):
                    if 0 <= c < out.lengths[i] and when[c] >= step:  # still masked: its logits are read
                        read = len(prompt) + c - 1 if adapter.shifted else len(prompt) + c
                        torch.testing.assert_close(logits[i, s], ref[read], atol=1e-5, rtol=0)
    assert next(it, None) is None


def test_fast_dllm_v2_decoding_rule(family_models):
    """Sub-blocks of 2 left to right (threshold 1.0: exactly the most confident position per step),
    and each block's first token revealed at the block's first step."""
    model, _, adapter = family_models["fast_dllm_v2"]
    prompts = [list(range(10, 18)), list(range(10, 17))]  # P % B = 0 and 3
    kw = dict(gen_length=2 * BS, steps_per_block=BS, threshold=1.0, sub_block_size=2, fix_first_token=True)
    out = generate(adapter, model, prompts, use_cache=True, **kw)
    again = generate(adapter, model, prompts, use_cache=False, **kw)
    assert out.sequences == again.sequences and out.reveal_step == again.reveal_step
    steps = out.reveal_step[0]  # P = 8: two full blocks of 4 response tokens
    for b in range(2):
        blk = steps[b * BS : (b + 1) * BS]
        assert blk[0] == 0  # the first token fixed at the first step
        assert max(blk[:2]) < min(blk[2:])  # sub-block 0 done before sub-block 1 starts
    with pytest.raises(ValueError, match="sub_block_size=3 needs a threshold and must divide"):
        generate(adapter, model, prompts, 2 * BS, BS, threshold=0.9, sub_block_size=3)


# ----------------------------------------------------------------------------- draws on the grid


def test_first_block_shorter_draws_its_own_step_count():
    """A first block of 4 - 3 = 1 response token at k = 2 tokens per step has T = ceil(1/2) = 1 step;
    of 4 - 1 = 3 tokens, T = 2 steps (2 then 1). Weights are T_b per block (unbiased scale)."""
    ids = torch.arange(20).view(2, 10) + 10
    valid = torch.tensor([[True] * 9 + [False], [True] * 10])  # 1 + 4 + 4 and 3 + 4 + ... (tails 3 and 1)
    tail = torch.tensor([3, 1])
    seen = {0: set(), 1: set()}
    for seed in range(200):
        st = draw_block_states(ids, valid, [seed, seed + 1000], 99, BS, steps=2, tail=tail)
        assert st.weights[0, 0] in (0.0, 1.0)  # first block of example 0: one step, weight T = 1
        assert st.newly[0, 0]  # ... and its only step reveals its only token
        first = st.weights[1, :3][st.newly[1, :3]]
        assert (first == 2).all() and st.newly[1, :3].sum() in (1, 2)  # two steps: 2 then the last 1
        seen[1].add(int(st.newly[1, :3].sum()))
        assert (st.weights[:, 0:][st.newly & (torch.arange(10) >= 3)] == 2).all()  # full blocks: T_B = 2
    assert seen[1] == {1, 2}


def test_sum_over_steps_is_the_trajectory_on_the_grid(family_models):
    """With scale 1, the dTRPO estimates at every forced step t = 1..T_B sum to the exact trajectory
    log-likelihood, also when the first block has fewer steps (blocks past their last step read nothing)."""
    model, _, adapter = family_models["sdar"]
    batch, *_ = grid_batch((5, 7, 4), (2, 3, 2), adapter.mask_token_id)
    seeds = [3, 4, 5]
    cfg = EstimatorConfig(steps_per_block=2, scale="one", mode="exact", targets="newly_unmasked")
    with torch.no_grad():
        total = sum(score(adapter, model, batch, draw_forced(adapter, batch, seeds, cfg, t))[0] for t in range(1, 3))
        traj, _ = score(
            adapter,
            model,
            batch,
            draw(adapter, batch, seeds, EstimatorConfig(steps_per_block=2, estimator="trajectory")),
        )
    torch.testing.assert_close(total, traj, atol=1e-5, rtol=0)


def draw_forced(adapter, batch, seeds, cfg, t):
    from dtrpo.estimators import draw_dtrpo

    return draw_dtrpo(adapter, batch, seeds, cfg, t_fixed=t)


# ----------------------------------------------------------------------------- data on the grid


def test_tokenized_responses_end_on_the_grid_and_prompts_keep_their_blocks(tokenizer):
    # prompt "abcdefg" (7 chars): tail 3, so a 2-token response + EOS (3) pads to 5 = 1 + 4
    ex = tokenize_preference("abcdefg", "xy", "z", tokenizer, BS, absolute=True)
    assert len(ex["chosen_ids"]) == 5 and (7 + len(ex["rejected_ids"])) % BS == 0
    # a prompt over max_prompt_length=5 loses a block multiple from its front: 7 -> 3 (not 5)
    ex = tokenize_preference("abcdefg", "xy", "z", tokenizer, BS, max_prompt_length=5, absolute=True)
    assert tokenizer.decode(ex["prompt_ids"]) == "efg" and ex["prompt_truncated"]
    # the longest response on the grid within max_response_length=8 after a prompt of 7 is 8 - 3 = 5
    ex = tokenize_preference("abcdefg", "x" * 10, "z", tokenizer, BS, max_response_length=8, absolute=True)
    assert len(ex["chosen_ids"]) == 5 and ex["responses_truncated"] == 1
    with pytest.raises(
        ValueError,
        match=r"row 1: field 'chosen' is 11 tokens with its EOS, over the 5 that max_response_length=8 leaves on ",
    ):
        tokenize_preference(
            "abcdefg", "x" * 10, "z", tokenizer, BS, max_response_length=8, truncation="error", absolute=True
        )


def test_collator_refuses_responses_off_the_absolute_grid():
    features = [{"prompt_ids": [5, 6, 7], "chosen_ids": [10, 1], "rejected_ids": [11], "index": 4}]
    with pytest.raises(
        ValueError, match="index 4: chosen_ids has 2 tokens, after a prompt of 3 it does not end a block"
    ):
        PreferenceCollator(0, BS, absolute=True)(features)


# ----------------------------------------------------------------------------- block size never guessed


def test_sdar_without_block_size_is_refused_and_fast_dllm_v2_warns(tmp_path, caplog):
    sdar = write_sdar(tmp_path / "sdar")
    cfg = (sdar / "config.json").read_text().replace('"block_size": 4,', "").replace(',\n  "block_size": 4', "")
    (sdar / "config.json").write_text(cfg)
    assert "block_size" not in cfg
    with pytest.raises(ValueError, match="has no 'block_size'.*pass --block_size"):
        load_model(sdar)
    _, _, adapter = load_model(sdar, block_size=4)
    assert adapter.block_size == 4
    fast = write_fast_dllm(tmp_path / "fast")
    cfg = (fast / "config.json").read_text().replace('"bd_size": 4,', "").replace(',\n  "bd_size": 4', "")
    (fast / "config.json").write_text(cfg)
    with caplog.at_level("WARNING"):
        _, _, adapter = load_model(fast)
    assert adapter.block_size == 32 and "documented block size 32" in caplog.text


def test_sampling_prompts_cut_as_training_cuts_them(family_models, tokenizer):
    """eval / pairs / generate keep a long prompt's end on the block grid, as the data builders do."""
    from dtrpo.evaluate import SamplingArgs, encode_prompts

    _, _, adapter = family_models["sdar"]
    (ids,), cut = encode_prompts(tokenizer, ["abcdefg"], SamplingArgs(max_prompt_length=5), adapter)
    assert tokenizer.decode(ids) == "efg" and cut == 1  # 7 -> 3: a multiple of B = 4 dropped, as training
    want = tokenize_preference("abcdefg", "x", "y", tokenizer, BS, max_prompt_length=5, absolute=True)["prompt_ids"]
    assert ids == want
