"""Per-pair training-step cost of dTRPO (with and without prompt sharing and padding-free packing) against
TRL's DPOTrainer on an autoregressive model of the same size, side by side, on GSM8K's real lengths.

    python scripts/bench_vs_trl.py --output docs/results/vs_trl.json      # needs `pip install trl`

Every arm runs its own trainer's `training_step` (forward, backward, reference) on the same pairs in
the same batches; repeats alternate between arms so that machine noise hits them alike. The pairs are
GSM8K training questions with their worked answer as chosen and another question's answer as rejected
(real lengths; the content does not matter for cost), tokenized with the built-in character tokenizer.
TRL 1.16 has `padding_free` disabled ("temporarily unavailable"), so only its default padding is timed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import datasets
import torch

from dtrpo import DTRPOConfig, DTRPOTrainer
from dtrpo.models import make_char_tokenizer, make_tiny_model

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def pairs(n: int) -> list[dict]:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[: n + 1]]
    return [
        {"prompt": f"Q: {r['question']}\nA: ", "chosen": r["answer"], "rejected": rows[i + 1]["answer"]}
        for i, r in enumerate(rows[:n])
    ]


def dtrpo_trainer(model, data, share_prompt: bool, out: Path, batch: int, block: int, padding_free: bool = False):
    args = DTRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        share_prompt=share_prompt,
        padding_free=padding_free,
        max_prompt_length=None,
        max_completion_length=-(-1024 // block) * block,
        overwrite_output_dir=True,
    )
    return DTRPOTrainer(model, args=args, processing_class=make_char_tokenizer(), train_dataset=data)


def trl_trainer(model, data, out: Path, batch: int):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        use_cpu=True,
        bf16=False,
        report_to=[],
        disable_tqdm=True,
        gradient_checkpointing=False,
        max_length=None,
    )
    ref = copy.deepcopy(model).eval()
    return DPOTrainer(model, ref_model=ref, args=args, processing_class=make_char_tokenizer(), train_dataset=data)


def batches(trainer, k: int) -> list[dict]:
    loader = iter(trainer.get_train_dataloader())
    return [trainer._prepare_inputs(next(loader)) for _ in range(k)]


def tokens(name: str, inputs: dict, trainer) -> tuple[int, int]:
    """(columns computed, real tokens) of one batch as the arm lays it out."""
    if name == "trl_dpo":
        ids = [v for k, v in inputs.items() if k.endswith("input_ids") and torch.is_tensor(v)]
        masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and torch.is_tensor(v)]
        return sum(x.numel() for x in ids), int(sum(m.sum() for m in masks))
    from dtrpo.masking import packed_layout, pair_layout

    b = trainer._batch(inputs)
    bs, absolute = trainer.adapter.block_size, trainer.adapter.absolute_grid
    if b.pairs:
        n = b.prompt_ids.shape[0] // 2
        lay = pair_layout(
            b.prompt_ids[:n],
            b.prompt_valid[:n],
            b.response_ids,
            b.response_valid,
            b.response_ids,
            bs,
            absolute,
            False,
            pack=b.pack,
        ).layout
    else:
        lay = packed_layout(
            b.prompt_ids, b.prompt_valid, b.response_ids, b.response_valid, b.response_ids, bs, absolute
        )
    return lay.input_ids.numel(), int(lay.valid.sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="docs/results/vs_trl.json")
    p.add_argument("--pairs", type=int, default=4, help="pairs per step")
    p.add_argument("--steps", type=int, default=3, help="distinct batches timed per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--block_size", type=int, default=8)
    a = p.parse_args()
    tok = make_char_tokenizer()
    data = datasets.Dataset.from_list(pairs(a.pairs * a.steps))
    base = make_tiny_model(tok, a.block_size, a.hidden_size, a.num_layers, seed=0)
    ar = copy.deepcopy(base)
    ar.config.is_causal = True  # the same weights as an autoregressive model
    out = Path("runs/bench_vs_trl")
    arms = {
        "dtrpo_packed": dtrpo_trainer(copy.deepcopy(base), data, False, out / "a", a.pairs, a.block_size),
        "dtrpo_shared_prompt": dtrpo_trainer(copy.deepcopy(base), data, True, out / "b", a.pairs, a.block_size),
        "dtrpo_padding_free": dtrpo_trainer(copy.deepcopy(base), data, True, out / "d", a.pairs, a.block_size, True),
        "trl_dpo": trl_trainer(ar, data, out / "c", a.pairs),
    }
    inputs = {name: batches(t, a.steps) for name, t in arms.items()}
    for trainer in arms.values():  # set by Trainer.train's loop, which this times step by step
        trainer.current_gradient_accumulation_steps = 1
    times = {name: [] for name in arms}
    for rep in range(a.repeats + 1):
        for name, trainer in arms.items():
            trainer.model.train()
            start = time.perf_counter()
            for batch in inputs[name]:
                trainer.training_step(trainer.model, batch)
            if rep:  # the first round warms up
                times[name].append((time.perf_counter() - start) / (a.steps * a.pairs))
    base_t = statistics.median(times["trl_dpo"])
    report = {"settings": vars(a), "threads": torch.get_num_threads(), "arms": {}}
    for name, trainer in arms.items():
        cols, real = map(sum, zip(*(tokens(name, b, trainer) for b in inputs[name]), strict=True))
        t = statistics.median(times[name])
        report["arms"][name] = {
            "seconds_per_pair": t,
            "ratio_to_trl_dpo": t / base_t,
            "columns_per_pair": cols / (a.steps * a.pairs),
            "real_tokens_per_pair": real / (a.steps * a.pairs),
            "padding_fraction": 1 - real / cols,
            "tokens_per_second": real / (t * a.steps * a.pairs),
        }
        r = report["arms"][name]
        print(
            f"{name:<20} {t * 1e3:8.1f} ms/pair  x{r['ratio_to_trl_dpo']:.2f} of TRL  {r['columns_per_pair']:7.0f} "
            f"columns/pair  padding {r['padding_fraction']:.0%}"
        )
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(report, indent=2))
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
