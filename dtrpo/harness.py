"""lm-evaluation-harness support: a registered model `dtrpo`, so the standard harness runs on any model
dtrpo loads (any family, no remote code):

    dtrpo lm-eval --model dtrpo --model_args pretrained=PATH,gen_length=256 --tasks gsm8k

(`dtrpo lm-eval` is the harness's own command line, with this module imported so that `--model dtrpo`
exists; from Python, `lm_eval.simple_evaluate(model=DTRPOLM(pretrained=PATH), ...)` after importing it.)

- `generate_until` runs the block sampler; its settings are model_args (`gen_length`, `steps_per_block`,
  `remasking`, `threshold`, `temperature`, `sub_block_size`, `fix_first_token`, `cache`, `block_size`); the
  decoding ones not given take the family's own rule (`dtrpo.decoding`, logged in one line at the start); a
  task's `max_gen_toks` replaces `gen_length` (rounded up to a block), and the text is cut at the first `until`
  string.
- `loglikelihood` of a continuation is an estimate, as every diffusion LM log-likelihood is: by default
  the masked-diffusion ELBO with `mc_samples` Monte Carlo samples (the `vrpo` estimator with
  stratified masking levels: a lower bound of log p, what LLaDA reports in its own evaluations);
  `loglikelihood_estimator=trajectory` gives the exact log-probability of one sampled decoding order
  instead. Draws are seeded by the request text, so scores are reproducible. `is_greedy` says whether
  every continuation token is the argmax at its position with its block masked and earlier blocks clean
  (block-causal models) or with the whole continuation masked (full attention).
- `loglikelihood_rolling` scores the text as a continuation of the tokenizer's EOS token.
"""

from __future__ import annotations

import logging
import math

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from dtrpo.decoding import announce, sampler_kwargs
from dtrpo.estimators import Batch, EstimatorConfig, draw, score
from dtrpo.evaluate import SamplingArgs
from dtrpo.families import load_model
from dtrpo.masking import example_seed, packed_layout, single_layout
from dtrpo.sampler import CACHES, REMASKING, generate

logger = logging.getLogger(__name__)
HARNESS_LOG = logging.getLogger("lm_eval.models.dtrpo")  # shown by the harness's command line, as its own lines


def check_model_args(ints: dict, numbers: dict, choices: dict) -> None:
    """The harness passes model_args as it parsed them ("abc" stays a string): each one of the wrong kind is a
    ValueError naming it. `ints` must be positive integers (a seed: 0 or more) or None, `numbers` finite
    numbers or None, `choices` (value, allowed) pairs or None (a decoding setting left to the family's rule)."""
    for name, value in ints.items():
        low = 0 if name == "seed" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            kind = "an integer, 0 or more" if low == 0 else "a positive integer"
            raise ValueError(f"dtrpo model_args: {name} must be {kind}, got {value!r}")
    for name, value in numbers.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if value is not None and not ok:
            raise ValueError(f"dtrpo model_args: {name} must be a finite number, got {value!r}")
    for name, (value, allowed) in choices.items():
        if value is not None and (value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool)):
            raise ValueError(f"dtrpo model_args: {name} must be one of {allowed}, got {value!r}")


@register_model("dtrpo")
class DTRPOLM(LM):
    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 8,
        gen_length: int = 256,
        steps_per_block: int | None = None,
        remasking: str | None = None,
        threshold: float | None = None,
        temperature: float = 0.0,
        sub_block_size: int | None = None,
        fix_first_token: bool | None = None,
        cache: str = "auto",
        block_size: int | None = None,
        loglikelihood_estimator: str = "vrpo",
        mc_samples: int = 16,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        device: str | None = None,
        seed: int = 0,
        max_batch_size: int | None = None,  # passed by the harness; batches here have a fixed size
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            raise ValueError(f"dtrpo model_args: unknown {sorted(kwargs)}")
        check_model_args(
            ints={"gen_length": gen_length, "mc_samples": mc_samples, "steps_per_block": steps_per_block,
                  "sub_block_size": sub_block_size, "block_size": block_size, "seed": seed},
            numbers={"threshold": threshold, "temperature": temperature},
            choices={"remasking": (remasking, REMASKING), "cache": (cache, CACHES),
                     "dtype": (dtype, ("float32", "bfloat16", "float16")),
                     "fix_first_token": (fix_first_token, (True, False))},
        )  # fmt: skip
        if loglikelihood_estimator not in ("vrpo", "trajectory"):
            raise ValueError(f"loglikelihood_estimator must be 'vrpo' or 'trajectory', got {loglikelihood_estimator!r}")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("device %r asked for but CUDA is not available: running on the CPU", device)
            device = None  # the harness's command line passes "cuda" by default
        device = device or ("cuda" if torch.cuda.is_available() else None)
        self.model, self.tokenizer, self.adapter = load_model(
            pretrained,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
            device=device,
            block_size=block_size,
        )
        self.model.eval()
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        asked = SamplingArgs(
            steps_per_block=steps_per_block,
            remasking=remasking,
            threshold=None if threshold is None else float(threshold),
            sub_block_size=sub_block_size,
            fix_first_token=fix_first_token,
        )
        self.decoding = announce(asked, self.adapter.family, lambda line: HARNESS_LOG.info("dtrpo %s", line))
        self.sampling = dict(
            steps_per_block=self.decoding.steps_per_block or self.adapter.block_size,
            temperature=temperature,
            cache=cache,
            **sampler_kwargs(self.decoding),
        )
        if gen_length % self.adapter.block_size:
            raise ValueError(
                f"dtrpo model_args: gen_length={gen_length} is not a multiple of the block size "
                f"{self.adapter.block_size}"
            )
        self.gen_length, self.seed = gen_length, seed
        self.estimator = EstimatorConfig(
            estimator=loglikelihood_estimator,
            steps_per_block=steps_per_block or self.adapter.block_size,
            vrpo_samples=mc_samples,
            trajectory_mode="packed" if self.adapter.block_causal else "exact",
        )

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        bs = self.adapter.block_size
        for start in tqdm(range(0, len(requests), self.batch_size), disable=disable_tqdm, desc="dtrpo generate"):
            chunk = [r.args for r in requests[start : start + self.batch_size]]
            n_tokens = max(int(kw.get("max_gen_toks", self.gen_length)) for _, kw in chunk)
            result = generate(
                self.adapter,
                self.model,
                [self._encode(context) or [self.tokenizer.eos_token_id] for context, _ in chunk],
                gen_length=-(-n_tokens // bs) * bs,
                seed=self.seed + start,
                eos_token_id=self.tokenizer.eos_token_id,
                **self.sampling,
            )
            for (_, kw), seq in zip(chunk, result.sequences, strict=True):
                text = self.tokenizer.decode(seq, skip_special_tokens=True)
                until = kw.get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0] if stop else text
                out.append(text)
        return out

    # ------------------------------------------------------------------------- likelihoods

    @torch.no_grad()
    def _scores(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(estimated log p(continuation | context), is_greedy) for token id pairs."""
        device = next(self.model.parameters()).device
        pad = self.adapter.mask_token_id
        P, R = max(len(c) for c, _ in pairs), max(len(t) for _, t in pairs)
        batch = Batch(
            torch.tensor([[pad] * (P - len(c)) + c for c, _ in pairs], device=device),
            torch.tensor([[False] * (P - len(c)) + [True] * len(c) for c, _ in pairs], device=device),
            torch.tensor([t + [pad] * (R - len(t)) for _, t in pairs], device=device),
            torch.tensor([[True] * len(t) + [False] * (R - len(t)) for _, t in pairs], device=device),
        )
        seeds = [example_seed(self.seed, "lm-eval", tuple(c), tuple(t)) for c, t in pairs]
        values, _ = score(self.adapter, self.model, batch, draw(self.adapter, batch, seeds, self.estimator))
        a = self.adapter
        masked = torch.where(batch.response_valid, pad, batch.response_ids)
        if a.block_causal:  # each block masked, earlier blocks clean
            layout = packed_layout(
                batch.prompt_ids,
                batch.prompt_valid,
                batch.response_ids,
                batch.response_valid,
                masked,
                a.block_size,
                a.absolute_grid,
            )
        else:  # the whole continuation masked
            layout = single_layout(batch.prompt_ids, batch.prompt_valid, masked, batch.response_valid, a.block_size)
        logits = self.adapter.logits(
            self.model, layout.input_ids, self.adapter.attention_mask(self.model, layout), layout.position_ids
        ).view(len(pairs), layout.input_ids.shape[1], -1)
        cols = layout.read_columns(self.adapter.shifted)  # (B, R)
        best = logits.gather(1, cols[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1)  # (B, R)
        greedy = ((best == batch.response_ids) | ~batch.response_valid).all(-1)
        return [(v.item(), bool(g)) for v, g in zip(values, greedy, strict=True)]

    def _batched(self, pairs, disable_tqdm, desc):
        out = []
        for start in tqdm(range(0, len(pairs), self.batch_size), disable=disable_tqdm, desc=desc):
            out += self._scores(pairs[start : start + self.batch_size])
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (r.args for r in requests):
            ids = self._encode(continuation)
            if not ids:
                raise ValueError(f"lm-eval request with an empty continuation (context {context[-40:]!r})")
            pairs.append((self._encode(context) or [self.tokenizer.eos_token_id], ids))
        return self._batched(pairs, disable_tqdm, "dtrpo loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs = [([self.tokenizer.eos_token_id], self._encode(text)) for (text,) in (r.args for r in requests)]
        return [v for v, _ in self._batched(pairs, disable_tqdm, "dtrpo loglikelihood_rolling")]


def main(argv: list[str]) -> None:
    """The harness's own command line, with the `dtrpo` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv in (["-h"], ["--help"]):
        argv = ["run", "--help"]  # the flags of an evaluation run, not the list of sub-commands
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
