"""Estimators against independent references: per-state forwards with hand-built masks, the exact
trajectory walked step by step, and the autoregressive DPO limit."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dtrpo.estimators import Batch, EstimatorConfig, draw, draw_dtrpo, position_logprobs, score
from dtrpo.losses import preference_loss
from dtrpo.masking import packed_layout

BS = 4


def loop_mask(p: int, r: int, bs: int, prompt_causal: bool = False) -> torch.Tensor:
    """Block-causal attention of one unpadded sequence [prompt (p) | response (r)], built by loops."""
    m = torch.zeros(p + r, p + r, dtype=torch.bool)
    for q in range(p + r):
        for k in range(p + r):
            if k < p:
                m[q, k] = q >= p or not prompt_causal or k <= q
            elif q >= p:
                m[q, k] = (k - p) // bs <= (q - p) // bs
    return m


def state_logits(model, prompt: list[int], response_state: list[int], bs: int, prompt_causal=False) -> torch.Tensor:
    """One separate forward of [prompt | response_state] under block-causal attention. (L, V)"""
    ids = torch.tensor([prompt + response_state])
    mask = loop_mask(len(prompt), len(response_state), bs, prompt_causal)[None, None]
    pos = torch.arange(ids.shape[1])[None]
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0].float()


def make_batch(tokenizer, prompt_lens=(5, 3, 4), response_lens=(12, 12, 8), seed=0):
    """A padded batch: prompts left-padded, responses right-padded to a block multiple."""
    g = torch.Generator().manual_seed(seed)
    P, R, pad = max(prompt_lens), max(response_lens), tokenizer.pad_token_id
    prompts = [torch.randint(10, 90, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(10, 90, (n,), generator=g).tolist() for n in response_lens]
    batch = Batch(
        prompt_ids=torch.tensor([[pad] * (P - len(p)) + p for p in prompts]),
        prompt_valid=torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts]),
        response_ids=torch.tensor([r + [pad] * (R - len(r)) for r in responses]),
        response_valid=torch.tensor([[True] * len(r) + [False] * (R - len(r)) for r in responses]),
    )
    return batch, prompts, responses


def random_noisy(batch, mask_id, seed=1):
    g = torch.Generator().manual_seed(seed)
    masked = torch.rand(batch.response_ids.shape, generator=g) < 0.5
    return torch.where(masked, mask_id, batch.response_ids)


def test_packed_logits_equal_separate_forward_per_block_state(tiny, tokenizer):
    policy, _, adapter = tiny
    batch, prompts, responses = make_batch(tokenizer)
    noisy = random_noisy(batch, adapter.mask_token_id)
    layout = packed_layout(batch.prompt_ids, batch.prompt_valid, batch.response_ids, batch.response_valid, noisy, BS)
    with torch.no_grad():
        packed = adapter.logits(policy, layout.input_ids, adapter.attention_mask(policy, layout), layout.position_ids)
        packed = packed.view(*layout.input_ids.shape, -1)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            for b in range(len(r) // BS):
                state = r[: b * BS] + noisy[i, b * BS : (b + 1) * BS].tolist()
                ref = state_logits(policy, p, state, BS)[len(p) + b * BS :]
                cols = slice(layout.noisy_start + b * BS, layout.noisy_start + (b + 1) * BS)
                torch.testing.assert_close(packed[i, cols], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shifted", [False, True])
def test_packed_logprobs_equal_separate_forwards(tiny, tokenizer, shifted):
    policy, _, adapter = tiny
    adapter = replace(adapter, shifted=shifted)
    batch, prompts, responses = make_batch(tokenizer)
    noisy = random_noisy(batch, adapter.mask_token_id)
    with torch.no_grad():
        got, passes = position_logprobs(adapter, policy, batch, noisy, batch.response_valid, "packed")
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            for j in range(len(r)):
                b = j // BS
                state = r[: b * BS] + noisy[i, b * BS : (b + 1) * BS].tolist()
                logits = state_logits(policy, p, state, BS)
                read = len(p) + j - 1 if shifted else len(p) + j  # shifted: position i-1 predicts token i
                want = F.log_softmax(logits[read], -1)[r[j]]
                assert abs(got[i, j].item() - want.item()) < 1e-5
    assert passes.passes == 1
    assert (got[~batch.response_valid] == 0).all()


@pytest.mark.parametrize("mode", ["exact", "remasked"])
def test_exact_and_remasked_modes_against_separate_forwards(tiny, tokenizer, mode):
    policy, _, adapter = tiny
    batch, prompts, responses = make_batch(tokenizer)
    noisy = random_noisy(batch, adapter.mask_token_id)
    with torch.no_grad():
        got, passes = position_logprobs(adapter, policy, batch, noisy, batch.response_valid, mode)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            remasked = state_logits(policy, p, noisy[i, : len(r)].tolist(), BS)
            for j in range(len(r)):
                b = j // BS
                if mode == "exact":
                    logits = state_logits(policy, p, r[: b * BS] + noisy[i, b * BS : (b + 1) * BS].tolist(), BS)
                else:  # every block in its own state, one pass, no clean copy
                    logits = remasked
                want = F.log_softmax(logits[len(p) + j], -1)[r[j]]
                assert abs(got[i, j].item() - want.item()) < 1e-5
    assert passes.passes == (3 if mode == "exact" else 1)


def brute_force_trajectory(policy, ref, prompt, response, order_keys, steps, mask_id):
    """log pi_theta(tau)/pi_ref(tau) walked step by step: per block, T_B steps, each revealing k positions
    in the order of `order_keys` (ascending), one separate forward per step and model."""
    k = BS // steps
    total = 0.0
    for b in range(len(response) // BS):
        order = sorted(range(BS), key=lambda i: (order_keys[b][i], i))
        revealed = []
        for _ in range(steps):
            new = order[len(revealed) : len(revealed) + k]
            state = [response[b * BS + i] if i in revealed else mask_id for i in range(BS)]
            for model, sign in ((policy, 1.0), (ref, -1.0)):
                logits = state_logits(model, prompt, response[: b * BS] + state, BS)
                logp = F.log_softmax(logits, -1)
                total += sign * sum(logp[len(prompt) + b * BS + i, response[b * BS + i]].item() for i in new)
            revealed += new
    return total


@pytest.mark.parametrize("steps", [2, 4])
def test_dtrpo_averaged_over_steps_equals_trajectory_exactly(tiny, tokenizer, steps):
    policy, ref, adapter = tiny
    batch, prompts, responses = make_batch(tokenizer, prompt_lens=(4, 2), response_lens=(12, 8))
    seeds = [11, 12]
    cfg = EstimatorConfig(steps_per_block=steps, targets="newly_unmasked")
    with torch.no_grad():
        mean = 0.0
        for t in range(1, steps + 1):  # blocks are independent and additive: one common t covers every block
            states = draw_dtrpo(adapter, batch, seeds, cfg, t_fixed=t)
            mean = mean + (score(adapter, policy, batch, states)[0] - score(adapter, ref, batch, states)[0]) / steps
        tcfg = EstimatorConfig(estimator="trajectory", steps_per_block=steps)
        traj_states = draw(adapter, batch, seeds, tcfg)
        traj = score(adapter, policy, batch, traj_states)[0] - score(adapter, ref, batch, traj_states)[0]
    torch.testing.assert_close(mean, traj, atol=1e-5, rtol=0)
    for i, seed in enumerate(seeds):  # the trajectory itself against a step-by-step walk
        keys = torch.rand(len(responses[i]) // BS, BS, generator=torch.Generator().manual_seed(seed))
        want = brute_force_trajectory(
            policy, ref, prompts[i], responses[i], keys.tolist(), steps, adapter.mask_token_id
        )
        assert abs(traj[i].item() - want) < 1e-4


@pytest.mark.parametrize("targets", ["newly_unmasked", "all_masked_weighted"])
def test_dtrpo_mean_matches_trajectory_mean_over_random_orders(tiny, tokenizer, targets):
    policy, ref, adapter = tiny
    n = 256
    one, _, _ = make_batch(tokenizer, prompt_lens=(4,), response_lens=(8,))
    batch = Batch(*(x.expand(n, -1) for x in (one.prompt_ids, one.prompt_valid, one.response_ids, one.response_valid)))
    seeds = list(range(n))
    with torch.no_grad():

        def ratio(cfg, seeds):
            states = draw(adapter, batch, seeds, cfg)
            return score(adapter, policy, batch, states)[0] - score(adapter, ref, batch, states)[0]

        est = ratio(EstimatorConfig(steps_per_block=4, targets=targets), seeds)
        traj = ratio(
            EstimatorConfig(estimator="trajectory", steps_per_block=4, trajectory_mode="packed"),
            [s + 10_000 for s in seeds],
        )
    se = (est.var() / n + traj.var() / n).sqrt()
    assert abs(est.mean() - traj.mean()) < 3 * se
    assert est.std() > 0  # a real estimator, with variance


def test_autoregressive_limit_equals_sequence_dpo(tiny, tokenizer):
    """Block size 1, one step: the dTRPO loss is DPO on log p(y|x) from one forward per position."""
    policy, ref, adapter = tiny
    adapter = replace(adapter, block_size=1, prompt_attention="causal")
    prompt = [20, 21, 22]
    chosen, rejected = [30, 31, 32, 33], [40, 41, 42, 43]
    batch = Batch(
        prompt_ids=torch.tensor([prompt, prompt]),
        prompt_valid=torch.ones(2, 3, dtype=torch.bool),
        response_ids=torch.tensor([chosen, rejected]),
        response_valid=torch.ones(2, 4, dtype=torch.bool),
    )
    cfg = EstimatorConfig(steps_per_block=1)
    with torch.no_grad():
        states = draw(adapter, batch, [0, 1], cfg)
        lr = score(adapter, policy, batch, states)[0] - score(adapter, ref, batch, states)[0]
        loss, _ = preference_loss(lr[:1], lr[1:], beta=0.5)

        def seq_logp(model, y):  # AR: token i from [x, y_<i, MASK] under plain causal attention
            total = 0.0
            for i in range(len(y)):
                ids = torch.tensor([prompt + y[:i] + [adapter.mask_token_id]])
                total += F.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)[y[i]].item()
            return total

        h = (seq_logp(policy, chosen) - seq_logp(ref, chosen)) - (seq_logp(policy, rejected) - seq_logp(ref, rejected))
    want = -F.logsigmoid(torch.tensor(0.5 * h))
    assert abs(loss.item() - want.item()) < 1e-5


def test_every_estimator_shares_draws_and_counts_passes(tiny, tokenizer):
    policy, _, adapter = tiny
    batch, _, _ = make_batch(tokenizer)
    expected = {"dtrpo": 1, "meanfield": 1, "vrpo": 8, "trajectory": 3 * 4}  # trajectory: exact, 3 blocks x T_B
    for name, passes in expected.items():
        cfg = EstimatorConfig(estimator=name, steps_per_block=4)
        a = draw(adapter, batch, [1, 2, 3], cfg)
        b = draw(adapter, batch, [1, 2, 3], cfg)
        assert all(
            torch.equal(x.noisy_ids, y.noisy_ids) and torch.equal(x.weights, y.weights)
            for x, y in zip(a, b, strict=False)
        )
        with torch.no_grad():
            value, n = score(adapter, policy, batch, a)
        assert n.passes == passes, name
        assert torch.isfinite(value).all()


def test_confidence_order_reveals_the_references_most_confident_token_first(tiny, tokenizer):
    policy, ref, adapter = tiny
    batch, prompts, responses = make_batch(tokenizer)
    cfg = EstimatorConfig(steps_per_block=BS, reveal_order="confidence", targets="newly_unmasked")
    with torch.no_grad():
        (state,) = draw_dtrpo(adapter, batch, [1, 2, 3], cfg, ref_model=ref, t_fixed=BS)  # the first step
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            for b in range(len(r) // BS):
                masked_block = r[: b * BS] + [adapter.mask_token_id] * BS
                logp = F.log_softmax(state_logits(ref, p, masked_block, BS), -1)
                conf = [logp[len(p) + b * BS + k, r[b * BS + k]].item() for k in range(BS)]
                newly = state.weights[i, b * BS : (b + 1) * BS].nonzero().flatten().tolist()
                assert newly == [max(range(BS), key=lambda k: conf[k])]
