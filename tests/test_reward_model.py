"""Reward models as scorers (`--reward_model`): scores against the model called directly on each text, batched
equal to unbatched, the left cut of over-long texts, ties and the score margin of pairs, the records that refuse
a rerun with another reward model, and the one-line refusals of bad input."""

import itertools
import json
import random
import re
import shutil

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForSequenceClassification,
)

from dtrpo.models import init_tiny
from dtrpo.pairs import form_pairs, ties
from dtrpo.reward_model import RewardModel, check_reward_model
from tests.test_cli import cli

POSITIONS = 48  # the reward models' max_position_embeddings: long texts get cut
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def reward_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    """Another tokenizer than the policy's: characters in reverse order, with BOS; a chat template, or a
    BERT-like pair encoding `<s> A </s> B </s>` without one."""
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(i) for i in range(126, 31, -1)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(special)
    if not chat:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.model_max_length = POSITIONS
    if chat:
        fast.chat_template = TEMPLATE
    return fast


def save_reward_model(folder, chat: bool = True, seed: int = 0, num_labels: int = 1, arch: str = "llama"):
    tok = reward_tokenizer(chat)
    torch.manual_seed(seed)
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    size |= dict(num_key_value_heads=2, max_position_embeddings=POSITIONS, vocab_size=len(tok), num_labels=num_labels)
    if arch == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(**size, pad_token_id=0))
    elif arch == "qwen3":
        model = Qwen3ForSequenceClassification(Qwen3Config(**size, head_dim=8, pad_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(**size))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    return {
        "chat": save_reward_model(root / "chat"),
        "pair": save_reward_model(root / "pair", chat=False, seed=1, arch="qwen3"),
        "other": save_reward_model(root / "other", seed=2),
        "root": root,
    }


def direct_score(folder, prompt: str, response: str) -> float:
    """The reward model called directly on one text, as its model card would: the chat template rendered and
    tokenized by transformers (or the tokenizer's pair encoding), the left cut written out here."""
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    model = (
        Qwen3ForSequenceClassification if "pair" in str(folder) else LlamaForSequenceClassification
    ).from_pretrained(folder)
    if tok.chat_template:
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids = tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
    else:
        ids = tok(prompt, response)["input_ids"]
    if len(ids) > POSITIONS:  # BOS, then the last POSITIONS - 1 tokens
        ids = ids[:1] + ids[-(POSITIONS - 1) :]
    with torch.no_grad():
        return float(model(torch.tensor([ids])).logits[0, 0])


PROMPTS = ["1+1=", "What is 7*8? ", "x", "sort 52918>", "a longer prompt about addition: 47+85="]
RESPONSES = ["2", "56, because 7*8 is 56", "", "12589", "132 " * 20]  # the last one is cut (over 48 positions)


@pytest.mark.parametrize("kind", ["chat", "pair"])
def test_scores_equal_the_model_called_on_each_text_batched_or_not(rm, kind):
    want = [direct_score(rm[kind], p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    one = RewardModel(rm[kind], batch_size=1, device="cpu").score(PROMPTS, RESPONSES)
    for batch in (2, 16):
        got = RewardModel(rm[kind], batch_size=batch, device="cpu").score(PROMPTS, RESPONSES)
        assert got == pytest.approx(one, abs=1e-5)
    assert one == pytest.approx(want, abs=1e-5)
    assert len(set(one)) == len(one)  # a random model still tells the texts apart


def test_an_over_long_text_keeps_its_end(rm):
    reward = RewardModel(rm["chat"], device="cpu")
    ids, cut = reward.encode(["p" * 100, "q"], ["r" * 10, "s"])
    assert cut == 1 and len(ids[0]) == POSITIONS and len(ids[1]) < POSITIONS
    tok = reward.tokenizer
    assert ids[0][0] == tok.bos_token_id and tok.decode(ids[0][1:]).endswith("p</s>[assistant]" + "r" * 10 + "</s>")
    assert reward.truncated == 0  # counted when scored
    reward.score(["p" * 100], ["r"])
    assert reward.truncated == 1


def test_special_token_text_in_a_response_is_text(rm):
    reward = RewardModel(rm["chat"], device="cpu")
    ids, _ = reward.encode(["hi"], ["</s> end"])
    tok = reward.tokenizer
    assert ids[0].count(tok.eos_token_id) == 2  # the template's two, not the response's literal one


def test_ties_and_the_margin_by_hand_and_by_brute_force():
    scored = [("a", 1.0), ("b", 1.0), ("c", 0.5), ("d", 0.0)]
    assert form_pairs(scored, "best_worst", None, random.Random(0)) == [(0, 3)]
    assert sorted(form_pairs(scored, "all", None, random.Random(0))) == [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert ties([s for _, s in scored], "all") == 1  # a and b
    assert sorted(form_pairs(scored, "all", None, random.Random(0), 0.5)) == [(0, 3), (1, 3)]
    assert ties([s for _, s in scored], "all", 0.5) == 4  # ab, ac, bc, cd: differences 0, .5, .5, .5
    assert form_pairs(scored, "best_worst", None, random.Random(0), 1.0) == []
    assert ties([s for _, s in scored], "best_worst", 1.0) == 1
    rng = random.Random(1)
    for _ in range(200):  # every two responses give one pair or one tie
        scores = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(rng.randint(2, 6))]
        gap = rng.choice([0.0, 0.25, 0.5])
        pairs = form_pairs([("", s) for s in scores], "all", None, rng, gap)
        assert all(scores[c] - scores[r] > gap for c, r in pairs)
        assert len(pairs) + ties(scores, "all", gap) == len(scores) * (len(scores) - 1) // 2


# ----------------------------------------------------------------------------- through the command line


@pytest.fixture(scope="module")
def setup(rm):
    root = rm["root"]
    init_tiny(root / "tiny", block_size=4)
    rows = [{"id": f"q{i}", "prompt": f"{i}+{i}="} for i in range(6)]  # no answers: the reward model scores
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def pairs_cli(setup, out, *extra, ok=True, capsys=None):
    flags = ["--task", setup / "p.jsonl", "--samples", 3, "--temperature", 1, "--gen_length", 4, "--output", out]
    return cli("pairs", "--model_name_or_path", setup / "tiny", *flags, *extra, ok=ok, capsys=capsys)


def test_pairs_scored_by_a_reward_model(setup, rm, capsys):
    out = setup / "pairs.jsonl"
    res = pairs_cli(
        setup, out, "--reward_model", rm["chat"], "--reward_batch_size", 4, "--pairing", "all", capsys=capsys
    )
    items = [json.loads(line) for line in (setup / "pairs.samples.jsonl").read_text().splitlines()]
    assert len(items) == 6 and all(len(i["scores"]) == 3 for i in items)
    for item in items[:2]:  # every sample's score is the model's on its text
        want = [direct_score(rm["chat"], item["prompt"], r) for r in item["responses"]]
        assert item["scores"] == pytest.approx(want, abs=1e-5)
    weights = RewardModel(rm["chat"], device="cpu").fingerprint
    assert items[0]["made_by"]["reward_model_weights"] == weights
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs and all(p["provenance"]["reward_model_weights"] == weights for p in pairs)
    stats = json.loads(res.stdout[: res.stdout.index("\nwrote")])
    assert stats["pairs"] == len(pairs)

    # the same output with a margin: the samples are reused, pairs within it dropped and counted
    diffs = sorted(abs(a - b) for i in items for a, b in itertools.combinations(_kept(i), 2))
    gap = diffs[len(diffs) // 2]
    res = pairs_cli(setup, out, "--reward_model", rm["chat"], "--pairing", "all", "--min_score_gap", gap, capsys=capsys)
    assert [json.loads(line) for line in (setup / "pairs.samples.jsonl").read_text().splitlines()] == items
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs and all(p["chosen_score"] - p["rejected_score"] > gap for p in pairs)
    stats = json.loads(res.stdout[: res.stdout.index("\nwrote")])
    assert stats["ties_dropped"] == sum(d <= gap for d in diffs) > 0
    assert stats["pairs"] == sum(d > gap for d in diffs) == len(pairs)
    assert f"dropped {stats['ties_dropped']} candidate pairs whose scores differ by {gap} or less" in res.stdout

    # another reward model into the same output: refused, naming its weights
    res = pairs_cli(setup, out, "--reward_model", rm["other"], ok=False, capsys=capsys)
    assert "was made by another run (reward_model_weights:" in res.stderr and "Traceback" not in res.stderr


def _kept(item: dict) -> list[float]:
    return [s for t, s in zip(item["responses"], item["scores"], strict=True) if t.strip()]


def test_eval_scored_by_a_reward_model(setup, rm, capsys):
    out = setup / "eval.json"
    base = ["--model_name_or_path", setup / "tiny", "--task", setup / "p.jsonl", "--split", "train"]
    cli("eval", *base, "--gen_length", 4, "--reward_model", rm["pair"], "--output", out, capsys=capsys)
    report = json.loads(out.read_text())
    want = [direct_score(rm["pair"], s["prompt"], s["response"]) for s in report["samples"]]
    assert [s["score"] for s in report["samples"]] == pytest.approx(want, abs=1e-5)
    assert report["accuracy"] == pytest.approx(sum(want) / len(want), abs=1e-5)
    assert report["made_by"]["reward_model_weights"] == RewardModel(rm["pair"], device="cpu").fingerprint


def test_bad_reward_models_and_flags_are_one_line(setup, rm, capsys):
    root = rm["root"]
    save_reward_model(root / "lm", arch="causal")
    save_reward_model(root / "two", num_labels=2)
    (root / "empty").mkdir()
    capsys.readouterr()
    out = setup / "bad.jsonl"
    for folder, message in [
        (root / "lm", "not a sequence-classification model (architectures ['LlamaForCausalLM'])"),
        (root / "two", "has 2 labels; a reward model has one output label (num_labels=1)"),
        (root / "empty", "has no config.json"),
        (root / "missing", "not a folder"),
    ]:
        with pytest.raises(ValueError, match="^--reward_model .*" + re.escape(message)):
            check_reward_model(folder)
        res = pairs_cli(setup, out, "--reward_model", folder, ok=False, capsys=capsys)
        err = res.stderr.strip()
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    res = pairs_cli(setup, out, "--reward_model", rm["chat"], "--reward", "m:f", ok=False, capsys=capsys)
    assert "--reward and --reward_model both given" in res.stderr
    res = cli("eval", "--model_name_or_path", setup / "tiny", "--reward_model", rm["chat"], ok=False, capsys=capsys)
    assert "error: task 'arithmetic': reward_model applies to prompts files, not to built-ins" in res.stderr
    res = pairs_cli(setup, out, "--reward_model", rm["chat"], "--min_score_gap", -1, ok=False, capsys=capsys)
    assert "--min_score_gap must be a finite number >= 0, got -1" in res.stderr
    assert not out.exists()


def test_iterate_scored_by_a_reward_model(setup, rm, capsys):
    from tests.test_iterate import argv

    folder = setup / "rm_in_use"
    shutil.copytree(rm["chat"], folder)
    flags = argv(setup, setup / "rounds", "--reward_model", folder, "--eval_split", "train")
    at = flags.index("--reward")
    flags = flags[:at] + flags[at + 2 :]  # the reward model instead of the test's reward function
    flags[flags.index("--task") + 1] = str(setup / "p.jsonl")
    res = cli("iterate", *flags, "--rounds", 1, capsys=capsys)
    assert "ties dropped" in res.stdout
    assert "decoding (native defaults unless a flag): steps_per_block block size" in res.stdout  # iterate's log
    config = json.loads((setup / "rounds/iterate_config.json").read_text())
    assert config["sampling"]["remasking"] == "low_confidence"  # kept resolved: a rerun compares what it samples with
    items = [json.loads(line) for line in (setup / "rounds/round-1/pairs.samples.jsonl").read_text().splitlines()]
    item = items[0]
    want = [direct_score(rm["chat"], item["prompt"], r) for r in item["responses"]]
    assert item["scores"] == pytest.approx(want, abs=1e-5)
    weights = RewardModel(rm["chat"], device="cpu").fingerprint
    assert json.loads((setup / "rounds/iterate_config.json").read_text())["scorer"]["reward_model_weights"] == weights
    # another reward model at the same path: extending the run is refused, naming it
    shutil.copy(rm["other"] / "model.safetensors", folder / "model.safetensors")
    res = cli("iterate", *flags, "--rounds", 2, ok=False, capsys=capsys)
    assert "--reward_model_weights (" in res.stderr and "Traceback" not in res.stderr
    assert not (setup / "rounds/round-2").exists()
