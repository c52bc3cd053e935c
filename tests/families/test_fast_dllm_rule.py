"""Fast-dLLM v2's decoding rule, against a decoder written from the rule alone (no dtrpo sampler code).

The rule, read from the public `batch_sample` (NVlabs/Fast-dLLM, v2) and models.md: blocks of B on the
absolute grid, the prompt's last partial block decoded with its tail inside; a block whose first slot is a
response token has that token fixed *before* the block's first forward, as the argmax at the previous
block's last position with every earlier block clean; then sub-blocks left to right, each step running
the whole block and revealing the sub-block's masked positions whose probability exceeds the threshold,
plus its most confident one. Shifted logits: position i - 1 predicts token i. dtrpo's own choice, kept
here: the mask token is never chosen (its logit is -inf before the softmax).

The reference below decodes one prompt at a time, unpadded, and runs every forward on the whole canvas
as it stands, with the family's block-causal mask (`family_logits`): no cache, no
batching, no layout. Greedy decoding must give identical tokens for every sub-block size, every prompt
remainder P % B, in one mixed-length batch, with and without dtrpo's KV cache.
"""

from __future__ import annotations

import pytest
import torch

from dtrpo.families import load_model
from dtrpo.sampler import generate
from tests.families.test_loading import write_fast_dllm

BS = 8
PROMPT_LENS = (8, 9, 14, 16, 5)  # P % 8 = 0, 1, 6, 0 and a prompt shorter than a block
GEN = 16
THRESHOLD = 0.9  # Fast-dLLM v2's evaluation setting


@pytest.fixture(scope="module")
def fast_dllm(tmp_path_factory):
    torch.manual_seed(0)
    model, _, adapter = load_model(write_fast_dllm(tmp_path_factory.mktemp("fdllm") / "ckpt", bd_size=BS))
    with torch.no_grad():  # sharpen the random model so that 0.9 is passed at some positions and not at others
        model.lm_head.weight.mul_(50.0)
    return model, adapter


def family_logits(model, ids: list[int], bs: int) -> torch.Tensor:
    """One forward of an unpadded sequence under the family's attention: position q sees k when k // B <= q // B."""
    n = len(ids)
    block = torch.arange(n) // bs
    mask = block[None, :] <= block[:, None]  # (n, n) query rows, key columns
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=mask[None, None], position_ids=torch.arange(n)[None])
    return out.logits[0].float()  # (n, V)


def choose(logits: torch.Tensor, mask_id: int) -> tuple[int, float]:
    """Argmax token of one position's logits (V,) with the mask token excluded, and its probability."""
    logits = logits.clone()
    logits[mask_id] = float("-inf")
    probs = torch.softmax(logits, -1)
    token = int(probs.argmax())
    return token, float(probs[token])


def reference_decode(model, prompt: list[int], sub: int, mask_id: int) -> list[int]:
    """The response, decoded by the rule above up to the end of the block holding its GEN-th token."""
    P = len(prompt)
    total = P + GEN + (BS - P % BS) % BS
    seq = list(prompt)
    while len(seq) < total:
        start = len(seq) // BS * BS  # the block's first column
        state = seq + [mask_id] * (start + BS - len(seq))
        if len(seq) == start:  # slot 0 is a response token: fixed before the block's first forward
            state[start], _ = choose(family_logits(model, seq, BS)[start - 1], mask_id)
        for lo in range(start, start + BS, sub):
            while any(state[c] == mask_id for c in range(lo, lo + sub)):
                logits = family_logits(model, state, BS)  # the whole canvas, the block in its current state
                masked = [c for c in range(lo, lo + sub) if state[c] == mask_id]
                picks = {c: choose(logits[c - 1], mask_id) for c in masked}
                best = max(masked, key=lambda c: picks[c][1])  # ties: the first, as argmax
                for c in masked:
                    if picks[c][1] > THRESHOLD or c == best:
                        state[c] = picks[c][0]
        seq = state
    return seq[P:]


_REFERENCE: dict[int, tuple[list[list[int]], list[list[int]]]] = {}


def prompts_and_reference(model, adapter, sub: int) -> tuple[list[list[int]], list[list[int]]]:
    """Random prompts of PROMPT_LENS and the reference's responses for them (computed once per sub-block size)."""
    if sub not in _REFERENCE:
        g = torch.Generator().manual_seed(sub)
        prompts = [torch.randint(10, 60, (n,), generator=g).tolist() for n in PROMPT_LENS]
        _REFERENCE[sub] = prompts, [reference_decode(model, p, sub, adapter.mask_token_id) for p in prompts]
    return _REFERENCE[sub]


@pytest.mark.parametrize("sub", [2, 4, 8])
def test_decoding_equals_the_rule_written_alone(fast_dllm, sub):
    model, adapter = fast_dllm
    prompts, want = prompts_and_reference(model, adapter, sub)
    kw = dict(gen_length=GEN, steps_per_block=BS, threshold=THRESHOLD, sub_block_size=sub, fix_first_token=True)
    for use_cache in (True, False):
        out = generate(adapter, model, prompts, use_cache=use_cache, **kw)
        assert out.sequences == want, (sub, use_cache)
    several = [s for row in out.reveal_step for s in row]
    assert len(several) > len(set(several))  # some step revealed more than one position: the threshold mattered


def test_the_comparison_can_fail(fast_dllm):
    """Without the first token fixed (decoded like the block's other positions) the tokens differ from the
    rule for some prompt: the comparison above sees the order of the first token."""
    model, adapter = fast_dllm
    prompts, want = prompts_and_reference(model, adapter, 2)
    kw = dict(gen_length=GEN, steps_per_block=BS, threshold=THRESHOLD, sub_block_size=2, fix_first_token=False)
    assert generate(adapter, model, prompts, **kw).sequences != want
