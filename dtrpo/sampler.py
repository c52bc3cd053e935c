"""Block-wise semi-autoregressive sampling from a masked diffusion LM (method.md section 8).

Works on token ids only and knows nothing about tokenization. The response is decoded block by
block, left to right; inside a block, `steps_per_block` steps each reveal `k = block_size / steps`
masked positions chosen by a remasking rule, or every position above a confidence threshold.

The canvas `[prompt | response]` (B, S) is one tensor for the whole generation; every step runs one
forward through a *view*, one small object per way of seeing the canvas (the loop never asks which):
- `_CachedBlocks` (block-causal models, `cache='auto'`, exact): the K/V of every canvas column live in
  buffers allocated once; a step runs only the columns whose K/V are not final yet. A block's first
  step also runs the previous block, now clean, so that block is committed in the same forward, and
  the first step of all runs the prompt too: as many forwards as steps. Exact, because under
  block-causal attention nothing earlier attends later, so a column run with its whole block clean
  has the K/V the uncached forward computes; the in-progress block's K/V are rewritten every step.
- `_Recompute` (`cache='none'`, and full attention under `'auto'`): every step runs the canvas from
  column 0, up to the block's end (block-causal: later blocks are never attended) or whole (full).
- `_PrefixCache` / `_DualCache` (full attention, opt-in, *approximate*: Fast-dLLM's caches): a block's
  first step runs the whole canvas and keeps every column's K/V; its other steps run the block and the
  suffix after it (prefix) or the block alone (dual) against K/V kept from that first step.
- shifted-logit models (`adapter.shifted`): the prediction for position i is read at position i-1;
  the first token of a block at the last column before it, kept from the block's first forward.

Choices: the mask token is never sampled (its logit is set to -inf); the confidence of a position is
the model's (untempered) probability of the token sampled there; sequences are cut before the first
EOS (EOS excluded); `tokens_per_second` counts the returned tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from dtrpo.masking import single_layout, tail_lengths
from dtrpo.models import ModelAdapter

REMASKING = ("low_confidence", "random", "margin", "entropy")
CACHES = ("auto", "none", "prefix", "dual")


@dataclass
class GenerationResult:
    """What `generate` returns. NFE counts every model forward."""

    sequences: list[list[int]]  # response ids per prompt, cut before the first EOS (EOS excluded)
    lengths: list[int]  # len(sequences[i])
    finished: list[bool]  # whether prompt i produced EOS
    reveal_step: list[list[int]]  # per decoded position (not cut at EOS): the step of its block that revealed it
    blocks: int  # blocks decoded (fewer than gen_length / block_size after an early EOS stop)
    nfe: int  # model forward passes
    seconds: float
    tokens_per_second: float  # sum(lengths) / seconds
    step_logits: list[torch.Tensor] | None = None  # per step, (b, block_size, V): the examples still decoding


def generate(
    adapter: ModelAdapter,
    model: torch.nn.Module,
    prompts: list[list[int]],
    gen_length: int,
    steps_per_block: int,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    block_size: int | None = None,
    output_logits: bool = False,
    sub_block_size: int | None = None,
    fix_first_token: bool = False,
    cache: str = "auto",
) -> GenerationResult:
    """Generate `gen_length` tokens (at most) for each prompt, batched with left padding.

    Each step reveals `block_size / steps_per_block` masked positions, those with the highest score
    under `remasking` (`low_confidence`: probability of the sampled token; `random`; `margin`: top-1
    minus top-2 probability; `entropy`: lowest entropy first). With `threshold`, a step reveals every
    masked position whose confidence exceeds it, at least one (the best under `remasking`); a block
    then takes as many steps as it needs and `steps_per_block` is only validated. `temperature` 0 is
    argmax, otherwise Gumbel-max sampling from a generator seeded with `seed`. Once every sequence has
    an EOS in a finished block, the remaining blocks are not generated. The model should be in eval
    mode. `output_logits` keeps the logits each step read (for tests and debugging).

    `cache`: `auto` (the exact fast path: the KV cache for block-causal models, recomputation for
    full attention), `none` (recompute every step), or Fast-dLLM's approximate caches for
    full-attention models, `prefix` and `dual`. `use_cache=False` is `cache='none'`.

    On the absolute grid (`adapter.absolute_grid`) a prompt of P tokens ends inside block P // B: that
    block is decoded first, its `B - P % B` response positions masked and the prompt tail attending
    them; each example then generates up to the end of the block holding its `gen_length`-th token.
    A first block shorter than B takes ceil(n / k) steps, the last revealing what is left.

    Fast-dLLM v2's decoding rule: `sub_block_size` (8) decodes each block in sub-blocks left to right,
    each step revealing the sub-block's positions above `threshold` plus its most confident one;
    `fix_first_token` fixes a block's first token before the block's first forward, for a shifted model
    (its argmax at the previous block's last position, read in a forward of that block clean, one extra
    forward per block), so that forward sees it; for an unshifted model it is revealed at the first step.
    """
    bs = _check(adapter, prompts, gen_length, steps_per_block, remasking, threshold, temperature, block_size)
    if sub_block_size is not None and (threshold is None or sub_block_size <= 0 or bs % sub_block_size):
        raise ValueError(
            f"sub_block_size={sub_block_size} needs a threshold and must divide block_size={bs} (Fast-dLLM v2: 8)"
        )
    view_class = _view_class(adapter, cache if use_cache else "none")
    start = time.perf_counter()
    device = _device(model)
    prompt_ids, prompt_valid = _left_pad(prompts, adapter.mask_token_id, device)  # (B, P)
    plan = _plan(prompt_valid, gen_length, bs, adapter.absolute_grid, int(adapter.shifted))
    batch = _Batch.start(prompt_ids, plan, adapter.mask_token_id)
    view = view_class(adapter, model, plan, batch.canvas, prompt_valid)
    rule = _Rule.of(adapter, plan, steps_per_block, remasking, threshold, temperature, sub_block_size, fix_first_token)
    rule.generator.manual_seed(seed)
    step_logits: list[torch.Tensor] | None = [] if output_logits else None

    with torch.inference_mode():  # cheaper than no_grad: no version counters on the canvas and buffers
        for b in range(plan.n_blocks):
            masked = batch.plan.masked[b].clone()  # (b, bs) slots still [MASK]
            if rule.fix_first and plan.edge_read[b] is not None:
                _fix_first_token(view, batch, b, masked, rule.mask_id)
            _decode_block(view, batch, b, masked, rule, step_logits)
            blocks = b + 1
            batch.decoded[batch.rows] = blocks
            if eos_token_id is not None and batch.drop_finished(eos_token_id, view):
                break
        batch.save()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    sequences, reveal_step = batch.responses(bs)
    sequences, finished = _cut(sequences, eos_token_id)
    lengths = [len(s) for s in sequences]
    return GenerationResult(
        sequences=sequences,
        lengths=lengths,
        finished=finished,
        reveal_step=reveal_step,
        blocks=blocks,
        nfe=view.nfe,
        seconds=seconds,
        tokens_per_second=sum(lengths) / max(seconds, 1e-9),
        step_logits=step_logits,
    )


def _decode_block(view: _View, batch: _Batch, b: int, masked: torch.Tensor, rule: _Rule, step_logits) -> None:
    """Block b's steps (method.md section 8): each runs one forward and reveals the positions the rule picks,
    sub-block by sub-block (one sub-block unless `sub_block_size` is given)."""
    at, bs = batch.plan.cols[b] + batch.plan.P, masked.shape[1]  # (b, bs) canvas column of each slot
    sub_of = torch.arange(bs, device=masked.device) // rule.sub  # (bs,) sub-block of each slot
    step = 0
    for s in range(bs // rule.sub):
        active = masked & (sub_of == s)
        for _ in range(rule.steps[b]):
            if rule.dynamic and not bool(active.any()):  # the stop decision: a host sync, threshold mode only
                break
            logits = view.logits(batch.canvas, b)  # (b, bs, V)
            if step_logits is not None:
                step_logits.append(logits)
            reveal, x0 = denoise_step(
                logits, active, rule.k, rule.remasking, rule.threshold, rule.temperature, rule.mask_id, rule.generator
            )
            if rule.reveal_first and step == 0:
                reveal[:, 0] |= masked[:, 0]
            batch.write(at, reveal, x0, step)
            masked &= ~reveal
            active &= ~reveal
            step += 1


def _fix_first_token(view: _View, batch: _Batch, b: int, masked: torch.Tensor, mask_id: int) -> None:
    """Fast-dLLM v2: block b's first token, the argmax at the column before the block (every earlier block clean),
    written before the block's first forward. Clears it from `masked`."""
    logits = view.edge(batch.canvas, b).float()  # (b, V)
    logits[:, mask_id] = float("-inf")
    first = torch.zeros_like(masked)
    first[:, 0] = masked[:, 0]
    batch.write(batch.plan.cols[b] + batch.plan.P, first, logits.argmax(-1)[:, None].expand_as(masked), 0)
    masked &= ~first


@dataclass(frozen=True)
class _Rule:
    """How the positions to reveal are picked: fixed for one generation."""

    k: int  # positions per step (without a threshold)
    remasking: str
    threshold: float | None
    temperature: float
    mask_id: int
    generator: torch.Generator
    steps: list[int]  # per block, the most steps it may take
    dynamic: bool  # whether a block's steps end on a stop decision (threshold) rather than a count
    sub: int  # sub-block size (the block size unless Fast-dLLM v2's sub-blocks)
    fix_first: bool  # Fast-dLLM v2's first token, fixed before the block's first forward (shifted)
    reveal_first: bool  # the first token revealed at the first step (unshifted)

    @staticmethod
    def of(adapter, plan, steps_per_block, remasking, threshold, temperature, sub_block_size, fix_first_token) -> _Rule:
        bs = plan.cols.shape[-1]
        k = bs // steps_per_block
        fix_first, reveal_first = fix_first_token and adapter.shifted, fix_first_token and not adapter.shifted
        # without a threshold the number of steps is known on the host: no synchronisation per step
        dynamic = threshold is not None or reveal_first  # (revealing slot 0 on top of k makes the count data-dependent)
        todo = plan.masked.sum(-1) - (plan.masked[..., 0].long() if fix_first else 0)  # (n_blocks, B)
        steps = [bs] * plan.n_blocks if dynamic else [-(-n // k) for n in todo.amax(-1).tolist()]
        generator = torch.Generator(device=plan.cols.device)
        return _Rule(
            k, remasking, threshold, temperature, adapter.mask_token_id, generator, steps, dynamic,
            sub_block_size or bs, fix_first, reveal_first,
        )  # fmt: skip


@dataclass
class _Batch:
    """The canvas of the examples still decoding (`rows` of the batch), and the whole batch's result."""

    canvas: torch.Tensor  # (b, S) token ids: prompt, decoded tokens, [MASK]
    when: torch.Tensor  # (b, S) the step that revealed each column, -1 elsewhere
    rows: torch.Tensor  # (b,) the examples still decoding
    plan: _Plan
    out: torch.Tensor  # (B, S) canvas of the whole batch (rows that left keep their last state)
    out_when: torch.Tensor  # (B, S)
    decoded: torch.Tensor  # (B,) blocks decoded per example
    full_plan: _Plan

    @staticmethod
    def start(prompt_ids: torch.Tensor, plan: _Plan, mask_id: int) -> _Batch:
        masks = torch.full_like(prompt_ids[:, :1], mask_id).expand(-1, plan.S - plan.P)
        canvas = torch.cat([prompt_ids, masks], 1)  # (B, S)
        when = torch.full_like(canvas, -1)
        rows = torch.arange(canvas.shape[0], device=canvas.device)
        return _Batch(canvas, when, rows, plan, canvas.clone(), when.clone(), torch.zeros_like(rows), plan)

    def write(self, at: torch.Tensor, reveal: torch.Tensor, x0: torch.Tensor, step: int) -> None:
        """Put the revealed tokens into the canvas, in place and without a host sync; `at` (b, bs) the columns."""
        self.canvas.scatter_(1, at, torch.where(reveal, x0, self.canvas.gather(1, at)))  # a row's columns differ
        self.when.scatter_(1, at, torch.where(reveal, step, self.when.gather(1, at)))

    def drop_finished(self, eos_token_id: int, view: _View) -> bool:
        """Rows with an EOS leave the batch (later forwards run only the others); True when none is left."""
        done = (self.canvas[:, self.plan.P :] == eos_token_id).any(-1)  # (b,)
        n_done = int(done.sum())  # the stop decision: the one host sync of a block
        if n_done == done.shape[0]:
            return True
        if n_done:
            self.save()
            keep = (~done).nonzero()[:, 0]
            self.rows, self.canvas, self.when, self.plan = (
                self.rows[keep],
                self.canvas[keep],
                self.when[keep],
                self.plan.select(keep),
            )
            view.select(keep, self.plan)
        return False

    def save(self) -> None:
        self.out[self.rows], self.out_when[self.rows] = self.canvas, self.when

    def responses(self, bs: int) -> tuple[list[list[int]], list[list[int]]]:
        """Every example's decoded response columns and their reveal steps."""
        plan = self.full_plan
        ends = (self.decoded * bs - plan.tail).clamp(max=plan.quota).tolist()
        tokens, when = self.out[:, plan.P :].tolist(), self.out_when[:, plan.P :].tolist()
        return [t[:e] for t, e in zip(tokens, ends, strict=True)], [w[:e] for w, e in zip(when, ends, strict=True)]


# ----------------------------------------------------------------------------- where the blocks lie


@dataclass
class _Plan:
    """Where every block lies on the canvas `[prompt | response]` (B, S), computed once per generation.
    The window of block b is canvas columns [lo[b], hi[b]): from the first column where any example's block b
    starts to the last where one ends (the grid shifts per example on the absolute grid, by its tail)."""

    P: int  # prompt width (left-padded)
    S: int  # canvas width: the prompt and every column a block slot can reach
    n_blocks: int
    tail: torch.Tensor  # (B,) prompt tokens in the first block (absolute grid), else 0
    quota: torch.Tensor  # (B,) response tokens to decode: up to the end of a block
    cols: torch.Tensor  # (n_blocks, B, bs) response column of each slot; < 0: the prompt tail
    masked: torch.Tensor  # (n_blocks, B, bs) slots to decode
    reads: torch.Tensor  # (n_blocks, B, bs) canvas column whose logits predict each slot (i - 1 when shifted)
    lo: list[int]
    hi: list[int]
    starts_max: list[int]  # the last column where an example's block b starts
    first_read: list[int]  # the first column any slot of block b reads
    edge_read: list[int | None]  # the first column read for a slot 0 (the column before a block), None: no slot 0

    def select(self, keep: torch.Tensor) -> _Plan:
        """The plan of rows `keep` only; the windows of the whole batch still cover them."""
        return replace(
            self, tail=self.tail[keep], quota=self.quota[keep], cols=self.cols[:, keep], masked=self.masked[:, keep],
            reads=self.reads[:, keep],
        )  # fmt: skip


def _plan(prompt_valid: torch.Tensor, gen_length: int, bs: int, absolute: bool, shift: int = 0) -> _Plan:
    P = prompt_valid.shape[1]
    tail = tail_lengths(prompt_valid, bs, absolute)  # (B,)
    quota = gen_length + (bs - tail) % bs
    n_blocks = int(((tail + quota) // bs).max())
    t_min, t_max = int(tail.min()), int(tail.max())
    dev = prompt_valid.device
    block = torch.arange(n_blocks, device=dev)[:, None, None]
    cols = block * bs + torch.arange(bs, device=dev) - tail[None, :, None]  # (n_blocks, B, bs)
    masked = (cols >= 0) & (cols < quota[None, :, None])
    reads = (P + cols - shift).clamp(min=0)
    lo = [P + b * bs - t_max for b in range(n_blocks)]
    far = P + n_blocks * bs  # past every column: the minimum over no slot
    first = torch.where(masked, reads, far).flatten(1).amin(-1).tolist()  # over decoded slots
    edge = torch.where(masked[..., 0], reads[..., 0], far).amin(-1).tolist()
    return _Plan(
        P=P,
        S=P + n_blocks * bs - t_min,
        n_blocks=n_blocks,
        tail=tail,
        quota=quota,
        cols=cols,
        masked=masked,
        reads=reads,
        lo=lo,
        hi=[P + (b + 1) * bs - t_min for b in range(n_blocks)],
        starts_max=[P + b * bs - t_min for b in range(n_blocks)],
        first_read=first,
        edge_read=[None if e == far else e for e in edge],
    )


# ----------------------------------------------------------------------------- one denoising step


def denoise_step(
    logits: torch.Tensor,  # (B, bs, V) the model's logits for the block's positions
    masked: torch.Tensor,  # (B, bs) bool: still [MASK]
    k: int,
    remasking: str,
    threshold: float | None,
    temperature: float,
    mask_token_id: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a token at every position and choose which masked positions to reveal.

    Returns `reveal` (B, bs) bool, a subset of `masked`, and the sampled tokens `x0` (B, bs).
    """
    logits = logits.float().clone()
    logits[..., mask_token_id] = float("-inf")  # a revealed position never becomes [MASK] again
    if temperature == 0:
        x0 = logits.argmax(-1)
    else:  # Gumbel-max in float64: low-precision Gumbel noise visibly skews the samples of large vocabularies
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
        x0 = (logits.double() / temperature - torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)
    probs = torch.softmax(logits, -1)  # (B, bs, V)
    confidence = probs.gather(-1, x0[..., None])[..., 0]  # (B, bs)
    score = _score(remasking, probs, confidence, generator).masked_fill(~masked, float("-inf"))
    if threshold is None:
        top = score.topk(min(k, score.shape[1]), dim=-1).indices
        reveal = torch.zeros_like(masked).scatter_(1, top, True)
    else:  # at least one per step: the best masked position under the remasking rule
        best = torch.zeros_like(masked).scatter_(1, score.argmax(-1, keepdim=True), True)
        reveal = (confidence > threshold) | best
    return reveal & masked, x0


def _score(remasking: str, probs: torch.Tensor, confidence: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, bs) priority of each position: higher is revealed first."""
    if remasking == "low_confidence":
        return confidence
    if remasking == "random":
        return torch.rand(confidence.shape, generator=generator, device=confidence.device)
    if remasking == "margin":
        top2 = probs.topk(2, dim=-1).values  # (B, bs, 2)
        return top2[..., 0] - top2[..., 1]
    return -torch.special.entr(probs).sum(-1)  # entropy: lowest first; entr(0) = 0, no NaN from log(0)


# ----------------------------------------------------------------------------- ways of seeing the canvas


class _View:
    """One way of seeing the canvas. `logits(canvas, b)` runs one forward for a step of block b and returns the
    logits the block's slots read (B, bs, V); `edge(canvas, b)` runs one forward and returns the logits at each
    example's last column before block b (B, V), with the blocks before b clean (Fast-dLLM v2's first token)."""

    def __init__(self, adapter: ModelAdapter, model, plan: _Plan, canvas: torch.Tensor, prompt_valid: torch.Tensor):
        self.adapter, self.model, self.plan, self.nfe = adapter, model, plan, 0
        P = plan.P
        response = canvas[:, P:]
        self.layout = single_layout(
            canvas[:, :P], prompt_valid, response, torch.ones_like(response, dtype=torch.bool),
            plan.cols.shape[-1], adapter.absolute_grid,
        )  # fmt: skip
        self.mask = adapter.attention_mask(model, self.layout)  # (B, 1, S, S) additive, built once; or a BlockMask
        self.edge_logits: torch.Tensor | None = None  # (B, V) logits at the column before the current block

    def select(self, keep: torch.Tensor, plan: _Plan) -> None:
        """Keep rows `keep` only (sequences that finished leave the batch)."""
        fields = {f: getattr(self.layout, f)[keep] for f in _COLUMN_FIELDS}
        self.plan, self.layout = plan, replace(self.layout, **fields, tail=self.layout.tail[keep])
        if isinstance(self.mask, torch.Tensor):
            self.mask = self.mask[keep]
        if self.edge_logits is not None:
            self.edge_logits = self.edge_logits[keep]
        if getattr(self, "cache", None) is not None:
            self.cache.select(keep)

    def _forward(self, canvas, lo: int, hi: int, need: int, cache: _Buffers | None = None) -> torch.Tensor:
        """Run canvas columns [lo, hi) (against `cache`, which holds the other columns' K/V, when given); returns
        the logits of columns [need, hi) (B, hi - need, V)."""
        kw = {"use_cache": False} if cache is None else {"cache": cache, "use_cache": True}
        if cache is not None:
            cache.lo = lo
        out = self.model(
            input_ids=canvas[:, lo:hi],
            attention_mask=self._mask(lo, hi, hi if cache is None else cache.end),
            position_ids=self.layout.position_ids[:, lo:hi],
            logits_to_keep=hi - need,
            **kw,
        )
        self.nfe += 1
        return out.logits.float()

    def _mask(self, lo: int, hi: int, keys: int):
        """The rows [lo, hi) of the canvas mask over keys [0, keys): a view of the mask built once."""
        if isinstance(self.mask, torch.Tensor):
            return self.mask[:, :, lo:hi, :keys]
        if lo or keys != hi:
            raise ValueError("a KV cache needs a dense mask (attn_implementation='sdpa'); pass cache='none'")
        cut = replace(self.layout, **{f: getattr(self.layout, f)[:, :hi] for f in _COLUMN_FIELDS})
        return self.adapter.attention_mask(self.model, cut)

    def _read(self, logits: torch.Tensor, need: int, b: int) -> torch.Tensor:
        """(B, bs, V) logits of block b's slots from those of columns [need, ...). A shifted model reads slot 0
        at the column before the block: kept from the forward that had it (the block's first)."""
        reads = self.plan.reads[b]  # (B, bs)
        at = (reads - need).clamp(0, logits.shape[1] - 1)
        out = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))  # (B, bs, V)
        edge = self.plan.edge_read[b]
        if self.adapter.shifted and edge is not None:
            if need <= edge:
                self.edge_logits = out[:, 0]
            else:
                out[:, 0] = self.edge_logits
        return out

    def _edge(self, logits: torch.Tensor, need: int, b: int) -> torch.Tensor:
        at = (self.plan.reads[b][:, 0] - need).clamp(0, logits.shape[1] - 1)  # (B,)
        self.edge_logits = logits[torch.arange(logits.shape[0], device=logits.device), at]  # (B, V)
        return self.edge_logits


_COLUMN_FIELDS = ("input_ids", "position_ids", "kind", "block", "valid")


class _Recompute(_View):
    """No cache: every step runs the canvas from column 0 to the block's end (block-causal models: later blocks
    are never attended) or the whole canvas (full attention)."""

    def _end(self, b: int) -> int:
        return self.plan.hi[b] if self.adapter.block_causal else self.plan.S

    def logits(self, canvas: torch.Tensor, b: int) -> torch.Tensor:
        need = self.plan.first_read[b]
        return self._read(self._forward(canvas, 0, self._end(b), need), need, b)

    def edge(self, canvas: torch.Tensor, b: int) -> torch.Tensor:
        need = self.plan.edge_read[b]
        end = self.plan.starts_max[b] if self.adapter.block_causal else self.plan.S
        return self._edge(self._forward(canvas, 0, end, need), need, b)


class _CachedBlocks(_View):
    """Block-causal models, exact: the K/V of canvas columns [0, final) are final for every example (their blocks
    were run clean); a step runs [final, block end) and writes those columns' K/V in place, so the block's first
    step also commits the previous block (and the first step of all prefills the prompt)."""

    def __init__(self, *args):
        super().__init__(*args)
        if not isinstance(self.mask, torch.Tensor):
            raise ValueError("KV-cached sampling needs a dense mask (attn_implementation='sdpa'); pass cache='none'")
        self.cache = _Buffers(self.plan.S)
        self.final = 0

    def _run(self, canvas, hi: int, need: int, b: int) -> torch.Tensor:
        lo, self.cache.end = self.final, hi
        logits = self._forward(canvas, lo, hi, max(lo, need), self.cache)
        self.final = self.plan.lo[b]  # every column before block b's window was run with its block clean
        return logits

    def logits(self, canvas: torch.Tensor, b: int) -> torch.Tensor:
        need = max(self.final, self.plan.first_read[b])
        return self._read(self._run(canvas, self.plan.hi[b], need, b), need, b)

    def edge(self, canvas: torch.Tensor, b: int) -> torch.Tensor:
        need = max(self.final, self.plan.edge_read[b])
        return self._edge(self._run(canvas, self.plan.starts_max[b], need, b), need, b)


class _PrefixCache(_View):
    """Full attention, Fast-dLLM's prefix cache, an *approximation*: a block's first step runs the whole canvas
    and keeps every column's K/V; its other steps run the block and everything after it against the prompt's
    and finished blocks' K/V from that first step (computed while the block was still masked there). Exact at a
    block's first step only."""

    suffix = True  # later steps also rerun the masked suffix (the dual cache keeps it too)

    def __init__(self, *args):
        super().__init__(*args)
        if not isinstance(self.mask, torch.Tensor):
            raise ValueError(f"cache={self.name!r} needs a dense mask (attn_implementation='sdpa')")
        self.cache = _Buffers(self.plan.S)
        self.block = -1

    name = "prefix"

    def logits(self, canvas: torch.Tensor, b: int) -> torch.Tensor:
        plan = self.plan
        lo, hi = (0, plan.S) if b != self.block else (plan.lo[b], plan.S if self.suffix else plan.hi[b])
        self.block = b
        need = max(lo, plan.first_read[b])
        return self._read(self._forward(canvas, lo, hi, need, self.cache), need, b)

    def edge(self, canvas: torch.Tensor, b: int) -> torch.Tensor:
        self.block = -1  # the next step refreshes the cache
        need = self.plan.edge_read[b]
        return self._edge(self._forward(canvas, 0, self.plan.S, need, self.cache), need, b)


class _DualCache(_PrefixCache):
    """Full attention, Fast-dLLM's dual cache, an *approximation*: as the prefix cache, and the masked suffix's
    K/V are kept from the block's first step too, so a later step runs the block alone."""

    suffix = False
    name = "dual"


class _Buffers:
    """Per-layer K/V of the whole canvas, allocated at the first write and then written in place: a forward's
    columns go to [lo, lo + q) and attention reads keys [0, end). The one method of transformers' `Cache` that
    the attention layers call is `update`."""

    def __init__(self, width: int):
        self.width, self.lo, self.end = width, 0, width
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:  # (B, H, S, D), once per generation
            B, H, _, D = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(B, H, self.width, D)
            self.values[layer_idx] = value_states.new_zeros(B, H, self.width, value_states.shape[-1])
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        q = key_states.shape[2]
        keys[:, :, self.lo : self.lo + q] = key_states
        values[:, :, self.lo : self.lo + q] = value_states
        return keys[:, :, : self.end], values[:, :, : self.end]

    def select(self, keep: torch.Tensor) -> None:
        for layer in self.keys:
            self.keys[layer], self.values[layer] = self.keys[layer][keep], self.values[layer][keep]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.end


def _view_class(adapter: ModelAdapter, cache: str) -> type[_View]:
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if cache in ("prefix", "dual") and adapter.block_causal:
        raise ValueError(
            f"cache={cache!r} is Fast-dLLM's approximate cache for full-attention models; a block-causal model's "
            "exact KV cache is cache='auto'"
        )
    if cache == "auto":
        return _CachedBlocks if adapter.block_causal else _Recompute
    return {"none": _Recompute, "prefix": _PrefixCache, "dual": _DualCache}[cache]


# ----------------------------------------------------------------------------- helpers


def _check(adapter, prompts, gen_length, steps, remasking, threshold, temperature, block_size) -> int:
    """Validate the arguments; returns the block size."""
    bs = adapter.block_size if block_size is None else block_size
    if bs <= 0:
        raise ValueError(f"block_size must be positive, got {bs}")
    if adapter.block_causal and bs != adapter.block_size:
        raise ValueError(
            f"block_size={bs} differs from the model's block_size={adapter.block_size}; a block-causal model "
            "must be sampled with the block size it was trained with"
        )
    if steps <= 0:
        raise ValueError(f"steps_per_block must be positive, got {steps}")
    if bs % steps:
        raise ValueError(f"steps_per_block={steps} must divide block_size={bs}")
    if gen_length <= 0 or gen_length % bs:
        raise ValueError(f"gen_length={gen_length} must be a positive multiple of block_size={bs}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    return bs


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and validity, left-padded; the pad id is never attended, so any id in the vocabulary works."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[i, P - len(p) :] = True
    return ids.to(device), valid.to(device)


def _cut(rows: list[list[int]], eos_token_id: int | None) -> tuple[list[list[int]], list[bool]]:
    """Each row up to (not including) its first EOS, and whether it had one."""
    if eos_token_id is None:
        return rows, [False] * len(rows)
    out, finished = [], []
    for row in rows:
        end = row.index(eos_token_id) if eos_token_id in row else len(row)
        out.append(row[:end])
        finished.append(end < len(row))
    return out, finished
