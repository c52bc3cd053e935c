"""Block-wise semi-autoregressive sampling from a masked diffusion LM (method.md section 8).

Works on token ids only and knows nothing about tokenization. The response is decoded block by
block, left to right; inside a block, `steps_per_block` steps each reveal `k = block_size / steps`
masked positions chosen by a remasking rule, or every position above a confidence threshold.

How a step sees the sequence follows the adapter, never a family name:
- block-causal models (`adapter.attention == 'block_causal'`): the current block attends the
  prompt, the finished blocks and itself. With `use_cache=True` the prompt and each finished block
  are kept in a KV cache; the in-progress block is cropped off after every step and the finished
  block is committed with one extra forward. This is exact: the cached keys and values are the ones
  the uncached forward computes, because under block-causal attention nothing earlier attends later.
- full-attention models (`'full'`, LLaDA/Dream): a fixed canvas of prompt + gen_length with the
  blocks not yet generated as [MASK], full attention, no cache.
- shifted-logit models (`adapter.shifted`): the prediction for position i is read at position i-1;
  the first token of a block at the last position of the previous clean block (or the last prompt
  token), which the KV path keeps from the forward that committed that block.

Choices: the mask token is never sampled (its logit is set to -inf); the confidence of a position is
the model's (untempered) probability of the token sampled there; sequences are cut before the first
EOS (EOS excluded); `tokens_per_second` counts the returned tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dtrpo.masking import Layout, single_layout, tail_lengths
from dtrpo.models import ModelAdapter

REMASKING = ("low_confidence", "random", "margin", "entropy")


@dataclass
class GenerationResult:
    """What `generate` returns. NFE counts every model forward, prefill and cache commits included."""

    sequences: list[list[int]]  # response ids per prompt, cut before the first EOS (EOS excluded)
    lengths: list[int]  # len(sequences[i])
    finished: list[bool]  # whether prompt i produced EOS
    reveal_step: list[list[int]]  # per decoded position (not cut at EOS): the step of its block that revealed it
    blocks: int  # blocks decoded (fewer than gen_length / block_size after an early EOS stop)
    nfe: int  # model forward passes
    seconds: float
    tokens_per_second: float  # sum(lengths) / seconds
    step_logits: list[torch.Tensor] | None = None  # per step, (B, block_size, V) logits read for the block


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
) -> GenerationResult:
    """Generate `gen_length` tokens (at most) for each prompt, batched with left padding.

    Each step reveals `block_size / steps_per_block` masked positions, those with the highest score
    under `remasking` (`low_confidence`: probability of the sampled token; `random`; `margin`: top-1
    minus top-2 probability; `entropy`: lowest entropy first). With `threshold`, a step reveals every
    masked position whose confidence exceeds it, at least one (the best under `remasking`); a block
    then takes as many steps as it needs and `steps_per_block` is only validated. `temperature` 0 is
    argmax, otherwise Gumbel-max sampling from a generator seeded with `seed`. Once every sequence has
    an EOS in a finished block, the remaining blocks are not generated. `use_cache` applies to
    block-causal models only (full-attention models always recompute the canvas). The model should be
    in eval mode. `output_logits` keeps the logits each step read (for tests and debugging).

    On the absolute grid (`adapter.absolute_grid`) a prompt of P tokens ends inside block P // B: that
    block is decoded first, its `B - P % B` response positions masked and the prompt tail attending
    them; each example then generates up to the end of the block holding its `gen_length`-th token.
    A first block shorter than B takes ceil(n / k) steps, the last revealing what is left.

    Fast-dLLM v2's decoding rule: `sub_block_size` (8) decodes each block in sub-blocks left to right,
    each step revealing the sub-block's positions above `threshold` plus its most confident one;
    `fix_first_token` reveals a block's first token at the block's first step (for a shifted model it is
    read at the previous block's last position, so it is already final then).
    """
    bs = _check(adapter, prompts, gen_length, steps_per_block, remasking, threshold, temperature, block_size)
    if sub_block_size is not None and (threshold is None or sub_block_size <= 0 or bs % sub_block_size):
        raise ValueError(
            f"sub_block_size={sub_block_size} needs a threshold and must divide block_size={bs} (Fast-dLLM v2: 8)"
        )
    k = bs // steps_per_block
    start = time.perf_counter()
    device = _device(model)
    prompt_ids, prompt_valid = _left_pad(prompts, adapter.mask_token_id, device)  # (B, P)
    B = len(prompts)
    tail = tail_lengths(prompt_valid, bs, adapter.absolute_grid)  # (B,) prompt tokens in the first block
    quota = gen_length + (bs - tail) % bs  # (B,) response tokens: up to the end of a block
    n_blocks = int(((tail + quota) // bs).max())
    response = torch.full((B, int(quota.max())), adapter.mask_token_id, dtype=torch.long, device=device)  # (B, W)
    reveal_step = torch.full_like(response, -1)
    generator = torch.Generator(device=device).manual_seed(seed)
    cached = use_cache and adapter.block_causal
    decoder = (_KVCacheDecoder if cached else _RecomputeDecoder)(adapter, model, prompt_ids, prompt_valid, bs)
    step_logits: list[torch.Tensor] | None = [] if output_logits else None
    slots = torch.arange(bs, device=device)
    sub = sub_block_size or bs

    with torch.no_grad():
        blocks = 0
        for b in range(n_blocks):
            cols = b * bs + slots[None] - tail[:, None]  # (B, bs) response column of each slot; < 0: prompt tail
            masked = (cols >= 0) & (cols < quota[:, None])
            step = 0
            for s in range(bs // sub):  # one sub-block unless sub_block_size is given
                active = masked & (slots[None] // sub == s)
                for _ in range(steps_per_block if threshold is None else bs):  # threshold: >= 1 reveal per step
                    if not active.any():
                        break
                    logits = decoder.block_logits(response, cols)  # (B, bs, V)
                    if step_logits is not None:
                        step_logits.append(logits.clone())
                    reveal, x0 = denoise_step(
                        logits, active, k, remasking, threshold, temperature, adapter.mask_token_id, generator
                    )
                    if fix_first_token and step == 0:
                        reveal[:, 0] |= masked[:, 0]
                    rows, at = reveal.nonzero(as_tuple=True)
                    response[rows, cols[rows, at]] = x0[rows, at]
                    reveal_step[rows, cols[rows, at]] = step
                    masked &= ~reveal
                    active &= ~reveal
                    step += 1
            blocks = b + 1
            done = (response == eos_token_id).any(-1) if eos_token_id is not None else None
            if blocks == n_blocks or (done is not None and bool(done.all())):
                break
            decoder.commit(response, cols)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    ends = (blocks * bs - tail).clamp(max=quota).tolist()  # decoded response columns per example
    sequences, finished = _cut([row[:e] for row, e in zip(response.tolist(), ends, strict=True)], eos_token_id)
    lengths = [len(s) for s in sequences]
    return GenerationResult(
        sequences=sequences,
        lengths=lengths,
        finished=finished,
        reveal_step=[row[:e] for row, e in zip(reveal_step.tolist(), ends, strict=True)],
        blocks=blocks,
        nfe=decoder.nfe,
        seconds=seconds,
        tokens_per_second=sum(lengths) / max(seconds, 1e-9),
        step_logits=step_logits,
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


# ----------------------------------------------------------------------------- forwards


class _Decoder:
    """The canvas `[prompt | response]` as one copy on the adapter's grid, and the window of columns a
    block's step needs: from the first column any example reads for block b (its first slot, or the
    column before it for a shifted model) to the last column of the block."""

    def __init__(self, adapter, model, prompt_ids, prompt_valid, block_size):
        self.adapter, self.model, self.bs = adapter, model, block_size
        self.prompt_ids, self.prompt_valid = prompt_ids, prompt_valid
        self.nfe = 0

    def _layout(self, response: torch.Tensor) -> Layout:
        valid = torch.ones_like(response, dtype=torch.bool)
        return single_layout(self.prompt_ids, self.prompt_valid, response, valid, self.bs, self.adapter.absolute_grid)

    def _reads(self, cols: torch.Tensor) -> torch.Tensor:
        """(B, bs) canvas column whose logits predict each slot (position i-1 for a shifted model)."""
        return (self.prompt_ids.shape[1] + cols - int(self.adapter.shifted)).clamp(min=0)

    def _window(self, cols: torch.Tensor, width: int) -> tuple[int, int]:
        """[lo, hi): canvas columns read for this block, hi capped at the canvas width."""
        reads = self._reads(cols)
        return int(reads.min()), min(int(self.prompt_ids.shape[1] + cols.max()) + 1, width)

    def _gather(self, logits: torch.Tensor, cols: torch.Tensor, lo: int) -> torch.Tensor:
        """(B, bs, V) logits of the block's slots from the window's logits (B, hi - lo, V)."""
        at = (self._reads(cols) - lo).clamp(max=logits.shape[1] - 1)  # slots past the canvas are never masked
        return logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))


class _RecomputeDecoder(_Decoder):
    """No cache: every step runs the canvas up to the block's last column (block-causal models; later
    blocks are never attended so they are left out) or the whole canvas (full attention)."""

    def block_logits(self, response: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        a, P = self.adapter, self.prompt_ids.shape[1]
        lo, hi = self._window(cols, P + response.shape[1])
        width = hi if a.block_causal else P + response.shape[1]
        layout = self._layout(response[:, : width - P])
        B, S = layout.input_ids.shape
        keep = torch.zeros(B, S, dtype=torch.bool, device=response.device)
        keep[:, lo:hi] = True
        mask = a.attention_mask(self.model, layout)
        logits = a.logits(self.model, layout.input_ids, mask, layout.position_ids, keep)  # (B * (hi - lo), V)
        self.nfe += 1
        return self._gather(logits.view(B, hi - lo, -1), cols, lo)

    def commit(self, response: torch.Tensor, cols: torch.Tensor) -> None:
        """Nothing to store: the next step recomputes the finished blocks."""


class _KVCacheDecoder(_Decoder):
    """Block-causal models: the canvas columns that every example has finished live in a DynamicCache;
    a step runs the block's window against it and is cropped off again. A finished block is committed
    with one forward up to its last column, then the cache is cut back to the next block's window start:
    a kept column then belongs to a finished block of every example, and was computed with all of its
    own block present, which is what makes the cache exact under block-causal attention."""

    def __init__(self, adapter, model, prompt_ids, prompt_valid, block_size):
        from transformers import DynamicCache

        super().__init__(adapter, model, prompt_ids, prompt_valid, block_size)
        self.cache = DynamicCache()

    def block_logits(self, response: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        P = self.prompt_ids.shape[1]
        lo, hi = self._window(cols, P + response.shape[1])
        self._extend(response, lo)
        logits = self._forward(response[:, : hi - P], lo, store=False)  # (B, hi - lo, V)
        return self._gather(logits, cols, lo)

    def commit(self, response: torch.Tensor, cols: torch.Tensor) -> None:
        """Store the finished block: run up to its last column, keep what the next window does not rerun."""
        P = self.prompt_ids.shape[1]
        _, hi = self._window(cols, P + response.shape[1])
        self._forward(response[:, : max(hi - P, 0)], None, store=True)

    def _extend(self, response: torch.Tensor, lo: int) -> None:
        """Make the cache hold exactly columns [0, lo). The first time, the whole prompt is prefilled (a
        prompt column may attend any later prompt column of its block, or of the whole prompt on the
        response grid, so the prompt is run whole) and cut back to lo."""
        if self.cache.get_seq_length() < lo:
            self._forward(response[:, :0], None, store=True)
        past = self.cache.get_seq_length()
        if past > lo:
            self.cache.crop(lo - past)  # negative: tokens removed from the end

    def _forward(self, response: torch.Tensor, lo: int | None, store: bool):
        """Run canvas columns [past, end) against the cache, end = the prompt plus `response`. Returns the
        logits of columns [lo, end) (B, end - lo, V) when `lo` is given, else None."""
        a = self.adapter
        layout = self._layout(response)
        end = layout.input_ids.shape[1]
        past = self.cache.get_seq_length()
        q = end - past
        if q <= 0:
            return None
        full = a.attention_mask(self.model, layout)
        if not isinstance(full, torch.Tensor):
            raise ValueError("KV-cached sampling needs a dense mask (attn_implementation='sdpa'); pass use_cache=False")
        B = layout.input_ids.shape[0]
        keep = torch.zeros(B, q, dtype=torch.bool, device=response.device)
        if lo is not None:
            keep[:, lo - past :] = True
        out = self.model(
            input_ids=layout.input_ids[:, past:end],
            attention_mask=full[:, :, past:end, :end],  # (B, 1, q, end): the query rows of the same mask
            position_ids=layout.position_ids[:, past:end],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep if lo is not None else torch.zeros_like(keep),
        )
        self.nfe += 1
        if self.cache.get_seq_length() != end:
            raise RuntimeError(
                f"the model did not extend the KV cache ({past} -> {self.cache.get_seq_length()}, expected {end}); "
                "it may not take a `cache` argument: pass use_cache=False"
            )
        if not store:
            self.cache.crop(past - end)  # the in-progress block is never stored
        if lo is None:
            return None
        logits = out.logits.float()
        return logits.view(B, end - lo, logits.shape[-1])


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
