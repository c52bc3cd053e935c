"""lm-evaluation-harness on the tiny model, offline, with small local tasks (generation and
multiple choice): the registered `dtrpo` model through the harness's own evaluator and CLI."""

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from dtrpo.harness import DTRPOLM  # noqa: E402
from dtrpo.models import init_tiny  # noqa: E402

GEN_TASK = """task: dtrpo_tiny_echo
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""
MC_TASK = """task: dtrpo_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module", params=["tiny", "llada2"])
def setup(request, tmp_path_factory):
    """The built-in tiny model, and a tiny LLaDA2 (mixture of experts, the family's own layout and decoding rule)."""
    from dtrpo.families import llada2

    root = tmp_path_factory.mktemp("harness")
    model = (init_tiny if request.param == "tiny" else llada2.init_tiny)(root / "tiny", block_size=4, hidden_size=32)
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i), "choices": [str(2 * i), "xyz"], "label": 0} for i in range(4)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=root / "data.jsonl"))
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=root / "data.jsonl"))
    return model, tasks


def test_simple_evaluate_runs_both_request_types(setup, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    model, tasks = setup
    lm = DTRPOLM(pretrained=str(model), batch_size=2, mc_samples=4)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["dtrpo_tiny_echo", "dtrpo_tiny_choice"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
    )
    gen, mc = out["results"]["dtrpo_tiny_echo"], out["results"]["dtrpo_tiny_choice"]
    assert 0.0 <= gen["exact_match,none"] <= 1.0 and 0.0 <= mc["acc,none"] <= 1.0


def test_loglikelihood_is_the_documented_estimate(setup):
    """The default is the ELBO estimate of the continuation (dtrpo's vrpo estimator with mc_samples
    stratified levels, seeded by the request), reproducible, and equal to that estimator run directly."""
    from types import SimpleNamespace

    from dtrpo.estimators import Batch, EstimatorConfig, draw, score
    from dtrpo.masking import example_seed

    model, _ = setup
    lm = DTRPOLM(pretrained=str(model), mc_samples=4)
    req = SimpleNamespace(args=("1+1=", "2"))
    (a, greedy), (b, _) = lm.loglikelihood([req, req])
    assert a == b and a < 0 and isinstance(greedy, bool)
    ctx, cont = lm._encode("1+1="), lm._encode("2")
    batch = Batch(
        torch.tensor([ctx]),
        torch.ones(1, len(ctx), dtype=torch.bool),
        torch.tensor([cont]),
        torch.ones(1, 1, dtype=torch.bool),
    )
    cfg = EstimatorConfig(estimator="vrpo", steps_per_block=4, vrpo_samples=4)
    with torch.no_grad():
        want, _ = score(
            lm.adapter,
            lm.model,
            batch,
            draw(lm.adapter, batch, [example_seed(0, "lm-eval", tuple(ctx), tuple(cont))], cfg),
        )
    assert math.isclose(a, want.item(), abs_tol=1e-5)
    with pytest.raises(ValueError, match="unknown \\['nonsense'\\]"):
        DTRPOLM(pretrained=str(model), nonsense=1)


def test_generate_until_cuts_at_the_stop_string(setup):
    from types import SimpleNamespace

    model, _ = setup
    lm = DTRPOLM(pretrained=str(model))
    (text,) = lm.generate_until([SimpleNamespace(args=("1+1=", {"until": ["1"], "max_gen_toks": 6}))])
    full = lm.generate_until([SimpleNamespace(args=("1+1=", {"until": [], "max_gen_toks": 6}))])[0]
    assert text == full.split("1")[0] and len(full) <= 8  # 6 tokens, rounded up to 2 blocks of 4


@pytest.mark.slow  # the harness's command line indexes its thousands of built-in tasks first (~20 s)
def test_the_cli_is_the_harness_cli(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from dtrpo.cli import main

    model, tasks = setup
    main(
        [
            "lm-eval",
            "--model", "dtrpo",
            "--model_args", f"pretrained={model},mc_samples=2",
            "--tasks", "dtrpo_tiny_choice",
            "--include_path", str(tasks),
            "--output_path", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    assert "dtrpo_tiny_choice" in capsys.readouterr().out
    assert list((tmp_path / "out").rglob("results*.json"))
