"""Diffusion SFT objectives against separate forwards with hand-built masks, and a few trainer steps."""

import torch
import torch.nn.functional as F

from dtrpo.estimators import Batch
from dtrpo.sft import DiffusionSFTConfig, DiffusionSFTTrainer, draw_sft_noise, sft_loss
from tests.test_estimators import BS, make_batch, state_logits


def test_noise_levels_per_sequence_and_per_block(tiny, tokenizer):
    _, _, adapter = tiny
    batch, _, _ = make_batch(tokenizer)
    for per_block in (False, True):
        noisy, w = draw_sft_noise(
            batch.response_ids, batch.response_valid, [1, 2, 3], adapter.mask_token_id, BS, per_block
        )
        masked = noisy == adapter.mask_token_id
        assert torch.equal(masked, w > 0) and not masked[~batch.response_valid].any()
        for i in range(3):
            levels = (1 / w[i][masked[i]]).view(-1)
            if per_block:  # one level per block: every masked position of a block has the same weight
                for b in range(batch.response_ids.shape[1] // BS):
                    wb = w[i, b * BS : (b + 1) * BS]
                    assert len(set(wb[wb > 0].tolist())) <= 1
            else:
                assert levels.numel() == 0 or torch.allclose(levels, levels[0].expand_as(levels))


def test_block_and_masked_objectives_equal_separate_forwards(tiny, tokenizer):
    policy, _, adapter = tiny
    batch, prompts, responses = make_batch(tokenizer)
    seeds = [4, 5, 6]
    with torch.no_grad():
        for objective, per_block in (("masked", False), ("block", True)):
            got = sft_loss(adapter, policy, batch, seeds, objective)
            noisy, w = draw_sft_noise(
                batch.response_ids, batch.response_valid, seeds, adapter.mask_token_id, BS, per_block
            )
            total = 0.0
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
                for j in range(len(r)):
                    if w[i, j] == 0:
                        continue
                    b = j // BS
                    if per_block:  # block b's noisy copy after clean blocks < b (the packed layout's meaning)
                        state = r[: b * BS] + noisy[i, b * BS : (b + 1) * BS].tolist()
                    else:  # the whole noisy response, the model's own attention
                        state = noisy[i, : len(r)].tolist()
                    logp = F.log_softmax(state_logits(policy, p, state, BS)[len(p) + j], -1)[r[j]]
                    total -= w[i, j].item() * logp.item()
            want = total / sum(len(r) for r in responses)
            assert abs(got.item() - want) < 1e-4, objective


def test_sft_trainer_lowers_the_loss(tmp_path, tokenizer):
    from dtrpo.models import adapter_from_config, make_tiny_model

    model = make_tiny_model(tokenizer, block_size=4)
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(10, 26)]
    args = DiffusionSFTConfig(
        output_dir=str(tmp_path),
        max_steps=40,
        learning_rate=3e-3,
        per_device_train_batch_size=16,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=10,
    )
    adapter = adapter_from_config(model.config, tokenizer)
    trainer = DiffusionSFTTrainer(
        model=model, args=args, adapter=adapter, processing_class=tokenizer, train_dataset=rows
    )
    assert trainer.objective == "block"  # the default for a block-causal model
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]
    batch = Batch(*(torch.tensor(x) for x in ([[5]], [[True]], [[6, 7, 8, 9]], [[True] * 4])))
    assert torch.isfinite(sft_loss(adapter, model, batch, [0], "masked"))
