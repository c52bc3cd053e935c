"""The public API as a TRL user meets it: `from dtrpo import DTRPOConfig, DTRPOTrainer, load_model`,
the trainer built as TRL's README builds `DPOTrainer`, TRL's config names (old names deprecated),
`peft_config` inside the trainer, TRL's list form of `loss_type`, and `num_tokens`."""

import datasets
import pytest
import torch
from peft import LoraConfig

import dtrpo
from dtrpo import DTRPOConfig, DTRPOTrainer, load_model
from dtrpo.losses import preference_loss
from dtrpo.models import init_tiny

PAIRS = [{"prompt": f"{i}+{i}=", "chosen": "a" * (3 + i % 4), "rejected": "zz" * (1 + i % 3)} for i in range(8)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("api") / "tiny", block_size=4, hidden_size=32)


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=2,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        report_to=[],
        logging_steps=1,
    )
    return DTRPOConfig(**{**base, **kw})


def test_built_as_trl_builds_dpo_trainer(tiny_folder, tmp_path):
    # TRL's README: model, tokenizer = from_pretrained(...); train_dataset = load_dataset(...);
    # DPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=train_dataset)
    model, tokenizer, _ = load_model(tiny_folder)
    train_dataset = datasets.Dataset.from_list(PAIRS)
    training_args = args(tmp_path)
    trainer = DTRPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=train_dataset)
    assert trainer.adapter.block_size == 4 and trainer.adapter.mask_token_id == tokenizer.mask_token_id
    before = model.model.norm.weight.detach().clone()
    trainer.train()
    assert not torch.equal(model.model.norm.weight, before)
    assert dtrpo.__all__ and dtrpo.DTRPOTrainer is DTRPOTrainer


def test_model_as_a_folder_path_and_tokens_counted(tiny_folder, tmp_path):
    trainer = DTRPOTrainer(str(tiny_folder), args=args(tmp_path, logging_steps=1), train_dataset=PAIRS)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    # 2 steps x 4 pairs: every prompt, chosen and rejected token (EOS padding to the block grid included)
    ds = trainer.train_dataset
    columns = zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)
    per_pair = [len(p) + len(c) + len(r) for p, c, r in columns]
    assert logged[-1]["num_tokens"] == sum(per_pair)  # 8 pairs seen once in 2 steps of 4
    assert logged[0]["num_tokens"] < logged[-1]["num_tokens"]


def test_peft_config_inside_the_trainer(tiny_folder, tmp_path):
    model, tokenizer, _ = load_model(tiny_folder)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = DTRPOTrainer(
        model, args=args(tmp_path), processing_class=tokenizer, train_dataset=PAIRS, peft_config=peft_config
    )
    assert trainer.ref_model is None  # the reference is the same model with its adapters disabled
    lora = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_B" in k}
    trainer.train()
    assert lora and all(not torch.equal(trainer.model.state_dict()[k], v) for k, v in lora.items())
    with trainer.model.disable_adapter():
        for k, v in trainer.model.base_model.model.state_dict().items():
            if "lora_" not in k and k.replace(".base_layer", "") in base:
                assert torch.equal(v, base[k.replace(".base_layer", "")]), k


def test_loss_type_list_is_the_weighted_sum(tiny_folder, tmp_path):
    trainer = DTRPOTrainer(
        str(tiny_folder),
        args=args(tmp_path, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5]),
        train_dataset=PAIRS,
    )
    chosen, rejected = torch.tensor([0.3, -1.0]), torch.tensor([0.1, 2.0])
    got, _ = trainer.preference_losses(chosen, rejected)
    sig, _ = preference_loss(chosen, rejected, 0.1, "sigmoid")
    ipo, _ = preference_loss(chosen, rejected, 0.1, "ipo")
    torch.testing.assert_close(got, sig + 0.5 * ipo)
    assert DTRPOConfig(output_dir=str(tmp_path), loss_type="hinge").loss_type == ["hinge"]  # a string is a list of one
    with pytest.raises(ValueError, match="--loss_weights has 1 weights for 2 losses"):
        args(tmp_path, loss_type=["sigmoid", "ipo"], loss_weights=[1.0])


def test_old_names_still_work_with_a_warning_naming_the_new_one(tmp_path):
    with pytest.warns(FutureWarning, match="--precompute_ref is deprecated; use --precompute_ref_log_probs"):
        a = args(tmp_path, precompute_ref=True)
    assert a.precompute_ref_log_probs is True and a.precompute_ref is None
    with pytest.warns(FutureWarning, match="--max_response_length is deprecated; use --max_completion_length"):
        a = args(tmp_path, max_response_length=16)
    assert a.max_completion_length == 16


def test_max_length_leaves_the_prompt_what_the_completion_does_not_use(tiny_folder, tmp_path):
    long = [{"prompt": "p" * 40, "chosen": "ab", "rejected": "c"}]
    trainer = DTRPOTrainer(
        str(tiny_folder), args=args(tmp_path, max_length=24, max_completion_length=8), train_dataset=long
    )
    assert len(trainer.train_dataset[0]["prompt_ids"]) == 16
    with pytest.raises(ValueError, match="--max_length=8 leaves no room for a prompt"):
        args(tmp_path, max_length=8, max_completion_length=8)


def test_dropout_disabled_as_trl_does(tmp_path, tokenizer):
    from dtrpo.models import make_tiny_model

    model = make_tiny_model(tokenizer, block_size=4)
    model.model.layers[0].mlp.dropout = torch.nn.Dropout(0.3)  # a model that has dropout
    DTRPOTrainer(model, args=args(tmp_path), processing_class=tokenizer, train_dataset=PAIRS)
    assert model.model.layers[0].mlp.dropout.p == 0.0


# ----------------------------------------------------------------------------- model card and the Hub


def test_model_card_with_every_saved_model(tiny_folder, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(__import__("json").dumps(p) for p in PAIRS))
    trainer = DTRPOTrainer(str(tiny_folder), args=args(tmp_path, beta=0.25), train_dataset=str(data))
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    meta = __import__("yaml").safe_load(card.split("---")[1])
    assert meta["base_model"] == str(tiny_folder) and meta["datasets"] == [str(data)]
    assert {"dtrpo", "dpo", "generated_from_trainer"} <= set(meta["tags"])
    assert "arXiv:2603.18806" in card and '"beta": 0.25' in card  # citation and the resolved config
    final = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert f"| rewards/margins | {final['rewards/margins']:.4g} |" in card  # the final metrics


def test_push_to_hub_up_to_the_hub_boundary(tiny_folder, tmp_path, monkeypatch):
    """push_to_hub goes through the Trainer's own path: the repo is created, the model card written and
    the output folder uploaded. The Hub client is replaced at the boundary (no network here)."""
    from types import SimpleNamespace

    import transformers.trainer

    calls = {}

    class FakeHub:
        def create_repo(self, repo_id, **kw):
            calls["repo"] = repo_id
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, **kw):
            calls["upload"] = (repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()))
            calls["card"] = (__import__("pathlib").Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeHub())
    trainer = DTRPOTrainer(
        str(tiny_folder), args=args(tmp_path, push_to_hub=True, hub_model_id="me/tiny-dtrpo"), train_dataset=PAIRS
    )
    trainer.train()
    trainer.push_to_hub()
    repo, files = calls["upload"]
    assert calls["repo"] == repo == "me/tiny-dtrpo"
    assert {"README.md", "config.json", "model.safetensors", "dtrpo_config.json", "tokenizer.json"} <= set(files)
    assert "# tiny-dtrpo" in calls["card"]


def test_a_trl_dpo_yaml_runs_dtrpo_train(tiny_folder, tmp_path, capsys):
    """TRL's DPO example config, field names unchanged (the model and dataset are local here)."""
    from dtrpo.cli import main

    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(__import__("json").dumps(p) for p in PAIRS))
    preset = tmp_path / "dpo.yaml"
    preset.write_text(
        f"""model_name_or_path: {tiny_folder}
dataset_name: {data}
dataset_train_split: train
learning_rate: 5.0e-7
num_train_epochs: 1
max_steps: 2
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
gradient_checkpointing: true
logging_steps: 1
eval_strategy: "no"
output_dir: {tmp_path / "Qwen2-0.5B-DPO"}
use_peft: true
lora_r: 8
lora_alpha: 16
beta: 0.1
max_prompt_length: 64
max_completion_length: 32
loss_type: [sigmoid]
report_to: none
use_cpu: true
"""
    )
    main(["train", "--config", str(preset)])
    out = tmp_path / "Qwen2-0.5B-DPO"
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()  # merged model and its card
    state = __import__("json").loads((out / "dtrpo_config.json").read_text())["args"]
    assert state["gradient_accumulation_steps"] == 2 and state["learning_rate"] == 5e-7
    model, _, _ = load_model(out)  # the merged LoRA model loads as a plain model
    assert not any("lora_" in k for k in model.state_dict())


def test_old_cli_flags_warn_and_work(tiny_folder, tmp_path, capsys):
    from dtrpo.cli import main

    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(__import__("json").dumps(p) for p in PAIRS))
    main(["train", "--model", str(tiny_folder), "--data", str(data), "--output_dir", str(tmp_path / "o"),
          "--max_steps", "1", "--use_cpu", "true", "--report_to", "none"])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        "--model is deprecated; use --model_name_or_path" in err and "--data is deprecated; use --dataset_name" in err
    )
    assert (tmp_path / "o" / "model.safetensors").is_file()
