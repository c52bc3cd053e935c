"""Sequence log-likelihood estimators whose policy-minus-reference difference is the log-ratio.

Every estimator is a `draw`: a model-independent list of states `(noisy response, weights, mode)`
made from per-example seeds. `score` turns a draw into a per-sequence estimate for one model:
`sum over states and positions of weight * log mu(y_j | state)`. Scoring the *same* draw with the
policy and with the reference and subtracting gives the log-ratio estimate, so the schedule terms
cancel (ratio reduction) and the masks are shared by construction.

- `dtrpo`: one sampled step per block, all blocks in one packed pass (method.md sections 2-4).
- `vrpo`: LLaDA 1.5's ELBO with n stratified masking levels (section 6).
- `meanfield`: the response fully masked, one pass.
- `trajectory`: every step of every block under a sampled reveal order; the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

import torch

from dtrpo.masking import (
    REVEAL_ORDERS,
    TARGETS,
    draw_block_states,
    packed_layout,
    pair_layout,
    response_blocks,
    single_layout,
)
from dtrpo.models import MODES, ModelAdapter


@dataclass
class Batch:
    """Prompts left-padded to P, responses right-padded to R (a multiple of the block size)."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_valid: torch.Tensor  # (B, P) bool
    response_ids: torch.Tensor  # (B, R)
    response_valid: torch.Tensor  # (B, R) bool
    pairs: bool = False  # rows i and B/2 + i are a pair with one prompt: packed mode shares it (`pair_layout`)
    pack: bool = False  # with `pairs`: several pairs per row, no padding between them (padding-free)


@dataclass
class State:
    noisy_ids: torch.Tensor  # (B, R)
    weights: torch.Tensor  # (B, R) float; 0 = not read
    mode: str  # packed | exact | remasked


@dataclass
class EstimatorConfig:
    """The estimator options, declared once: `DTRPOConfig` inherits them (so they are CLI flags with these
    help lines), and the draws read them from either."""

    estimator: Literal["dtrpo", "vrpo", "meanfield", "trajectory"] = field(
        default="dtrpo", metadata={"help": "Log-ratio estimator: dtrpo, vrpo, meanfield or trajectory."}
    )
    mode: Literal["packed", "exact", "remasked"] | None = field(
        default=None, metadata={"help": f"State evaluation mode {MODES}; default: the model family's own."}
    )
    steps_per_block: int | None = field(
        default=None, metadata={"help": "Denoising steps T_B per block (uniform step size B / T_B); default: B."}
    )
    reveal_order: Literal["random", "left_to_right", "confidence"] = field(
        default="random", metadata={"help": f"Re-masking reveal order: one of {REVEAL_ORDERS}."}
    )
    targets: Literal["newly_unmasked", "all_masked_weighted"] = field(
        default="all_masked_weighted",
        metadata={
            "help": f"Positions read per state: one of {TARGETS}; the default has the lower variance at the same cost "
            "(docs/benchmarks.md)."
        },
    )
    scale: Literal["unbiased", "one"] = field(
        default="unbiased", metadata={"help": "Per-block scale c of the dTRPO estimate: 'unbiased' (T_B) or 'one'."}
    )
    vrpo_samples: int = field(default=8, metadata={"help": "Monte Carlo samples n of the vrpo estimator."})
    trajectory_mode: Literal["packed", "exact", "remasked"] = field(
        default="exact", metadata={"help": "State evaluation mode of the trajectory estimator (ground truth)."}
    )

    def __post_init__(self) -> None:
        self.validate_estimator(getattr(self, "block_size", None))  # a DTRPOConfig may know the block size
        parent = getattr(super(), "__post_init__", None)  # the next config in a subclass's MRO
        if parent is not None:
            parent()

    def validate_estimator(self, block_size: int | None = None) -> None:
        """Every option checked, with the flag named; T_B against `block_size` when it is known."""
        choices = {"estimator": tuple(ESTIMATORS), "reveal_order": REVEAL_ORDERS, "targets": TARGETS,
                   "scale": ("unbiased", "one"), "mode": (None, *MODES), "trajectory_mode": MODES}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.vrpo_samples <= 0:
            raise ValueError(f"--vrpo_samples must be positive, got {self.vrpo_samples}")
        steps = self.steps_per_block
        if steps is not None and steps <= 0:
            raise ValueError(f"--steps_per_block must be positive, got {steps}")
        if steps is not None and block_size is not None and block_size % steps:
            raise ValueError(f"--steps_per_block={steps} must divide the block size {block_size} (uniform steps)")

    def estimator_options(self) -> EstimatorConfig:
        """These options alone (a plain `EstimatorConfig`, also when called on a `DTRPOConfig`)."""
        return EstimatorConfig(**{f.name: getattr(self, f.name) for f in fields(EstimatorConfig)})

    def steps(self, block_size: int) -> int:
        """T_B for a block of `block_size` (the block size itself when unset: one token per step); whether it
        divides the block size is checked by the draw (`masking.uniform_step_size`)."""
        return self.steps_per_block or block_size


# ----------------------------------------------------------------------------- scoring


@dataclass
class Cost:
    """What scoring took: forward passes over the batch, and the columns of those passes (rows x width) of
    which `tokens` hold real tokens; the rest is padding."""

    passes: int = 0
    columns: int = 0
    tokens: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.passes + other.passes, self.columns + other.columns, self.tokens + other.tokens)

    @staticmethod
    def of(layout) -> Cost:
        """One pass over `layout`."""
        return Cost(1, layout.valid.numel(), int(layout.valid.sum()))

    @property
    def padding_fraction(self) -> float:
        return 1 - self.tokens / self.columns if self.columns else 0.0


def position_logprobs(
    adapter: ModelAdapter, model: torch.nn.Module, batch: Batch, noisy_ids: torch.Tensor, read: torch.Tensor, mode: str
) -> tuple[torch.Tensor, Cost]:
    """log mu(y_j | state) at the `read` positions (zeros elsewhere), (B, R), and what the passes cost."""
    if mode == "exact":
        return _exact_logprobs(adapter, model, batch, noisy_ids, read)
    grid = (adapter.block_size, adapter.absolute_grid)
    if mode == "packed" and batch.pairs:
        return _pair_logprobs(adapter, model, batch, noisy_ids, read)
    if mode == "packed":
        layout = packed_layout(
            batch.prompt_ids, batch.prompt_valid, batch.response_ids, batch.response_valid, noisy_ids, *grid
        )
    elif mode == "remasked":
        layout = single_layout(batch.prompt_ids, batch.prompt_valid, noisy_ids, batch.response_valid, *grid)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return _layout_logprobs(adapter, model, layout, batch.response_ids, read), Cost.of(layout)


def _layout_logprobs(adapter, model, layout, targets, read) -> torch.Tensor:
    """Gather hidden states at the read columns only, then project and take log-softmax there."""
    B, S = layout.input_ids.shape
    cols = layout.read_columns(adapter.shifted)  # (B, R)
    keep = torch.zeros(B, S, dtype=torch.bool, device=read.device).scatter_(1, cols, read)
    token_at = torch.zeros(B, S, dtype=torch.long, device=read.device).scatter_(1, cols, targets)
    # each response position j owns one distinct column, so reading back by column is a bijection
    slot_at = torch.zeros(B, S, dtype=torch.long, device=read.device).scatter_(
        1, cols, torch.arange(cols.shape[1]).expand(B, -1).to(read.device)
    )
    mask = adapter.attention_mask(model, layout)
    logits = adapter.logits(model, layout.input_ids, mask, layout.position_ids, keep)  # (N, V)
    logp = torch.log_softmax(logits, -1).gather(-1, token_at[keep][:, None])[:, 0]  # (N,)
    out = torch.zeros(B, targets.shape[1], dtype=logp.dtype, device=logp.device)
    rows = torch.arange(B, device=read.device)[:, None].expand(B, S)[keep]
    return out.index_put((rows, slot_at[keep]), logp)


def _pair_logprobs(adapter, model, batch, noisy_ids, read) -> tuple[torch.Tensor, Cost]:
    """Packed-mode log-probs with one row per pair (the prompt once, `pair_layout`), or several pairs per
    row with `batch.pack`. (B, R)"""
    B, R = batch.response_ids.shape
    if not read.any():
        return torch.zeros(B, R, device=read.device), Cost()
    n = B // 2
    pl = pair_layout(
        batch.prompt_ids[:n],
        batch.prompt_valid[:n],
        batch.response_ids,
        batch.response_valid,
        noisy_ids,
        adapter.block_size,
        adapter.absolute_grid,
        adapter.shifted,
        pack=batch.pack,
    )
    layout, (N, S) = pl.layout, pl.layout.input_ids.shape
    rows = pl.rows.to(read.device)[:, None].expand(B, R)  # (B, R) the row holding each sequence
    keep = torch.zeros(N, S, dtype=torch.bool, device=read.device)
    keep[rows[read], pl.reads[read]] = True  # chosen and rejected may share a column (a shifted first token)
    slot = keep.flatten().cumsum(0) - 1  # position of each kept column in the logits' rows
    mask = adapter.attention_mask(model, layout)
    logits = adapter.logits(model, layout.input_ids, mask, layout.position_ids, keep)  # (N, V)
    logp = torch.log_softmax(logits, -1)
    at = slot[rows * S + pl.reads]  # (B, R)
    out = logp[at.clamp(min=0), batch.response_ids]  # (B, R)
    return torch.where(read, out, torch.zeros_like(out)), Cost.of(layout)


def _exact_logprobs(adapter, model, batch, noisy_ids, read) -> tuple[torch.Tensor, Cost]:
    """One forward per block state with the model's inference attention: clean blocks before b, the
    state of block b, and [MASK] after it (cut off for block-causal models, which never attend it).
    Blocks follow the adapter's grid, so on the absolute grid block 0 holds the prompt tail too."""
    bs = adapter.block_size
    B, R = batch.response_ids.shape
    dev = batch.response_ids.device
    out = torch.zeros(B, R, device=dev)
    tail = adapter.tail(batch.prompt_valid)
    block, _ = response_blocks(tail, R, bs)  # (B, R)
    cost = Cost()
    for b in range(int(block.max()) + 1 if R else 0):
        read_b = read & (block == b)
        if not read_b.any():
            continue
        state = torch.where(block < b, batch.response_ids, torch.where(block == b, noisy_ids, adapter.mask_token_id))
        width = min(R, (b + 1) * bs - int(tail.min())) if adapter.block_causal else R
        layout = single_layout(
            batch.prompt_ids,
            batch.prompt_valid,
            state[:, :width],
            batch.response_valid[:, :width],
            bs,
            adapter.absolute_grid,
        )
        logp = _layout_logprobs(adapter, model, layout, batch.response_ids[:, :width], read_b[:, :width])
        out = out + torch.nn.functional.pad(logp, (0, R - width))
        cost = cost + Cost.of(layout)
    return out, cost


def score(adapter: ModelAdapter, model: torch.nn.Module, batch: Batch, draw: list[State]) -> tuple[torch.Tensor, Cost]:
    """Per-sequence estimate `sum_states sum_j w_j log mu(y_j | state)` (B,), and what its passes cost."""
    total, cost = 0.0, Cost()
    for s in draw:
        logp, c = position_logprobs(adapter, model, batch, s.noisy_ids, s.weights != 0, s.mode)
        total = total + (logp * s.weights).sum(-1)
        cost = cost + c
    return total, cost


# ----------------------------------------------------------------------------- draws


def _mode(cfg: EstimatorConfig, adapter: ModelAdapter) -> str:
    return cfg.mode or adapter.default_mode


def _block_states(adapter, batch, seeds, cfg, confidence=None, t_fixed=None, targets=None, scale=None):
    """`draw_block_states` with the configured options on the adapter's grid; `targets` and `scale`
    override them (scale None: unbiased, T_b per block)."""
    return draw_block_states(
        batch.response_ids,
        batch.response_valid,
        seeds,
        adapter.mask_token_id,
        adapter.block_size,
        cfg.steps(adapter.block_size),
        cfg.reveal_order,
        targets or cfg.targets,
        scale=scale if scale is not None else (None if cfg.scale == "unbiased" else 1),
        confidence=confidence,
        t_fixed=t_fixed,
        tail=adapter.tail(batch.prompt_valid),
    )


@torch.no_grad()
def reference_confidence(adapter: ModelAdapter, ref_model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The reference's probability of each dataset token with its block fully masked and earlier
    blocks clean (the order low-confidence remasking would reveal them in). (B, R)"""
    masked = torch.full_like(batch.response_ids, adapter.mask_token_id)
    mode = "packed" if adapter.block_causal else "exact"
    logp, _ = position_logprobs(adapter, ref_model, batch, masked, batch.response_valid, mode)
    return logp.exp()


def draw_dtrpo(adapter, batch, seeds, cfg, ref_model=None, t_fixed=None) -> list[State]:
    conf = reference_confidence(adapter, ref_model, batch) if cfg.reveal_order == "confidence" else None
    st = _block_states(adapter, batch, seeds, cfg, confidence=conf, t_fixed=t_fixed)
    return [State(st.noisy_ids, st.weights, _mode(cfg, adapter))]


def draw_trajectory(adapter, batch, seeds, cfg, ref_model=None) -> list[State]:
    """Every step of every block under the sampled reveal order (same keys as `dtrpo` for the same seeds)."""
    conf = reference_confidence(adapter, ref_model, batch) if cfg.reveal_order == "confidence" else None
    states = []
    for t in range(cfg.steps(adapter.block_size), 0, -1):
        st = _block_states(adapter, batch, seeds, cfg, conf, t_fixed=t, targets="newly_unmasked", scale=1)
        states.append(State(st.noisy_ids, st.weights, cfg.trajectory_mode))
    return states


def draw_vrpo(adapter, batch, seeds, cfg, ref_model=None) -> list[State]:
    """n masked copies at stratified levels t_i in ((i + u_i) / n), tokens masked with probability t,
    masked log-probs weighted 1/t, averaged over the n copies."""
    n = cfg.vrpo_samples
    B, R = batch.response_ids.shape
    levels, coins = torch.empty(B, n), torch.ones(B, n, R)
    lengths = batch.response_valid.sum(-1).tolist()
    for i, seed in enumerate(seeds):  # coins for the example's own tokens only: independent of its batch mates
        g = torch.Generator().manual_seed(int(seed))
        levels[i] = (torch.arange(n) + torch.rand(n, generator=g)) / n
        coins[i, :, : lengths[i]] = torch.rand(n, lengths[i], generator=g)
    levels = levels.clamp(min=1e-3)
    dev = batch.response_ids.device
    states = []
    for s in range(n):
        t = levels[:, s : s + 1]  # (B, 1)
        masked = (coins[:, s] < t).to(dev) & batch.response_valid
        noisy = torch.where(masked, adapter.mask_token_id, batch.response_ids)
        w = masked.float() / (t.to(dev) * n)
        states.append(State(noisy, w, _mode(cfg, adapter)))
    return states


def draw_meanfield(adapter, batch, seeds, cfg, ref_model=None) -> list[State]:
    """The whole response masked, scored in one pass of the single-copy layout (d1's mean field)."""
    noisy = torch.full_like(batch.response_ids, adapter.mask_token_id)
    return [State(noisy, batch.response_valid.float(), "remasked")]


ESTIMATORS = {"dtrpo": draw_dtrpo, "vrpo": draw_vrpo, "meanfield": draw_meanfield, "trajectory": draw_trajectory}


def draw(adapter: ModelAdapter, batch: Batch, seeds: list[int], cfg: EstimatorConfig, ref_model=None) -> list[State]:
    """The states the configured estimator reads, shared by policy and reference."""
    return ESTIMATORS[cfg.estimator](adapter, batch, seeds, cfg, ref_model)
