"""Sequence-classification recipes: task sequence-classification loads AutoModelForSequenceClassification
with num_labels, labelled JSON(L)/hub rows become (input_ids, label) examples, the run reports accuracy.
The task here is real and offline: tell a stdlib ``def`` line from a ``class`` line."""

import json
import sysconfig
from pathlib import Path

import pytest

from trainer_plugins import ConfigError
from trainer_plugins.recipes import load_recipe, run_recipe


def stdlib_headers(limit=400) -> list[dict]:
    """First lines of top-level defs (label 0) and classes (label 1) from stdlib modules, alternating."""
    defs, classes = [], []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("def ") and len(defs) < limit // 2:
                defs.append({"text": line, "label": 0})
            elif line.startswith("class ") and len(classes) < limit // 2:
                classes.append({"text": line, "label": 1})
    return [row for pair in zip(defs, classes) for row in pair]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    path = tmp_path_factory.mktemp("labelled") / "headers.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in stdlib_headers()))
    return str(path)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, tokenizer_dir):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(out)
    return str(out)


def recipe(model_dir, tokenizer_dir, dataset, out, model=None, **train):
    return {
        "model": {"model_name_or_path": model_dir, "tokenizer_name_or_path": tokenizer_dir, "dtype": "float32",
                  "task": "sequence-classification", "num_labels": 2, **(model or {})},
        "data": {"dataset": dataset, "max_seq_length": 32, "max_train_samples": 256, "max_eval_samples": 32,
                 "eval_fraction": 0.1},
        "train": {"output_dir": str(out), "max_steps": 30, "per_device_train_batch_size": 8, "logging_steps": 10,
                  "learning_rate": 5e-3, "report_to": [], "use_cpu": True, "save_strategy": "no", **train},
    }


@pytest.mark.parametrize("train", [{}, {"meft": "meft1", "meft_lora_r": 4, "meft_adapter_dim": 4, "learning_rate": 1e-2}],
                         ids=["full", "meft1"])
def test_a_classifier_learns_and_reports_accuracy(tiny_bert, tokenizer_dir, labelled, tmp_path, train):
    result = run_recipe(load_recipe(recipe(tiny_bert, tokenizer_dir, labelled, tmp_path, **train)))
    assert result["before"]["accuracy"] <= 0.75 and result["after"]["accuracy"] >= 0.9
    assert result["after"]["eval_loss"] < result["before"]["eval_loss"]
    assert "perplexity" not in result["after"] and "sample_after" not in result


@pytest.mark.parametrize("model, data, message", [
    ({"num_labels": None}, {}, "needs num_labels >= 2"),
    ({"task": "causal-lm"}, {}, "num_labels applies to task sequence-classification"),
    ({}, {"dataset": "stdlib"}, "needs labelled rows"),
])
def test_bad_input_is_refused_before_loading(tiny_bert, tokenizer_dir, labelled, tmp_path, model, data, message):
    r = recipe(tiny_bert, tokenizer_dir, labelled, tmp_path, model=model)
    r["data"].update(data)
    with pytest.raises(ConfigError, match=message):
        load_recipe(r)


@pytest.mark.parametrize("row, message", [
    ({"text": "def f():", "label": 2}, r"label must be an integer in \[0, 2\)"),
    ({"text": "def f():", "category": 0}, "has no 'label' field"),
    ({"text": "def f():", "label": 0, "second": {"text": "class A:"}}, "row 1 has no 'text' or no 'label' field"),
])
def test_bad_rows_name_the_problem(tiny_bert, tokenizer_dir, tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    row = dict(row)
    second = row.pop("second", None) or {**row, "text": "class A:"}
    path.write_text(json.dumps(row) + "\n" + json.dumps(second))
    with pytest.raises(ConfigError, match=message):
        run_recipe(load_recipe(recipe(tiny_bert, tokenizer_dir, str(path), tmp_path / "out")))
