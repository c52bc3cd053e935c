"""Reward models as scorers: a transformers sequence-classification model folder with one label.

`dtrpo pairs`, `eval` and `iterate` take `--reward_model PATH` beside `--reward module:function`. The reward
model scores the *decoded* prompt and response texts with its own tokenizer (usually another one than the
policy's), in batches of `--reward_batch_size`, on the training device (the GPU when there is one), in the
policy's `--dtype`:

- with a chat template, the conversation `[user: prompt, assistant: response]` rendered by the template (no
  generation prompt), tokenized with the template's own special tokens and none added;
- without one, the tokenizer's text-pair encoding `tokenizer(prompt, response)` (with its special tokens:
  `[CLS] prompt [SEP] response [SEP]` for BERT-style reward models);
- a special token's text inside the prompt or the response is tokenized as text, never as the token;
- a sequence longer than the model's positions (the least of the tokenizer's `model_max_length` and the
  config's `max_position_embeddings`) is cut from the LEFT: the prompt's start goes first, the response's
  start only once the whole prompt is gone; the end of the sequence, where a decoder reward model reads its
  score, and a leading special token (BOS / CLS) are always kept. How many were cut is logged;
- batches are padded on the right with the config's `pad_token_id` (the tokenizer's pad token, or its EOS,
  when the config has none), so the model pools at each sequence's own last token, as it does unbatched.

A folder that is not a sequence-classification model, has more than one label, or whose class transformers
does not have natively (remote code is never run) is refused in one line before any weight loads. The
weights' fingerprint goes into the samples and items files' records, so a rerun into the same output with
another reward model is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dtrpo.data import encode_text, render_chat

logger = logging.getLogger(__name__)

ONE_LABEL = "a reward model has one output label (num_labels=1)"


def _refuse(path: str | Path, problem: str) -> ValueError:
    return ValueError(f"--reward_model {path}: {problem}")


def check_reward_model(path: str | Path):
    """The config of a reward model folder, read without loading weights or running code; one line naming the
    folder when it is not a native one-label sequence-classification model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    folder = Path(path)
    if not folder.is_dir():
        raise _refuse(path, "not a folder (a transformers sequence-classification model folder)")
    if not (folder / "config.json").is_file():
        raise _refuse(path, "has no config.json; expected a transformers sequence-classification model folder")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # an unknown model_type, a damaged config.json
        raise _refuse(path, f"config.json cannot be read natively ({str(e).splitlines()[0]})") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise _refuse(
            path,
            f"not a sequence-classification model (architectures {architectures}); a reward model folder holds "
            "e.g. LlamaForSequenceClassification or Qwen3ForSequenceClassification",
        )
    if config.num_labels != 1:
        raise _refuse(path, f"has {config.num_labels} labels; {ONE_LABEL}")
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise _refuse(
            path,
            f"transformers has no native sequence-classification class for model_type "
            f"{config.model_type!r} (code in a model folder is never run)",
        )
    return config


def position_limit(config, tokenizer) -> int | None:
    """The longest sequence the reward model takes: the least of the tokenizer's `model_max_length` (when it
    sets one) and the config's `max_position_embeddings`; None when neither says."""
    limits = [
        getattr(tokenizer, "model_max_length", None),
        getattr(config.get_text_config(), "max_position_embeddings", None),
    ]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000_000]
    return min(limits) if limits else None


def keep_end(ids: list[int], limit: int | None, special: set[int]) -> tuple[list[int], bool]:
    """`ids` cut to `limit` tokens from the left, keeping a leading special token (BOS / CLS) and the end;
    and whether it was cut."""
    if limit is None or len(ids) <= limit:
        return ids, False
    head = ids[:1] if ids and ids[0] in special and limit > 1 else []
    return head + ids[len(ids) - (limit - len(head)) :], True


class RewardModel:
    """A one-label sequence-classification model scoring (prompt, response) texts in batches (module doc)."""

    def __init__(self, path: str | Path, batch_size: int = 16, dtype: str = "float32", device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dtrpo.reference import weights_fingerprint

        if batch_size <= 0:
            raise ValueError(f"--reward_batch_size must be positive, got {batch_size}")
        config = check_reward_model(path)
        self.path, self.batch_size, self.truncated = str(path), batch_size, 0
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=getattr(torch, dtype), trust_remote_code=False
        )
        self.model = model.to(device).eval()
        text_config = self.model.config.get_text_config()
        if text_config.pad_token_id is None:  # what the model pools with: a pad id that right padding can use
            pad = (
                self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            )
            if pad is None:
                raise _refuse(path, "neither its config nor its tokenizer has a pad or EOS token to pad batches with")
            text_config.pad_token_id = pad
        self.pad_token_id = text_config.pad_token_id
        self.max_length = position_limit(self.model.config, self.tokenizer)
        self.fingerprint = weights_fingerprint(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def record(self) -> dict:
        """What a run's scores depend on, for the samples / items files' records and pair provenance."""
        return {"reward_model": self.path, "reward_model_weights": self.fingerprint}

    def encode(self, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], int]:
        """Token ids of each (prompt, response) as the module doc says, cut to the model's positions; and how
        many were cut."""
        tok = self.tokenizer
        if tok.chat_template:
            chats = [
                render_chat(
                    tok, [{"role": "user", "content": p}, {"role": "assistant", "content": r}], generation_prompt=False
                )
                for p, r in zip(prompts, responses, strict=True)
            ]
            ids = encode_text(tok, chats)
        else:
            # one call per text, as a model card's `tokenizer(question, answer)` (an empty answer encodes alone)
            ids = [tok(p, r, split_special_tokens=True)["input_ids"] for p, r in zip(prompts, responses, strict=True)]
        special = set(tok.all_special_ids)
        kept = [keep_end(x, self.max_length, special) for x in ids]
        return [x for x, _ in kept], sum(c for _, c in kept)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The model's score of each (prompt, response), batched by length (less padding); the order of the
        inputs is kept."""
        ids, cut = self.encode(prompts, responses)
        if cut:
            self.truncated += cut
            logger.warning(
                "%d of %d texts were longer than the reward model's %d positions: cut from the left (the response's "
                "end kept)",
                cut,
                len(ids),
                self.max_length,
            )
        scores = [0.0] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                attention_mask[row, : len(ids[i])] = 1
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits
            for row, i in enumerate(batch):
                scores[i] = float(logits[row, 0])
        return scores


def reward_record(task) -> dict:
    """The reward model's record of a task scored by one (`RewardModel.record`); empty otherwise."""
    model = getattr(task, "reward_model", None)
    return model.record() if model is not None else {}
