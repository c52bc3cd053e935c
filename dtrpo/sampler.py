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

from dtrpo.masking import Layout, single_layout
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
    """
    bs = _check(adapter, prompts, gen_length, steps_per_block, remasking, threshold, temperature, block_size)
    k = bs // steps_per_block
    start = time.perf_counter()
    device = _device(model)
    prompt_ids, prompt_valid = _left_pad(prompts, adapter.mask_token_id, device)  # (B, P)
    B = len(prompts)
    response = torch.full((B, gen_length), adapter.mask_token_id, dtype=torch.long, device=device)  # (B, R)
    reveal_step = torch.full((B, gen_length), -1, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    cached = use_cache and adapter.block_causal
    decoder = (_KVCacheDecoder if cached else _RecomputeDecoder)(adapter, model, prompt_ids, prompt_valid, bs)
    step_logits: list[torch.Tensor] | None = [] if output_logits else None

    with torch.no_grad():
        blocks = 0
        for b in range(gen_length // bs):
            cols = slice(b * bs, (b + 1) * bs)
            masked = torch.ones(B, bs, dtype=torch.bool, device=device)
            for step in range(steps_per_block if threshold is None else bs):  # threshold: >= 1 reveal per step
                if not masked.any():
                    break
                logits = decoder.block_logits(response, b)  # (B, bs, V)
                if step_logits is not None:
                    step_logits.append(logits.clone())
                reveal, x0 = denoise_step(
                    logits, masked, k, remasking, threshold, temperature, adapter.mask_token_id, generator
                )
                response[:, cols] = torch.where(reveal, x0, response[:, cols])
                reveal_step[:, cols] = torch.where(reveal, step, reveal_step[:, cols])
                masked &= ~reveal
            blocks = b + 1
            done = (response[:, : blocks * bs] == eos_token_id).any(-1) if eos_token_id is not None else None
            if blocks == gen_length // bs or (done is not None and bool(done.all())):
                break
            decoder.commit(response, b)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    sequences, finished = _cut(response[:, : blocks * bs].tolist(), eos_token_id)
    lengths = [len(s) for s in sequences]
    return GenerationResult(
        sequences=sequences,
        lengths=lengths,
        finished=finished,
        reveal_step=reveal_step[:, : blocks * bs].tolist(),
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


class _RecomputeDecoder:
    """No cache: every step runs the prompt, the finished blocks and the current block (block-causal
    models; later blocks are never attended so they are left out) or the whole canvas (full attention)."""

    def __init__(self, adapter, model, prompt_ids, prompt_valid, block_size):
        self.adapter, self.model, self.bs = adapter, model, block_size
        self.prompt_ids, self.prompt_valid = prompt_ids, prompt_valid
        self.nfe = 0

    def block_logits(self, response: torch.Tensor, b: int) -> torch.Tensor:
        a, bs = self.adapter, self.bs
        width = (b + 1) * bs if a.block_causal else response.shape[1]
        layout = _layout(self.prompt_ids, self.prompt_valid, response[:, :width], bs)
        B, S = layout.input_ids.shape
        cols = layout.read_columns(a.shifted, bs)[b * bs : (b + 1) * bs]  # (bs,) ascending
        keep = torch.zeros(B, S, dtype=torch.bool, device=response.device)
        keep[:, cols] = True
        mask = a.attention_mask(self.model, layout)
        logits = a.logits(self.model, layout.input_ids, mask, layout.position_ids, keep)  # (B * bs, V)
        self.nfe += 1
        return logits.view(B, bs, -1)

    def commit(self, response: torch.Tensor, b: int) -> None:
        """Nothing to store: the next step recomputes the finished blocks."""


class _KVCacheDecoder:
    """Block-causal models: the prompt and each finished block live in a DynamicCache; a step runs the
    current block alone against it and is cropped off again; a finished block is committed with one forward."""

    def __init__(self, adapter, model, prompt_ids, prompt_valid, block_size):
        from transformers import DynamicCache

        self.adapter, self.model, self.bs = adapter, model, block_size
        self.prompt_ids, self.prompt_valid = prompt_ids, prompt_valid
        self.cache = DynamicCache()
        self.nfe = 0
        empty = prompt_ids[:, :0]
        # shifted: the last prompt position predicts the response's first token
        self.last = self._forward(empty, store=True)  # (B, V) or None

    def block_logits(self, response: torch.Tensor, b: int) -> torch.Tensor:
        logits = self._forward(response[:, : (b + 1) * self.bs], store=False)
        if not self.adapter.shifted:
            return logits
        return torch.cat([self.last[:, None], logits], 1)  # (B, bs, V): token 0 read at the previous clean block

    def commit(self, response: torch.Tensor, b: int) -> None:
        self.last = self._forward(response[:, : (b + 1) * self.bs], store=True)

    def _forward(self, response: torch.Tensor, store: bool) -> torch.Tensor | None:
        """Run the last block of `response` (or the whole prompt when it is empty) against the cache.

        Returns, when `store`, the last position's logits (B, V) for a shifted model (else None);
        otherwise the block's logits, (B, bs, V) unshifted or (B, bs - 1, V) shifted.
        """
        a = self.adapter
        layout = _layout(self.prompt_ids, self.prompt_valid, response, self.bs)
        B, S = layout.input_ids.shape
        past = self.cache.get_seq_length()
        q = S - past
        full = a.attention_mask(self.model, layout)
        if not isinstance(full, torch.Tensor):
            raise ValueError("KV-cached sampling needs a dense mask (attn_implementation='sdpa'); pass use_cache=False")
        keep = torch.zeros(B, q, dtype=torch.bool, device=response.device)
        if store:
            keep[:, -1] = a.shifted
        else:
            keep[:, : q - 1 if a.shifted else q] = True
        out = self.model(
            input_ids=layout.input_ids[:, past:],
            attention_mask=full[:, :, past:, :],  # (B, 1, q, S): the query rows of the same block-causal mask
            position_ids=layout.position_ids[:, past:],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        self.nfe += 1
        if self.cache.get_seq_length() != S:
            raise RuntimeError(
                f"the model did not extend the KV cache ({past} -> {self.cache.get_seq_length()}, expected {S}); "
                "it may not take a `cache` argument: pass use_cache=False"
            )
        if not store:
            self.cache.crop(-q)  # the in-progress block is never stored
        logits = out.logits.float()
        if store:
            return logits if a.shifted else None  # (B, V)
        return logits.view(B, -1, logits.shape[-1])


def _layout(prompt_ids: torch.Tensor, prompt_valid: torch.Tensor, response: torch.Tensor, block_size: int) -> Layout:
    """Prompt + response as one copy, labelled clean: the block-causal rule is then the model's own
    inference attention (block b sees the prompt and blocks <= b)."""
    valid = torch.ones_like(response, dtype=torch.bool)
    return single_layout(prompt_ids, prompt_valid, response, valid, block_size)


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
