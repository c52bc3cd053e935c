"""Re-masking (method.md section 3) and block attention layouts (section 4).

Sequences are laid out with the prompt left-padded to a common width P and the response
right-padded to a common width R (a multiple of the block size). Every position carries a
descriptor: `kind` (prompt, clean or noisy), `block` (-1 in the prompt) and `valid`. The attention
rule is one pure function of two descriptors, used for the dense SDPA mask and for flex attention.
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


@dataclass
class Layout:
    """A batch of sequences ready for one forward pass, with their position descriptors."""

    input_ids: torch.Tensor  # (B, S)
    position_ids: torch.Tensor  # (B, S)
    kind: torch.Tensor  # (B, S) PROMPT / CLEAN / NOISY
    block: torch.Tensor  # (B, S) block index, -1 in the prompt
    valid: torch.Tensor  # (B, S) bool
    clean_start: int  # column of response token 0 in the clean copy
    noisy_start: int  # column of response token 0 in the noisy copy (== clean_start for one copy)
    response_len: int  # R

    def dense_mask(self, prompt_causal: bool, full: bool) -> torch.Tensor:
        """(B, 1, S, S) bool mask for SDPA, True = may attend. Padded keys are never attended; a row
        that would attend nothing (a padded query) attends its own position, so no NaN appears."""
        S = self.input_ids.shape[1]
        idx = torch.arange(S, device=self.input_ids.device)
        ok = allowed(
            self.kind[:, :, None],
            self.block[:, :, None],
            idx[None, :, None],
            self.kind[:, None, :],
            self.block[:, None, :],
            idx[None, None, :],
            prompt_causal,
            full,
        )  # (B, S, S)
        ok = ok & self.valid[:, None, :] & self.valid[:, :, None]
        ok = ok | torch.eye(S, dtype=torch.bool, device=ok.device)
        return ok[:, None]

    def flex_mask(self, prompt_causal: bool, full: bool):
        """The same rule as a flex-attention `BlockMask` (GPU only: flex has no CPU backward)."""
        from torch.nn.attention.flex_attention import create_block_mask

        kind, block, valid = self.kind, self.block, self.valid

        def mask_mod(b, h, q, k):
            ok = allowed(kind[b, q], block[b, q], q, kind[b, k], block[b, k], k, prompt_causal, full)
            return (ok & valid[b, q] & valid[b, k]) | (q == k)

        B, S = self.input_ids.shape
        return create_block_mask(mask_mod, B, None, S, S, device=self.input_ids.device)

    def read_columns(self, shifted: bool, block_size: int) -> torch.Tensor:
        """(R,) column whose logits predict response token j.

        Unshifted: the noisy copy of j. Shifted (position i-1 predicts token i): the noisy copy of j-1,
        except the first token of a block, read at the last position of the previous *clean* block
        (the last prompt position for j = 0). With one copy (clean_start == noisy_start) this is j-1.
        """
        j = torch.arange(self.response_len, device=self.input_ids.device)
        if not shifted:
            return self.noisy_start + j
        first = (j % block_size) == 0
        return torch.where(first, self.clean_start + j - 1, self.noisy_start + j - 1)


def prompt_positions(prompt_valid: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded prompt: 0..n-1 over its valid tokens, 0 on padding."""
    return (prompt_valid.long().cumsum(-1) - 1).clamp(min=0)


def _response_descriptors(prompt_valid, response_valid, block_size, kind_value):
    B, R = response_valid.shape
    dev = response_valid.device
    start = prompt_valid.long().sum(-1, keepdim=True)  # (B, 1)
    pos = start + torch.arange(R, device=dev)[None]  # (B, R)
    block = (torch.arange(R, device=dev) // block_size)[None].expand(B, R)
    kind = torch.full((B, R), kind_value, dtype=torch.long, device=dev)
    return pos, block, kind


def packed_layout(prompt_ids, prompt_valid, response_ids, response_valid, noisy_ids, block_size) -> Layout:
    """`[x | y_clean | y_noisy]`: every block's state evaluated in one pass. The noisy copy reuses the
    position ids of the clean copy."""
    P = prompt_ids.shape[1]
    B, R = response_ids.shape
    pos, block, _ = _response_descriptors(prompt_valid, response_valid, block_size, CLEAN)
    p_kind = torch.full_like(prompt_ids, PROMPT)
    return Layout(
        input_ids=torch.cat([prompt_ids, response_ids, noisy_ids], 1),
        position_ids=torch.cat([prompt_positions(prompt_valid), pos, pos], 1),
        kind=torch.cat([p_kind, torch.full_like(response_ids, CLEAN), torch.full_like(response_ids, NOISY)], 1),
        block=torch.cat([torch.full_like(prompt_ids, -1), block, block], 1),
        valid=torch.cat([prompt_valid, response_valid, response_valid], 1),
        clean_start=P,
        noisy_start=P + R,
        response_len=R,
    )


def single_layout(prompt_ids, prompt_valid, response_ids, response_valid, block_size) -> Layout:
    """`[x | y]` with the response as one copy, labelled clean so that the block-causal rule gives the
    model's own inference attention (blocks b' <= b)."""
    P = prompt_ids.shape[1]
    pos, block, kind = _response_descriptors(prompt_valid, response_valid, block_size, CLEAN)
    return Layout(
        input_ids=torch.cat([prompt_ids, response_ids], 1),
        position_ids=torch.cat([prompt_positions(prompt_valid), pos], 1),
        kind=torch.cat([torch.full_like(prompt_ids, PROMPT), kind], 1),
        block=torch.cat([torch.full_like(prompt_ids, -1), block], 1),
        valid=torch.cat([prompt_valid, response_valid], 1),
        clean_start=P,
        noisy_start=P,
        response_len=response_ids.shape[1],
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


def draw_block_states(
    response_ids: torch.Tensor,  # (B, R)
    response_valid: torch.Tensor,  # (B, R) bool; whole blocks are valid or not
    seeds: list[int],
    mask_token_id: int,
    block_size: int,
    steps: int,
    order: str = "random",
    targets: str = "newly_unmasked",
    scale: float | None = None,
    confidence: torch.Tensor | None = None,  # (B, R) reference probability of each token, for order="confidence"
    t_fixed: int | None = None,
) -> BlockStates:
    """Re-mask each block at one uniformly drawn step (method.md section 3).

    Steps run from T_B (nothing revealed yet) down to 1; step t reveals k = block_size / T_B
    positions, so `n_before = (T_B - t) * k` are clean in the state. Each example draws its reveal
    keys and steps from its own generator, in a fixed order, so the same seed gives the same state
    whatever the order option. `scale` defaults to T_B (unbiased). `t_fixed` forces every block's step
    (for the exact unbiasedness test).
    """
    if order not in REVEAL_ORDERS:
        raise ValueError(f"reveal_order must be one of {REVEAL_ORDERS}, got {order!r}")
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if order == "confidence" and confidence is None:
        raise ValueError("reveal_order='confidence' needs the reference model's confidences")
    k = uniform_step_size(block_size, steps)
    B, R = response_ids.shape
    if R % block_size:
        raise ValueError(f"response width {R} is not a multiple of block_size={block_size}")
    NB = R // block_size
    keys, t = torch.empty(B, NB, block_size), torch.empty(B, NB, dtype=torch.long)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        keys[i] = torch.rand(NB, block_size, generator=g)
        t[i] = torch.randint(1, steps + 1, (NB,), generator=g)
    if t_fixed is not None:
        t.fill_(t_fixed)
    if order == "left_to_right":
        keys = torch.arange(block_size, dtype=torch.float).expand(B, NB, block_size)
    elif order == "confidence":
        keys = -confidence.detach().float().cpu().view(B, NB, block_size)  # most confident first
    sort = keys.argsort(dim=-1, stable=True)
    rank = torch.empty_like(sort).scatter_(-1, sort, torch.arange(block_size).expand_as(sort))  # (B, NB, bs)
    n_before = ((steps - t) * k)[..., None]  # (B, NB, 1)
    masked = rank >= n_before  # newly unmasked or still masked: [MASK] in the state
    newly = masked & (rank < n_before + k)
    c = float(steps if scale is None else scale)
    if targets == "newly_unmasked":
        w = newly.float() * c
    else:  # every masked position, weighted k_t / |M_t|: same expectation, lower variance
        w = masked.float() * (k / (block_size - n_before).float()) * c
    dev = response_ids.device
    masked, newly, w = (x.reshape(B, R).to(dev) for x in (masked, newly, w))
    w = w * response_valid
    noisy = torch.where(masked, torch.full_like(response_ids, mask_token_id), response_ids)
    return BlockStates(noisy_ids=noisy, weights=w, newly=newly & response_valid)
