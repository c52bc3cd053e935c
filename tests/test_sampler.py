"""Tests of the block-wise sampler: exactness of the KV cache, the remasking rules on a mock model with
hand-designed logits, threshold mode, seeding, EOS stopping, left padding, logit shift, NFE and errors."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from dtrpo.models import ModelAdapter, adapter_from_config, make_char_tokenizer, make_tiny_model
from dtrpo.sampler import generate

EOS, MASK = 1, 2  # mock vocabulary: 0 pad, 1 EOS, 2 [MASK], 3.. ordinary tokens
V = 40


class PositionModel(torch.nn.Module):
    """Mock LM whose logits depend only on the position id: `logits[b, s] = fn(position_ids[b, s])`.

    Records the width and attention mask of every call. Honours `logits_to_keep` the way transformers does
    (a boolean one gathers the hidden states, flattened to (N, V); an int n keeps the last n positions).
    """

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the sampler a device
        self.calls: list[SimpleNamespace] = []

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0, use_cache=False, **kwargs):
        assert "cache" not in kwargs, "the mock has no KV cache"
        self.calls.append(
            SimpleNamespace(
                rows=input_ids.shape[0], width=input_ids.shape[1], mask=attention_mask == 0, position_ids=position_ids
            )
        )
        logits = torch.stack([torch.stack([self.fn(int(p)) for p in row]) for row in position_ids])  # (B, S, V)
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[logits_to_keep]
        elif logits_to_keep:  # an int n keeps the last n positions, as in transformers
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


def table_fn(rows: dict[int, list[float]]):
    """Position -> logits: log of the given probabilities over tokens 3, 4, ...; other positions uniform."""

    def fn(pos: int) -> torch.Tensor:
        logits = torch.full((V,), -1e9)
        probs = rows.get(pos)
        if probs is None:
            return torch.zeros(V)
        logits[3 : 3 + len(probs)] = torch.log(torch.tensor(probs))
        return logits

    return fn


def echo_fn(eos_at: int | None = None):
    """Position p predicts token 3 + p (or EOS at position `eos_at`) with probability ~1."""

    def fn(pos: int) -> torch.Tensor:
        logits = torch.zeros(V)
        logits[EOS if pos == eos_at else 3 + pos] = 20.0
        return logits

    return fn


def mock_adapter(block_size=4, **kw) -> ModelAdapter:
    return ModelAdapter(family="mock", mask_token_id=MASK, block_size=block_size, **kw)


# Four response positions (prompt of 2 tokens -> position ids 2..5), probabilities over tokens 3, 4, ...
#   pos 0: [.50, .45, .05]          p(top) .50  margin .05  entropy .50ln2 + .45ln(1/.45) + .05ln20 = 0.856
#   pos 1: [.40, .15, .15, .15, .15] p(top) .40  margin .25  entropy 1.505
#   pos 2: [.60, .20, .20]          p(top) .60  margin .40  entropy 0.950
#   pos 3: [.45, .55]               p(top) .55  margin .10  entropy 0.688  (argmax is token 4)
ROWS = {
    2: [0.50, 0.45, 0.05],
    3: [0.40, 0.15, 0.15, 0.15, 0.15],
    4: [0.60, 0.20, 0.20],
    5: [0.45, 0.55],
}
PROMPT = [10, 11]


# Reveal orders with k = 1:  low_confidence 2,3,0,1   margin 2,1,3,0   entropy 3,0,2,1
# written as the step that reveals positions 0..3:
@pytest.mark.parametrize(
    "rule, steps",
    [("low_confidence", [2, 3, 0, 1]), ("margin", [3, 1, 0, 2]), ("entropy", [1, 3, 2, 0])],
)
def test_remasking_rule_reveal_order(rule, steps):
    model = PositionModel(table_fn(ROWS))
    out = generate(mock_adapter(), model, [PROMPT], gen_length=4, steps_per_block=4, remasking=rule, use_cache=False)
    assert out.reveal_step == [steps]
    assert out.sequences == [[3, 3, 3, 4]]
    assert out.nfe == 4


def test_low_confidence_two_per_step():
    """k = 4 / 2 = 2: the two most confident (pos 2 at .60, pos 3 at .55) first, then pos 0 and 1."""
    out = generate(mock_adapter(), PositionModel(table_fn(ROWS)), [PROMPT], 4, 2, use_cache=False)
    assert out.reveal_step == [[1, 1, 0, 0]]
    assert out.nfe == 2


def test_random_rule_is_seeded():
    model = PositionModel(table_fn(ROWS))
    orders = [
        generate(mock_adapter(), model, [PROMPT], 4, 4, remasking="random", seed=s, use_cache=False).reveal_step[0]
        for s in range(6)
    ]
    again = generate(mock_adapter(), model, [PROMPT], 4, 4, remasking="random", seed=3, use_cache=False)
    assert again.reveal_step[0] == orders[3]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)  # one position per step
    assert len({tuple(o) for o in orders}) > 1


@pytest.mark.parametrize(
    "threshold, steps, nfe",
    [
        (0.52, [1, 2, 0, 0], 3),  # step 0: .60 and .55 > .52; then none above: the best one (.50), then .40
        (0.99, [2, 3, 0, 1], 4),  # nothing above: one per step, in low-confidence order
        (0.0, [0, 0, 0, 0], 1),  # everything above: the block in one step
    ],
)
def test_threshold_reveals_all_above_and_at_least_one(threshold, steps, nfe):
    model = PositionModel(table_fn(ROWS))
    out = generate(mock_adapter(), model, [PROMPT], 4, 4, threshold=threshold, use_cache=False)
    assert out.reveal_step == [steps]
    assert out.nfe == nfe


@pytest.mark.parametrize("shifted", [False, True])
def test_shifted_adapter_reads_previous_position(shifted):
    """Prompts of 2 and 5 tokens: response token j sits at position n + j; the echo model predicts
    3 + position, so unshifted gives 3 + n + j and shifted (read at i - 1) 3 + n + j - 1."""
    prompts = [[10, 11], [10, 11, 12, 13, 14]]
    out = generate(mock_adapter(shifted=shifted), PositionModel(echo_fn()), prompts, 8, 2, use_cache=False)
    for n, seq in zip((2, 5), out.sequences, strict=True):
        assert seq == [3 + n + j - int(shifted) for j in range(8)]


def test_full_attention_uses_fixed_canvas():
    """Full attention: every forward sees prompt + gen_length (cache ignored), padding never attended."""
    model = PositionModel(echo_fn())
    prompts = [[10, 11, 12], [10]]
    out = generate(mock_adapter(attention="full"), model, prompts, 8, 2, use_cache=True)
    assert out.nfe == 2 * 2 == len(model.calls)
    assert all(c.width == 3 + 8 for c in model.calls)
    mask = model.calls[0].mask[:, 0]  # (B, S, S)
    assert mask[0].all()
    assert not mask[1, 2:, :2].any() and mask[1, 2:, 2:].all()  # row 1 has two pads on the left
    assert out.sequences == [[3 + 3 + j for j in range(8)], [3 + 1 + j for j in range(8)]]


def test_block_causal_uncached_attention():
    """Uncached block-causal: block b's forward holds the prompt and blocks <= b; block 0 never sees block 1."""
    model = PositionModel(echo_fn())
    generate(mock_adapter(), model, [[10, 11]], 8, 1, use_cache=False)
    assert [c.width for c in model.calls] == [2 + 4, 2 + 8]
    mask = model.calls[1].mask[0, 0]  # (6 + 4, ...)
    assert mask[2:6, 6:].sum() == 0 and mask[6:, :].all()


def test_stops_at_eos():
    """Prompt A (2 tokens) hits EOS at position 7 = response token 5, in block 1; prompt B (12 tokens) never
    does, so the batch runs all 4 blocks, A leaving the batch after block 1; alone, A stops after block 1
    (NFE 2 blocks x 2 steps)."""
    model = PositionModel(echo_fn(eos_at=7))
    alone = generate(mock_adapter(), model, [[10, 11]], 16, 2, eos_token_id=EOS, use_cache=False)
    assert alone.blocks == 2 and alone.nfe == 4
    assert alone.sequences == [[5, 6, 7, 8, 9]] and alone.finished == [True] and alone.lengths == [5]
    both = generate(mock_adapter(), model, [[10, 11], list(range(10, 22))], 16, 2, eos_token_id=EOS, use_cache=False)
    assert both.blocks == 4 and both.nfe == 8
    assert [c.rows for c in model.calls[-8:]] == [2] * 4 + [1] * 4  # A stops costing compute once it has finished
    assert both.sequences[0] == [5, 6, 7, 8, 9] and len(both.sequences[1]) == 16
    assert both.finished == [True, False]


# ----------------------------------------------------------------------------- tiny random model


@pytest.fixture(scope="module")
def tiny():
    tok = make_char_tokenizer()
    model = make_tiny_model(tok, block_size=4)
    prompts = [tok.encode("hello"), tok.encode("hi there, you"), tok.encode("abc")]
    return model, adapter_from_config(model.config, tok), prompts


@pytest.mark.parametrize(
    "shifted, prompt_attention, remasking",
    [(False, "full", "low_confidence"), (True, "full", "margin"), (False, "causal", "entropy")],
)
def test_cached_equals_uncached(tiny, shifted, prompt_attention, remasking):
    model, adapter, prompts = tiny
    adapter = replace(adapter, shifted=shifted, prompt_attention=prompt_attention)
    kw = dict(gen_length=12, steps_per_block=2, remasking=remasking, output_logits=True)
    cached = generate(adapter, model, prompts, use_cache=True, **kw)
    plain = generate(adapter, model, prompts, use_cache=False, **kw)
    assert cached.sequences == plain.sequences
    assert cached.reveal_step == plain.reveal_step
    assert len(cached.step_logits) == len(plain.step_logits) == 3 * 2
    for a, b in zip(cached.step_logits, plain.step_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert cached.nfe == plain.nfe == 3 * 2  # one forward per step: the prefill and commits ride on the steps


def test_cached_equals_uncached_sampling_and_threshold(tiny):
    model, adapter, prompts = tiny
    kw = dict(gen_length=8, steps_per_block=4, temperature=1.0, seed=7, threshold=0.02)
    cached = generate(adapter, model, prompts, use_cache=True, **kw)
    plain = generate(adapter, model, prompts, use_cache=False, **kw)
    assert cached.sequences == plain.sequences and cached.nfe == plain.nfe


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_matches_single(tiny, use_cache):
    model, adapter, prompts = tiny
    batch = generate(adapter, model, prompts, 8, 2, use_cache=use_cache)
    for p, seq in zip(prompts, batch.sequences, strict=True):
        assert generate(adapter, model, [p], 8, 2, use_cache=use_cache).sequences == [seq]


def test_temperature_and_seed(tiny):
    model, adapter, prompts = tiny
    greedy = [generate(adapter, model, prompts, 8, 2, seed=s).sequences for s in (0, 1)]
    assert greedy[0] == greedy[1]
    hot = [generate(adapter, model, prompts, 8, 2, temperature=1.0, seed=s).sequences for s in (0, 0, 1)]
    assert hot[0] == hot[1] and hot[0] != hot[2]


def test_cached_eos_stop_and_nfe(tiny):
    """Declare a token the model produces as EOS: generation stops after the block holding its first
    occurrence. NFE = blocks * steps: no forward of its own for the prefill or a commit."""
    model, adapter, prompts = tiny
    full = generate(adapter, model, prompts[:1], 16, 2)
    assert full.nfe == 4 * 2 and full.blocks == 4
    eos = full.sequences[0][5]
    first = full.sequences[0].index(eos)
    blocks = first // 4 + 1
    out = generate(adapter, model, prompts[:1], 16, 2, eos_token_id=eos)
    assert out.blocks == blocks and out.nfe == blocks * 2
    assert out.sequences == [full.sequences[0][:first]] and out.finished == [True]
    assert out.seconds > 0 and math.isclose(out.tokens_per_second, first / out.seconds)


def test_finished_rows_leave_the_batch_without_changing_the_others(tiny):
    """A token that prompt 0 produces in its first block but another prompt does not, declared EOS: prompt 0
    leaves the batch after block 0 (later steps run fewer rows) and every sequence equals its decoding alone."""
    model, adapter, prompts = tiny
    full = generate(adapter, model, prompts, 16, 2)
    eos = next(t for t in full.sequences[0][:4] if any(t not in s[:4] for s in full.sequences[1:]))
    for cache in ("auto", "none"):
        out = generate(adapter, model, prompts, 16, 2, eos_token_id=eos, output_logits=True, cache=cache)
        assert out.step_logits[0].shape[0] == 3 and out.step_logits[-1].shape[0] < 3
        for p, seq in zip(prompts, out.sequences, strict=True):
            assert generate(adapter, model, [p], 16, 2, eos_token_id=eos, cache=cache).sequences == [seq]
    assert out.finished[0] and out.sequences[0] == full.sequences[0][: full.sequences[0].index(eos)]


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps_per_block=0), "steps_per_block must be positive"),
        (dict(steps_per_block=-1), "steps_per_block must be positive"),
        (dict(steps_per_block=3), "steps_per_block=3 must divide block_size=4"),
        (dict(gen_length=10), "gen_length=10 must be a positive multiple of block_size=4"),
        (dict(block_size=8), "block_size=8 differs from the model's block_size=4"),
        (dict(remasking="lowest"), "remasking must be one of"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(threshold=1.5), "threshold must be a probability"),
    ],
)
def test_bad_inputs(kw, match):
    args = dict(gen_length=8, steps_per_block=2) | kw
    with pytest.raises(ValueError, match=match):
        generate(mock_adapter(), PositionModel(echo_fn()), [PROMPT], **args)


def test_bad_prompts_and_full_attention_block_size():
    with pytest.raises(ValueError, match="non-empty"):
        generate(mock_adapter(), PositionModel(echo_fn()), [[]], 8, 2)
    # a full-attention model may be sampled with any block size
    out = generate(mock_adapter(attention="full"), PositionModel(echo_fn()), [PROMPT], 8, 2, block_size=8)
    assert out.blocks == 1 and out.nfe == 2


# ----------------------------------------------------------------------------- Fast-dLLM's caches (full attention)


@pytest.fixture(scope="module")
def full_attention_models(tmp_path_factory):
    from dtrpo.families import load_model
    from tests.families.test_loading import write_dream, write_llada

    root = tmp_path_factory.mktemp("full")
    torch.manual_seed(0)
    return {
        name: load_model(write(root / name), block_size=4)[::2]
        for name, write in (("llada", write_llada), ("dream", write_dream))
    }


def canvas_logits(model, ids: list[int]) -> torch.Tensor:
    """One full-attention forward of an unpadded sequence (n, V): every position sees every position."""
    n = len(ids)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, 1, n, n, dtype=torch.bool),
            position_ids=torch.arange(n)[None],
        )
    return out.logits[0].float()


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_approximate_caches_are_exact_at_a_blocks_first_step(full_attention_models, family, cache):
    """At each block's first step the prefix and dual caches run the whole canvas: the logits equal one
    independent forward of the canvas as it stands (earlier blocks final, the rest [MASK]). With one step per
    block every step is a first step, so the tokens equal the recompute path's."""
    model, adapter = full_attention_models[family]
    prompts = [[10, 11, 12, 13, 14], [20, 21]]
    kw = dict(gen_length=12, steps_per_block=2, output_logits=True)
    out = generate(adapter, model, prompts, cache=cache, **kw)
    assert out.nfe == 3 * 2 == len(out.step_logits)
    for b in range(3):
        first = out.step_logits[2 * b]  # (B, bs, V)
        for i, p in enumerate(prompts):
            seq = out.sequences[i]
            state = p + seq[: 4 * b] + [adapter.mask_token_id] * (12 - 4 * b)
            ref = canvas_logits(model, state)
            reads = [len(p) + 4 * b + s - int(adapter.shifted) for s in range(4)]
            torch.testing.assert_close(first[i], ref[reads], atol=1e-5, rtol=0)
    one = dict(gen_length=12, steps_per_block=1)
    assert (
        generate(adapter, model, prompts, cache=cache, **one).sequences
        == generate(adapter, model, prompts, cache="none", **one).sequences
    )


def test_approximate_caches_run_fewer_columns_and_differ_from_recompute(full_attention_models):
    """Later steps of a block run the block and the suffix (prefix) or the block alone (dual), against K/V kept
    from the block's first step: the logits there are not the recomputed ones (the approximation is real)."""
    model, adapter = full_attention_models["llada"]
    prompts = [[10, 11, 12, 13, 14]]
    kw = dict(gen_length=8, steps_per_block=4, output_logits=True)
    plain = generate(adapter, model, prompts, cache="none", **kw)
    for cache in ("prefix", "dual"):
        out = generate(adapter, model, prompts, cache=cache, **kw)
        torch.testing.assert_close(out.step_logits[0], plain.step_logits[0], atol=1e-5, rtol=0)
        assert (out.step_logits[1] - plain.step_logits[1]).abs().max() > 1e-4


def test_cache_option_errors():
    with pytest.raises(ValueError, match="cache must be one of"):
        generate(mock_adapter(attention="full"), PositionModel(echo_fn()), [PROMPT], 8, 2, cache="full")
    with pytest.raises(ValueError, match="approximate cache for full-attention models"):
        generate(mock_adapter(), PositionModel(echo_fn()), [PROMPT], 8, 2, cache="dual")


def test_cache_option_reaches_the_sampler(tmp_path, monkeypatch, capsys):
    """`--cache` of `dtrpo generate`, `SamplingArgs.cache` (eval, pairs, the demo) and the harness's model_args
    all reach `generate`; the default is the exact fast path, 'auto'."""
    import dtrpo.evaluate as evaluate
    import dtrpo.sampler as sampler
    from dtrpo.cli import main
    from dtrpo.evaluate import SamplingArgs, sample_texts
    from dtrpo.families import load_model
    from dtrpo.harness import DTRPOLM
    from tests.families.test_loading import write_llada

    seen = []
    real = sampler.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cache"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sampler, "generate", spy)
    monkeypatch.setattr(evaluate, "generate", spy)
    path = write_llada(tmp_path / "llada")
    main(["generate", "--model_name_or_path", str(path), "--prompt", "ab", "--gen_length", "32", "--cache", "dual"])
    assert "NFE 32" in capsys.readouterr().out
    model, tokenizer, adapter = load_model(path)
    sample_texts(model, tokenizer, adapter, ["ab"], SamplingArgs(gen_length=32, cache="prefix"), seed=0)
    sample_texts(model, tokenizer, adapter, ["ab"], SamplingArgs(gen_length=32), seed=0)
    assert seen == ["dual", "prefix", "auto"]
    assert DTRPOLM(pretrained=str(path), cache="dual").sampling["cache"] == "dual"
