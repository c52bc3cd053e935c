"""Re-masking (method.md section 3) and block attention layouts (section 4).

Sequences are laid out with the prompt left-padded to a common width P and the response
right-padded to a common width R. Every position carries a descriptor: `kind` (prompt, clean or
noisy), `block` and `valid`. The attention rule is one pure function of two descriptors, used for
the dense SDPA mask and for flex attention.

Two block grids (where blocks start):
- response grid (`absolute=False`; the tiny model, LLaDA, Dream): the response's blocks start at its
  first token; the prompt is its own region (`kind` PROMPT, `block` -1) that attends only itself.
- absolute grid (`absolute=True`; SDAR/TraDo, Fast-dLLM v2): blocks are counted from position 0 of
  the whole sequence, prompt included. The prompt is made of clean blocks (`block = position // B`),
  so it attends block-causally, and its last `P % B` tokens (the *tail*) share the first response
  block: that block holds only `B - P % B` response tokens, and the tail attends the block's state
  as the family's sampler does. The packed layout then carries a noisy copy of the tail too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

PROMPT, CLEAN, NOISY = 0, 1, 2
REVEAL_ORDERS = ("random", "left_to_right", "confidence")
TARGETS = ("newly_unmasked", "all_masked_weighted")


def allowed(q_kind, q_block, q_idx, k_kind, k_block, k_idx, prompt_causal: bool, full: bool):
    """May a query attend a key? Works on broadcastable tensors (dense masks) and on scalars (flex).

    Block-causal rule (`full=False`), the three parts of the packed layout:
      - prompt queries see the prompt (causally when `prompt_causal`), nothing of the response;
      - a clean block C_b sees the prompt and clean blocks b' <= b;
      - a noisy block N_b sees the prompt, clean blocks b' < b and itself (noisy b' = b).
    On the absolute grid the prompt is clean blocks, so the second and third parts cover it.
    `full=True` is a full-attention model: every position sees every (valid) position.
    """
    if full:
        return torch.ones_like(q_kind == k_kind)
    key_prompt = (k_kind == PROMPT) & ((q_kind != PROMPT) | (k_idx <= q_idx) | (not prompt_causal))
    key_clean = (k_kind == CLEAN) & (
        ((q_kind == CLEAN) & (k_block <= q_block)) | ((q_kind == NOISY) & (k_block < q_block))
    )
    key_noisy = (k_kind == NOISY) & (q_kind == NOISY) & (k_block == q_block)
    return key_prompt | key_clean | key_noisy


def same_pair(q_segment, k_segment):
    """The pair layout's extra rule, on segments `3 * pair + side`: a query sees keys of its own pair only,
    and of those the shared prompt (side 0) and its own response (the same side). Packed rows hold several
    pairs; an unpacked row holds pair 0 only."""
    return (q_segment // 3 == k_segment // 3) & ((k_segment % 3 == 0) | (k_segment == q_segment))


def tail_lengths(prompt_valid: torch.Tensor, block_size: int, absolute: bool) -> torch.Tensor:
    """(B,) prompt tokens that share the first response block: `P % B` on the absolute grid, else 0."""
    n = prompt_valid.long().sum(-1)
    return n % block_size if absolute else torch.zeros_like(n)


@dataclass
class Layout:
    """A batch of sequences ready for one forward pass, with their position descriptors."""

    input_ids: torch.Tensor  # (B, S)
    position_ids: torch.Tensor  # (B, S)
    kind: torch.Tensor  # (B, S) PROMPT / CLEAN / NOISY
    block: torch.Tensor  # (B, S) block index, -1 in a response-grid prompt
    valid: torch.Tensor  # (B, S) bool
    clean_start: int  # column of response token 0 in the clean copy
    noisy_start: int  # column of response token 0 in the noisy copy (== clean_start for one copy)
    response_len: int  # R
    block_size: int
    tail: torch.Tensor  # (B,) prompt tokens in the first response block (tail_lengths)
    segment: torch.Tensor | None = None  # (B, S) pair layout: 3 * pair + side (0 shared prompt, 1 chosen, 2 rejected)

    def dense_mask(self, prompt_causal: bool, full: bool) -> torch.Tensor:
        """(B, 1, S, S) bool mask for SDPA, True = may attend. Padded keys are never attended; a row
        that would attend nothing (a padded query) attends its own position, so no NaN appears.

        The rule is evaluated once per *run* (consecutive columns with the same kind, block, validity and
        segment, which the rule cannot tell apart; each token of a causal prompt is its own run), then
        expanded to columns by two gathers: R^2 rule evaluations instead of S^2, for R ~ S / B runs."""
        B, S = self.input_ids.shape
        dev = self.input_ids.device
        seg = self.segment if self.segment is not None else torch.zeros_like(self.kind)
        descriptors = (self.kind, self.block, self.valid, seg)
        start = torch.ones(B, S, dtype=torch.bool, device=dev)
        start[:, 1:] = torch.stack([d[:, 1:] != d[:, :-1] for d in descriptors]).any(0)
        if prompt_causal:
            start |= self.kind == PROMPT
        run = start.long().cumsum(-1) - 1  # (B, S) run of each column
        R = int(run.max()) + 1 if S else 0
        idx = torch.arange(S, device=dev).expand(B, S)

        def per_run(x):  # (B, R): a run's descriptor (every column of a run has the same one)
            return torch.zeros(B, R, dtype=x.dtype, device=dev).scatter_(1, run, x)

        kind, block, valid, segment, first = (per_run(x) for x in (*descriptors, idx))
        ok = allowed(
            kind[:, :, None], block[:, :, None], first[:, :, None],
            kind[:, None, :], block[:, None, :], first[:, None, :],
            prompt_causal, full,
        )  # fmt: skip
        ok = (
            ok & valid[:, None, :] & valid[:, :, None] & same_pair(segment[:, :, None], segment[:, None, :])
        )  # (B, R, R)
        rows = ok.gather(1, run[:, :, None].expand(B, S, R))  # (B, S, R)
        mask = rows.gather(2, run[:, None, :].expand(B, S, S))  # (B, S, S)
        mask.diagonal(dim1=1, dim2=2).fill_(True)
        return mask[:, None]

    def mask_mod(self, prompt_causal: bool, full: bool):
        """The rule of `dense_mask` as a flex-attention `mask_mod(b, h, q, k)`."""
        kind, block, valid = self.kind, self.block, self.valid
        seg = self.segment if self.segment is not None else torch.zeros_like(kind)

        def mask_mod(b, h, q, k):
            ok = allowed(kind[b, q], block[b, q], q, kind[b, k], block[b, k], k, prompt_causal, full)
            ok = ok & same_pair(seg[b, q], seg[b, k])
            return (ok & valid[b, q] & valid[b, k]) | (q == k)

        return mask_mod

    def flex_mask(self, prompt_causal: bool, full: bool):
        """The same rule as a flex-attention `BlockMask` (GPU only: flex has no CPU backward)."""
        from torch.nn.attention.flex_attention import create_block_mask

        B, S = self.input_ids.shape
        return create_block_mask(self.mask_mod(prompt_causal, full), B, None, S, S, device=self.input_ids.device)

    def read_columns(self, shifted: bool) -> torch.Tensor:
        """(B, R) column whose logits predict response token j.

        Unshifted: the noisy copy of j. Shifted (position i-1 predicts token i): the noisy copy of j-1,
        except the first token of a block, read at the last position of the previous *clean* block
        (the last prompt position for j = 0 when the response starts a block). On the absolute grid a
        response whose first block holds a prompt tail reads its token 0 at the noisy copy of the tail's
        last token (the column just before the noisy response). With one copy this is j-1 throughout.
        """
        j = torch.arange(self.response_len, device=self.input_ids.device)[None]  # (1, R)
        noisy = (self.noisy_start + j).expand(self.tail.shape[0], -1)
        if not shifted:
            return noisy
        first = (self.tail[:, None] + j) % self.block_size == 0  # (B, R) block-first tokens
        return torch.where(first, self.clean_start + j - 1, noisy - 1)


def prompt_positions(prompt_valid: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded prompt: 0..n-1 over its valid tokens, 0 on padding."""
    return (prompt_valid.long().cumsum(-1) - 1).clamp(min=0)


def _prompt_descriptors(prompt_valid, block_size, absolute):
    """(position, kind, block) of the prompt columns."""
    pos = prompt_positions(prompt_valid)
    if absolute:
        return pos, torch.full_like(pos, CLEAN), pos // block_size
    return pos, torch.full_like(pos, PROMPT), torch.full_like(pos, -1)


def _response_descriptors(prompt_valid, R, block_size, absolute):
    """(position, block) of R response columns: positions continue the prompt's; blocks follow the grid."""
    dev = prompt_valid.device
    pos = prompt_valid.long().sum(-1, keepdim=True) + torch.arange(R, device=dev)[None]  # (B, R)
    block = pos // block_size if absolute else (torch.arange(R, device=dev) // block_size)[None].expand_as(pos)
    return pos, block


def packed_layout(
    prompt_ids, prompt_valid, response_ids, response_valid, noisy_ids, block_size, absolute: bool = False
) -> Layout:
    """`[x | y_clean | tail_noisy | y_noisy]`: every block's state evaluated in one pass. The noisy copy
    reuses the position ids of the clean copy. `tail_noisy` (absolute grid only, as wide as the longest
    tail in the batch, right-aligned, padding invalid) is the prompt tail as it sits in the first
    response block's state: context, never a target, attending that state."""
    P = prompt_ids.shape[1]
    B, R = response_ids.shape
    p_pos, p_kind, p_block = _prompt_descriptors(prompt_valid, block_size, absolute)
    pos, block = _response_descriptors(prompt_valid, R, block_size, absolute)
    tail = tail_lengths(prompt_valid, block_size, absolute)
    T = int(tail.max()) if B else 0
    t_cols = slice(P - T, P)  # the tails are the last columns of the left-padded prompt
    t_valid = torch.arange(T, device=tail.device)[None] >= (T - tail)[:, None]  # (B, T)
    return Layout(
        input_ids=torch.cat([prompt_ids, response_ids, prompt_ids[:, t_cols], noisy_ids], 1),
        position_ids=torch.cat([p_pos, pos, p_pos[:, t_cols], pos], 1),
        kind=torch.cat(
            [
                p_kind,
                torch.full_like(pos, CLEAN),
                torch.full_like(p_pos[:, t_cols], NOISY),
                torch.full_like(pos, NOISY),
            ],
            1,
        ),
        block=torch.cat([p_block, block, p_block[:, t_cols], block], 1),
        valid=torch.cat([prompt_valid, response_valid, t_valid, response_valid], 1),
        clean_start=P,
        noisy_start=P + R + T,
        response_len=R,
        block_size=block_size,
        tail=tail,
    )


def single_layout(prompt_ids, prompt_valid, response_ids, response_valid, block_size, absolute: bool = False) -> Layout:
    """`[x | y]` with the response as one copy, labelled clean so that the block-causal rule gives the
    model's own inference attention (blocks b' <= b; on the absolute grid the prompt tail is in the first
    response block and sees its state)."""
    P = prompt_ids.shape[1]
    R = response_ids.shape[1]
    p_pos, p_kind, p_block = _prompt_descriptors(prompt_valid, block_size, absolute)
    pos, block = _response_descriptors(prompt_valid, R, block_size, absolute)
    return Layout(
        input_ids=torch.cat([prompt_ids, response_ids], 1),
        position_ids=torch.cat([p_pos, pos], 1),
        kind=torch.cat([p_kind, torch.full_like(pos, CLEAN)], 1),
        block=torch.cat([p_block, block], 1),
        valid=torch.cat([prompt_valid, response_valid], 1),
        clean_start=P,
        noisy_start=P,
        response_len=R,
        block_size=block_size,
        tail=tail_lengths(prompt_valid, block_size, absolute),
    )


def example_seed(*parts) -> int:
    """A 63-bit seed from any parts (global seed, example id, epoch, side); identical on every machine."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class BlockStates:
    """One sampled denoising state per block, for a batch of responses."""

    noisy_ids: torch.Tensor  # (B, R) the response with [MASK] at newly-unmasked and still-masked positions
    weights: torch.Tensor  # (B, R) float: weight of each position's log-prob in the estimate (0 = not read)
    newly: torch.Tensor  # (B, R) bool: newly unmasked positions (I_t)


def uniform_step_size(block_size: int, steps: int) -> int:
    if steps <= 0:
        raise ValueError(f"steps_per_block must be positive, got {steps}")
    if block_size % steps:
        raise ValueError(f"steps_per_block={steps} must divide block_size={block_size} for uniform step sizes")
    return block_size // steps


def response_blocks(tail: torch.Tensor, R: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) block index (0 = the first response block) and slot inside the block of each response
    column, for responses whose first block holds `tail` prompt tokens first."""
    grid = tail[:, None] + torch.arange(R, device=tail.device)[None]  # (B, R) offset from the first block's start
    return grid // block_size, grid % block_size


def step_counts(n: torch.Tensor, k: int) -> torch.Tensor:
    """Steps a block of n response tokens takes at k tokens per step: ceil(n / k) (the last reveals the rest)."""
    return (n + k - 1) // k


def draw_block_states(
    response_ids: torch.Tensor,  # (B, R)
    response_valid: torch.Tensor,  # (B, R) bool; a prefix of each row
    seeds: list[int],
    mask_token_id: int,
    block_size: int,
    steps: int,
    order: str = "random",
    targets: str = "newly_unmasked",
    scale: float | None = None,
    confidence: torch.Tensor | None = None,  # (B, R) reference probability of each token, for order="confidence"
    t_fixed: int | None = None,
    tail: torch.Tensor | None = None,  # (B,) prompt tokens in the first response block (absolute grid)
) -> BlockStates:
    """Re-mask each block at one uniformly drawn step (method.md section 3).

    Every step reveals k = block_size / T_B positions. A block of n response tokens takes
    T_b = ceil(n / k) steps (T_B for a full block; fewer for a first block shared with a prompt tail),
    the last of them revealing what is left. Steps run from T_b (nothing revealed yet) down to 1, so
    `n_before = (T_b - t) * k` are clean in the state. The scale defaults to T_b per block (unbiased);
    a number fixes it. Each example draws its reveal keys and steps for its own valid blocks from its
    own generator, in a fixed order, so its state depends on its seed and its own length only, never on
    its batch mates. `t_fixed` forces every block's step (a block with fewer steps then reads nothing).
    """
    if order not in REVEAL_ORDERS:
        raise ValueError(f"reveal_order must be one of {REVEAL_ORDERS}, got {order!r}")
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if order == "confidence" and confidence is None:
        raise ValueError("reveal_order='confidence' needs the reference model's confidences")
    k = uniform_step_size(block_size, steps)
    B, R = response_ids.shape
    tail = torch.zeros(B, dtype=torch.long) if tail is None else tail.long().cpu()
    blk, slot = response_blocks(tail, R, block_size)  # (B, R)
    NB = int((tail.max() + R + block_size - 1) // block_size) if B else 0
    present = torch.zeros(B, NB, block_size, dtype=torch.bool)
    present[torch.arange(B)[:, None], blk, slot] = response_valid.cpu()
    n = present.sum(-1)  # (B, NB) response tokens per block
    T = step_counts(n, k)  # (B, NB) steps per block
    keys, t = _draw_keys_and_steps(seeds, n, T, steps, block_size)
    if t_fixed is not None:
        t.fill_(t_fixed)
    if order == "left_to_right":
        keys = torch.arange(block_size, dtype=torch.float).expand(B, NB, block_size).clone()
    elif order == "confidence":
        keys = torch.zeros(B, NB, block_size)
        keys[torch.arange(B)[:, None], blk, slot] = -confidence.detach().float().cpu()  # most confident first
    keys = keys.masked_fill(~present, float("inf"))  # prompt-tail and padding slots are never revealed
    sort = keys.argsort(dim=-1, stable=True)
    rank = torch.empty_like(sort).scatter_(-1, sort, torch.arange(block_size).expand_as(sort))  # (B, NB, bs)
    n_before = (T - t) * k  # (B, NB)
    masked = present & (rank >= n_before[..., None])  # newly unmasked or still masked: [MASK] in the state
    newly = masked & (rank < (n_before + k)[..., None])
    w = _target_weights(targets, masked, newly, n, n_before, T, scale)
    rows = torch.arange(B)[:, None]
    dev = response_ids.device
    masked, newly, w = (x[rows, blk, slot].to(dev) for x in (masked, newly, w))  # back to (B, R)
    w = w * response_valid
    noisy = torch.where(masked, torch.full_like(response_ids, mask_token_id), response_ids)
    return BlockStates(noisy_ids=noisy, weights=w, newly=newly & response_valid)


def _draw_keys_and_steps(seeds: list[int], n: torch.Tensor, T: torch.Tensor, steps: int, block_size: int) -> tuple:
    """Each example's random reveal keys (B, NB, bs) and drawn steps (B, NB) for its own valid blocks, from its
    own generator in a fixed order: a full block's step uniform in 1..T_B, a shorter block's in 1..T_b drawn
    after the rest (so full blocks keep their stream). Blocks past an example's last hold inf and 1."""
    B, NB = n.shape
    keys, t = torch.full((B, NB, block_size), float("inf")), torch.ones(B, NB, dtype=torch.long)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        nb = int((n[i] > 0).sum())
        keys[i, :nb] = torch.rand(nb, block_size, generator=g)
        t[i, :nb] = torch.randint(1, steps + 1, (nb,), generator=g)
        short = (T[i, :nb] < steps).nonzero()[:, 0]  # drawn after the rest: full blocks keep their stream
        if len(short):
            t[i, short] = (torch.rand(len(short), generator=g) * T[i, short]).long() + 1
    return keys, t


def _target_weights(targets: str, masked, newly, n, n_before, T, scale: float | None) -> torch.Tensor:
    """(B, NB, bs) weights of the scored positions: the newly unmasked ones times the scale (T_b per block, or
    `scale`), or every masked one weighted k_t / |M_t| times the scale (same expectation, lower variance)."""
    c = T.float() if scale is None else torch.full_like(T, scale, dtype=torch.float)  # (B, NB)
    if targets == "newly_unmasked":
        return newly.float() * c[..., None]
    left = (n - n_before).clamp(min=1)  # |M_t|
    k_t = newly.sum(-1)  # positions revealed at step t (k, or the remainder at a block's last step)
    return masked.float() * (k_t / left * c)[..., None]


@dataclass
class PairLayout:
    """One row per preference pair (`pair_layout`) and where each response token is read."""

    layout: Layout
    reads: torch.Tensor  # (2n, R) column whose logits predict token j of sequence i, in its row
    rows: torch.Tensor  # (2n,) the layout row that holds sequence i (i % n unless packed)


def _segment(prompt, tail_len, response, noisy, n_valid, block_size, absolute, shifted, seg, start):
    """The columns of one response behind a shared prompt: [clean tail | clean blocks but the last |
    noisy tail | noisy response]; returns the column tensors and the read column of each token."""
    P, bs, r = len(prompt), block_size, tail_len
    dev = response.device
    j = torch.arange(n_valid, device=dev)
    rblock = (r + j) // bs  # response block of each token, 0 = the first (holding the tail)
    last = int(rblock[-1]) if n_valid else 0
    n_clean = int((rblock < last).sum())  # the last clean block is attended by no query: dropped
    tail = prompt[P - r :] if r else prompt[:0]
    clean_tail = tail if n_clean else tail[:0]
    t_pos = torch.arange(P - r, P, device=dev)
    r_pos = P + j
    ids = torch.cat([clean_tail, response[:n_clean], tail, noisy[:n_valid]])
    pos = torch.cat([t_pos[: len(clean_tail)], r_pos[:n_clean], t_pos, r_pos])
    blocks = pos // bs if absolute else torch.cat([torch.full_like(t_pos[: len(clean_tail)], -1), j[:n_clean] // bs,
                                                   torch.full_like(t_pos, -1), j // bs])  # fmt: skip
    n_c = len(clean_tail) + n_clean
    kind = torch.cat([torch.full((n_c,), CLEAN, device=dev), torch.full((r + n_valid,), NOISY, device=dev)])
    clean_col = start + len(clean_tail) + j  # column of the clean copy of token j (j < n_clean)
    noisy_col = start + n_c + r + j
    if not shifted:
        reads = noisy_col
    else:
        first = (r + j) % bs == 0
        reads = torch.where(first, clean_col - 1, noisy_col - 1)  # j = 0 block-first: the last prompt column
    return ids, pos, blocks, kind, torch.full_like(ids, seg), reads


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: items (by index) into bins of at most `capacity` (an item longer than that gets
    a bin of its own). Deterministic: longer items first, then lower index.

    lengths [5, 3, 4, 2], capacity 6: 5 -> bin 0, 4 -> bin 1, 3 -> bin 2, 2 -> bin 1 (4 + 2 = 6):
    [[0], [2, 3], [1]].
    """
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = next((b for b, r in enumerate(room) if lengths[i] <= r), None)
        if b is None:
            bins.append([]), room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def _pair_row(
    i, n, prompt_ids, prompt_valid, r, responses, responses_valid, noisy, reads, block_size, absolute, shifted
) -> list[torch.Tensor]:
    """Pair i's row of `pair_layout` as its columns (ids, positions, blocks, kinds, segments): the shared prompt
    (without its tail of `r` tokens), then the chosen and the rejected segment (`_segment`). Fills the pair's
    two rows of `reads` with the column each response token is read at."""
    prompt = prompt_ids[i][prompt_valid[i]]
    P = len(prompt)
    shared = prompt[: P - r]
    pos = torch.arange(P - r, device=prompt.device)
    if absolute:
        parts = [(shared, pos, pos // block_size, torch.full_like(pos, CLEAN), torch.zeros_like(pos))]
    else:
        parts = [(shared, pos, torch.full_like(pos, -1), torch.full_like(pos, PROMPT), torch.zeros_like(pos))]
    start = P - r
    for side, row in ((3 * i + 1, i), (3 * i + 2, n + i)):
        n_valid = int(responses_valid[row].sum())
        *cols, read = _segment(
            prompt, r, responses[row], noisy[row], n_valid, block_size, absolute, shifted, side, start
        )
        if shifted and n_valid and r == 0:  # a block-first token 0 is read at the last shared prompt column
            read[0] = P - 1
        reads[row, :n_valid] = read
        parts.append(tuple(cols))
        start += len(cols[0])
    parts[0] = (*parts[0][:4], torch.full_like(pos, 3 * i))
    return [torch.cat(x) for x in zip(*parts, strict=True)]


def _pack_pairs(rows: list, reads: torch.Tensor, row_of: torch.Tensor, n: int) -> list:
    """Pairs packed whole into rows no wider than the longest pair (`pack_bins`); `reads` shifted by each pair's
    offset in its row and `row_of` pointed at that row, in place."""
    bins = pack_bins([len(r[0]) for r in rows], max(len(r[0]) for r in rows))
    packed = []
    for b, members in enumerate(bins):
        offset = 0
        for i in members:
            reads[[i, n + i]] += offset
            row_of[[i, n + i]] = b
            offset += len(rows[i][0])
        packed.append([torch.cat(x) for x in zip(*(rows[i] for i in members), strict=True)])
    return packed


def pair_layout(
    prompt_ids, prompt_valid, responses, responses_valid, noisy, block_size, absolute, shifted, pack: bool = False
) -> PairLayout:
    """`[x | C_w N_w | C_l N_l]`, one row per pair, for the packed mode: the prompt once (its whole blocks;
    on the absolute grid each response carries its own copy of the prompt tail, whose clean state depends
    on that response's first block), chosen and rejected behind it, each as its clean blocks but the last
    (no query attends a response's last clean block) and its noisy states. A response attends the shared
    prompt and itself only (`Layout.segment`). The logits at every read column equal `packed_layout`'s.

    `responses`, `responses_valid` and `noisy` are (2n, R): chosen rows first, then rejected rows, with
    the n prompts of `prompt_ids` (n, P) shared by row i and row n + i.

    `pack` (padding-free): pairs are packed whole into rows no wider than the longest pair (`pack_bins`), each
    with its own position ids and segments, so no query sees another pair; fewer rows, less padding.
    """
    n, Pw = prompt_ids.shape
    R = responses.shape[1]
    tails = tail_lengths(prompt_valid, block_size, absolute)
    reads = torch.zeros(2 * n, R, dtype=torch.long, device=responses.device)
    rows = [
        _pair_row(
            i,
            n,
            prompt_ids,
            prompt_valid,
            int(tails[i]),
            responses,
            responses_valid,
            noisy,
            reads,
            block_size,
            absolute,
            shifted,
        )
        for i in range(n)
    ]
    row_of = torch.arange(2 * n, device=responses.device) % max(n, 1)
    if pack and n:
        rows = _pack_pairs(rows, reads, row_of, n)
    S = max(len(r[0]) for r in rows)

    def stack(k, fill):
        return torch.stack([torch.nn.functional.pad(r[k], (0, S - len(r[k])), value=fill) for r in rows])

    valid = torch.stack([torch.arange(S, device=responses.device) < len(r[0]) for r in rows])
    layout = Layout(
        input_ids=stack(0, 0),
        position_ids=stack(1, 0),
        kind=stack(3, PROMPT),
        block=stack(2, -1),
        valid=valid,
        clean_start=-1,  # not one column per batch: `PairLayout.reads` holds every read column
        noisy_start=-1,
        response_len=R,
        block_size=block_size,
        tail=tails,
        segment=stack(4, 0),
    )
    return PairLayout(layout, reads, row_of)
