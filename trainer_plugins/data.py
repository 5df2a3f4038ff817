"""Training data: a corpus name or path -> tokenized train/eval datasets for causal-LM training, or
labelled rows -> sequence-classification examples.

Sources: ``stdlib`` (the installed Python standard library's ``.py`` files, offline and always there),
a ``.txt`` / ``.jsonl`` / ``.json`` file, a directory of ``.txt`` / ``.md`` / ``.py`` files, or a Hugging
Face dataset name (needs ``datasets``). Raw text is packed into fixed-size blocks; chat rows
(``[{"role", "content"}, ...]``) go through the tokenizer's chat template with loss on assistant tokens only.

Every source is read as a list of cheap *items* (file paths, rows, row indices) that are split into
train/eval by a stable hash, shuffled with the seed, and only then read and tokenized, lazily, until
``max_train_samples`` / ``max_eval_samples`` examples exist: a small CPU run never tokenizes a whole corpus.

Sequence classification (``num_labels`` given, from the model's ``task``): rows of a JSON(L) file or a
Hugging Face dataset with a text and an integer label column; one truncated example per row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sysconfig
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from .errors import ConfigError
from .manager import importable

logger = logging.getLogger("trainer_plugins")

IGNORE_INDEX = -100  # label value the causal-LM loss skips
FILE_SUFFIXES = (".txt", ".jsonl", ".json")
DIRECTORY_SUFFIXES = (".txt", ".md", ".py")
# Extensions that mark a missing dataset as a local path (and not a Hugging Face name).
_PATH_LIKE_SUFFIXES = FILE_SUFFIXES + DIRECTORY_SUFFIXES + (".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zip")
_TOKENIZE_BATCH = 4  # documents per tokenizer call: parallel in Rust, and a small overshoot past the caps


@dataclass
class DataArguments:
    dataset: str = field(
        default="stdlib",
        metadata={"help": "'stdlib' (the installed Python standard library's .py files, offline), a .txt/.jsonl/"
                          ".json file, a directory of .txt/.md/.py files, or a Hugging Face dataset name "
                          "(needs `datasets`)."},
    )
    dataset_config: Optional[str] = field(
        default=None, metadata={"help": "Configuration name of a Hugging Face dataset."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hugging Face dataset to read."})
    text_field: str = field(default="text", metadata={"help": "JSON(L)/Hugging Face column holding raw text."})
    label_field: str = field(
        default="label",
        metadata={"help": "Sequence classification: the JSON(L)/Hugging Face column holding the class id "
                          "(an integer in [0, num_labels))."},
    )
    messages_field: str = field(
        default="messages",
        metadata={"help": "JSON(L)/Hugging Face column holding chat messages [{'role', 'content'}, ...]; "
                          "when present, rows are chats trained on the assistant replies only."},
    )
    max_seq_length: int = field(
        default=512, metadata={"help": "Block size of packed text; truncation length of chat rows and unpacked text."}
    )
    packing: bool = field(
        default=True,
        metadata={"help": "Raw text: concatenate documents (EOS between) and cut into max_seq_length blocks; "
                          "otherwise one truncated example per document."},
    )
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Held-out share in [0, 1), split by a stable hash of each file's path (stdlib, "
                          "directories) or each document/row; 0 disables evaluation."},
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Stop after this many training examples (blocks or rows)."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Stop after this many evaluation examples (blocks or rows)."}
    )
    stdlib_exclude: str = field(
        default="test,tests,idlelib,turtledemo,lib2to3,ensurepip,site-packages,__pycache__",
        metadata={"help": "Comma-separated directory or module names skipped in the stdlib corpus."},
    )


def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


# ----------------------------------------------------------------------------------------- validation


def validate_data_args(data_args: DataArguments, num_labels: Optional[int] = None) -> None:
    """Every check that needs no tokenizer and no model. Raises ConfigError."""
    a = data_args
    if num_labels is not None:
        path = _local_path(a.dataset) if a.dataset != "stdlib" else None
        if a.dataset == "stdlib" or (path is not None and (path.is_dir() or path.suffix.lower() == ".txt")):
            raise ConfigError(f"sequence classification needs labelled rows (a .jsonl/.json file or a Hugging Face "
                              f"dataset with '{a.text_field}' and '{a.label_field}' fields), not {a.dataset!r}")
    if not 0 <= a.eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {a.eval_fraction}")
    if a.max_seq_length < 8:
        raise ConfigError(f"max_seq_length must be at least 8, got {a.max_seq_length}")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(a, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be a positive number or unset, got {value}")
    if not a.dataset:
        raise ConfigError("dataset is empty; use 'stdlib', a file, a directory or a Hugging Face dataset name")

    if a.dataset == "stdlib":
        if not stdlib_root().is_dir():
            raise ConfigError(f"the Python standard library was not found at {stdlib_root()}; "
                              "choose another dataset")
        return
    path = _local_path(a.dataset)
    if path is None:
        if not importable("datasets"):
            raise ConfigError(f"dataset '{a.dataset}' is read as a Hugging Face dataset name, which needs the "
                              "`datasets` package: pip install datasets (or give a local file or directory)")
        return
    if not path.exists():
        raise ConfigError(f"dataset path not found: {path}")
    if path.is_dir():
        if next(_iter_files(path, DIRECTORY_SUFFIXES, skip=set()), None) is None:
            raise ConfigError(f"dataset directory {path} has no {'/'.join(DIRECTORY_SUFFIXES)} files")
    elif path.suffix.lower() not in FILE_SUFFIXES:
        raise ConfigError(f"dataset file {path} has an unsupported extension '{path.suffix}'; "
                          f"use {', '.join(FILE_SUFFIXES)} or a directory")


def _local_path(dataset: str) -> Optional[Path]:
    """The dataset as a local path, or None when it reads as a Hugging Face name ('owner/name')."""
    path = Path(dataset).expanduser()
    looks_local = (dataset.startswith(("/", ".", "~")) or dataset.count("/") > 1 or "\\" in dataset
                   or path.suffix.lower() in _PATH_LIKE_SUFFIXES)
    return path if path.exists() or looks_local else None


# ----------------------------------------------------------------------------------------- corpora


@dataclass
class _Corpus:
    """A source before tokenization: cheap items, how to read one, and the key that splits it."""

    name: str
    is_chat: bool
    items: list
    read: Callable[[Any], Any]  # item -> text (str), messages (list of dicts) or (text, label)
    split_key: Callable[[Any], str]
    is_labelled: bool = False


def _load_corpus(a: DataArguments) -> _Corpus:
    if a.dataset == "stdlib":
        root = stdlib_root()
        skip = {name.strip() for name in a.stdlib_exclude.split(",") if name.strip()}
        # The header tells the model (and a reader of samples) which module a block comes from.
        return _files_corpus("stdlib", root, _sorted_files(root, (".py",), skip),
                             header=lambda rel: f"# file: {rel}\n")
    path = _local_path(a.dataset)
    if path is None:
        return _hf_corpus(a)
    if path.is_dir():
        return _files_corpus(str(path), path, _sorted_files(path, DIRECTORY_SUFFIXES, skip=set()))
    if path.suffix.lower() == ".txt":
        # A text file holds many documents: one per blank-line-separated paragraph.
        text = path.read_text(encoding="utf-8", errors="replace")
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        return _Corpus(str(path), False, paragraphs, read=lambda p: p, split_key=lambda p: p)
    return _json_corpus(path, a)


def _iter_files(root: Path, suffixes: tuple, skip: set) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruned in place, so skipped trees (the stdlib's test/, .git) are never walked.
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            if name.lower().endswith(suffixes) and name not in skip and Path(name).stem not in skip:
                yield Path(dirpath, name)


def _sorted_files(root: Path, suffixes: tuple, skip: set) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in _iter_files(root, suffixes, skip))


def _files_corpus(name: str, root: Path, relpaths: list[str], header: Callable[[str], str] = lambda rel: "") -> _Corpus:
    def read(rel: str) -> str:
        return header(rel) + (root / rel).read_text(encoding="utf-8", errors="replace")

    return _Corpus(name, False, relpaths, read=read, split_key=lambda rel: rel)


def _json_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(rows, list):
            raise ConfigError(f"{path} must hold a JSON list of objects, got {type(rows).__name__}")
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise ConfigError(f"{path} must hold at least one row, every row a JSON object")
    return rows


def _labelled_corpus(a: DataArguments, num_labels: int) -> _Corpus:
    """Rows of (text, label) from a JSON(L) file or a Hugging Face dataset."""
    path = _local_path(a.dataset)
    if path is None:
        rows, where = _hf_dataset(a)
        columns, name, split_key = rows.column_names, a.dataset, (lambda i: f"row {i}")
    else:
        where = str(path)
        rows = _json_rows(path)
        columns, name = rows[0].keys(), str(path)
        split_key = lambda i: json.dumps(rows[i], sort_keys=True)  # noqa: E731 (by content, as above)
    missing = [c for c in (a.text_field, a.label_field) if c not in columns]
    if missing:
        raise ConfigError(f"{where} has no {' and no '.join(map(repr, missing))} field (found "
                          f"{', '.join(map(str, columns))}); set text_field / label_field")

    def read(i):
        row = rows[i]
        if a.text_field not in row or a.label_field not in row:  # JSON rows need not share their keys
            raise ConfigError(f"{where} row {i} has no '{a.text_field}' or no '{a.label_field}' field")
        text, label = row[a.text_field], row[a.label_field]
        if not isinstance(text, str):
            raise ConfigError(f"{where} row {i}: text must be a string, got {type(text).__name__}")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
            raise ConfigError(f"{where} row {i}: label must be an integer in [0, {num_labels}) (num_labels), "
                              f"got {label!r}")
        return text, label

    return _Corpus(name, False, list(range(len(rows))), read=read, split_key=split_key, is_labelled=True)


def _labelled_examples(rows: Iterable[tuple], tokenizer, max_length: int, limit: Optional[int]) -> list[dict]:
    examples = []
    for text, label in islice(rows, limit):
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        examples.append({"input_ids": ids, "labels": label})
    return examples


def _json_corpus(path: Path, a: DataArguments) -> _Corpus:
    rows = _json_rows(path)
    column, is_chat = _pick_column(rows[0].keys(), a, str(path))
    for number, row in enumerate(rows, 1):
        if column not in row:
            raise ConfigError(f"{path}: row {number} has no '{column}' field")
    # Keyed by content: an edit elsewhere in the file never moves a row between train and eval.
    return _Corpus(str(path), is_chat, list(range(len(rows))),
                   read=lambda i: _checked(rows[i][column], is_chat, f"{path}: row {i + 1}"),
                   split_key=lambda i: json.dumps(rows[i][column], sort_keys=True))


def _hf_dataset(a: DataArguments):
    """(the split of the Hugging Face dataset, how errors name it)."""
    import datasets

    where = f"Hugging Face dataset '{a.dataset}'"
    try:
        return datasets.load_dataset(a.dataset, a.dataset_config, split=a.dataset_split), where
    except (FileNotFoundError, ConnectionError, ValueError) as exc:
        raise ConfigError(f"could not load {where} (config {a.dataset_config}, split {a.dataset_split}): "
                          f"{exc}") from exc


def _hf_corpus(a: DataArguments) -> _Corpus:
    ds, where = _hf_dataset(a)
    column, is_chat = _pick_column(ds.column_names, a, where)
    # Keyed by row index: hashing content would read every row, and the caps are there to avoid that.
    return _Corpus(a.dataset, is_chat, list(range(len(ds))),
                   read=lambda i: _checked(ds[i][column], is_chat, f"{where} row {i}"),
                   split_key=lambda i: f"row {i}")


def _pick_column(columns: Iterable[str], a: DataArguments, where: str) -> tuple[str, bool]:
    columns = list(columns)
    if a.messages_field in columns:
        return a.messages_field, True
    if a.text_field in columns:
        return a.text_field, False
    raise ConfigError(f"{where} has neither a '{a.messages_field}' nor a '{a.text_field}' field "
                      f"(found {', '.join(map(str, columns))}); set messages_field or text_field")


def _checked(value: Any, is_chat: bool, where: str) -> Any:
    if is_chat and not (isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)):
        raise ConfigError(f"{where}: chat messages must be a list of {{'role', 'content'}} objects")
    if not is_chat and not isinstance(value, str):
        raise ConfigError(f"{where}: text must be a string, got {type(value).__name__}")
    return value


def _split(corpus: _Corpus, eval_fraction: float) -> tuple[list, list]:
    """Train/eval items by a stable hash of each item's key: the same item always lands on the same side."""
    if eval_fraction == 0:
        return list(corpus.items), []
    position = {item: _unit_hash(corpus.split_key(item)) for item in corpus.items}
    held_out = {item for item in corpus.items if position[item] < eval_fraction}
    if not held_out and len(corpus.items) > 1:
        held_out = {min(corpus.items, key=position.get)}  # a small corpus still gets an eval set
    return [i for i in corpus.items if i not in held_out], [i for i in corpus.items if i in held_out]


def _unit_hash(key: str) -> float:
    """A stable number in [0, 1) (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


# ----------------------------------------------------------------------------------------- tokenization


class TokenizedDataset(torch.utils.data.Dataset):
    """Examples ready for the collator: dicts of ``input_ids`` and ``labels`` (lists of ints)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def build_datasets(data_args: DataArguments, tokenizer, seed: int = 42,
                   num_labels: Optional[int] = None) -> tuple[TokenizedDataset, Optional[TokenizedDataset]]:
    """(train, eval) datasets; eval is None when eval_fraction is 0. Deterministic for a given seed.
    With ``num_labels``: sequence-classification examples (input_ids, an integer label)."""
    a = data_args
    validate_data_args(a, num_labels)
    corpus = _load_corpus(a) if num_labels is None else _labelled_corpus(a, num_labels)
    train_items, eval_items = _split(corpus, a.eval_fraction)
    rng = random.Random(seed)
    rng.shuffle(train_items)
    rng.shuffle(eval_items)

    train = TokenizedDataset(_examples(corpus, train_items, tokenizer, a, a.max_train_samples))
    if not train:
        raise ConfigError(f"dataset {corpus.name} gave no training examples")
    if a.eval_fraction == 0:
        return train, None
    evaluation = TokenizedDataset(_examples(corpus, eval_items, tokenizer, a, a.max_eval_samples))
    if not evaluation:
        logger.warning("dataset %s gave no evaluation examples; evaluation is off", corpus.name)
        return train, None
    return train, evaluation


def calibration_batches(dataset: str, samples: int, seq_length: int, tokenizer, seed: int = 42,
                        batch_size: int = 4) -> list[torch.Tensor]:
    """``samples`` token blocks of exactly ``seq_length`` tokens from ``dataset``, stacked into batches: the
    calibration text plugins score weights on (pruning importance, Fisher information)."""
    data_args = DataArguments(dataset=dataset, max_seq_length=seq_length, max_train_samples=samples,
                              eval_fraction=0.0)
    train, _ = build_datasets(data_args, tokenizer, seed=seed)
    rows = [torch.tensor(ex["input_ids"]) for ex in train if len(ex["input_ids"]) == seq_length]
    if not rows:
        raise ConfigError(f"calibration dataset {dataset!r} gave no sequence of {seq_length} tokens")
    return [torch.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def _examples(corpus: _Corpus, items: list, tokenizer, a: DataArguments, limit: Optional[int]) -> list[dict]:
    documents = (corpus.read(item) for item in items)  # lazy: only what the limit needs is read
    if corpus.is_labelled:
        return _labelled_examples(documents, tokenizer, a.max_seq_length, limit)
    if corpus.is_chat:
        return _chat_examples(documents, tokenizer, a.max_seq_length, limit)
    if a.packing:
        return _packed_blocks(documents, tokenizer, a.max_seq_length, limit)
    return _truncated_documents(documents, tokenizer, a.max_seq_length, limit)


def _token_ids(texts: Iterable[str], tokenizer) -> Iterator[list[int]]:
    """Token ids of each text, a few texts per tokenizer call."""
    texts = iter(texts)
    while batch := list(islice(texts, _TOKENIZE_BATCH)):
        # verbose=False: long documents are expected here, the "longer than model_max_length" warning is not.
        yield from tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _end_of_document(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _packed_blocks(texts: Iterable[str], tokenizer, block_size: int, limit: Optional[int]) -> list[dict]:
    """Documents joined with EOS and cut into blocks of block_size; the stream's short tail is kept."""
    blocks: list[dict] = []
    buffer: list[int] = []
    for ids in _token_ids(texts, tokenizer):
        buffer += ids + _end_of_document(tokenizer)
        full = len(buffer) // block_size
        for start in range(0, full * block_size, block_size):
            block = buffer[start:start + block_size]
            blocks.append({"input_ids": block, "labels": list(block)})
            if limit is not None and len(blocks) >= limit:
                return blocks
        del buffer[:full * block_size]
    if buffer:
        blocks.append({"input_ids": buffer, "labels": list(buffer)})
    return blocks


def _truncated_documents(texts: Iterable[str], tokenizer, max_length: int, limit: Optional[int]) -> list[dict]:
    examples: list[dict] = []
    for ids in _token_ids(texts, tokenizer):
        ids = (ids + _end_of_document(tokenizer))[:max_length]
        examples.append({"input_ids": ids, "labels": list(ids)})
        if limit is not None and len(examples) >= limit:
            break
    return examples


def _chat_examples(conversations: Iterable[list], tokenizer, max_length: int, limit: Optional[int]) -> list[dict]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the dataset has chat rows, but the tokenizer has no chat template")
    examples: list[dict] = []
    dropped = 0
    for messages in conversations:
        example = _encode_chat(messages, tokenizer, max_length)
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped += 1  # nothing to learn (no assistant turn, or it was truncated away)
            continue
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if dropped:
        logger.warning("%d chat rows have no assistant tokens within max_seq_length=%d and were dropped",
                       dropped, max_length)
    return examples


def _encode_chat(messages: list[dict], tokenizer, max_length: int) -> dict:
    """The rendered conversation, with labels only on the assistant replies and their end-of-turn token.

    Each reply's span is found by rendering the conversation up to it with add_generation_prompt=True
    (the exact prompt the model answers at inference), so no {% generation %} tags are needed.
    """
    def render(msgs: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    text = render(messages)
    replies = []  # character spans [start, end) that carry loss
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, through_reply = render(messages[:i], prompt=True), render(messages[:i + 1])
        if not (through_reply.startswith(prompt) and text.startswith(through_reply)):
            raise ConfigError("the chat template does not render conversations incrementally, so assistant "
                              f"replies cannot be located (conversation starting {text[:80]!r})")
        # Whitespace after the end-of-turn token is never generated, so it is not trained either.
        replies.append((len(prompt), len(through_reply.rstrip())))

    # Offsets map tokens of the whole text back to characters: exact, whatever merges at the span edges.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    input_ids = encoded["input_ids"][:max_length]
    labels = [token if any(start <= first < end for start, end in replies) else IGNORE_INDEX
              for token, (first, _) in zip(input_ids, encoded["offset_mapping"])]
    return {"input_ids": input_ids, "labels": labels}


# ----------------------------------------------------------------------------------------- batching


def data_collator(tokenizer, classification: bool = False):
    """Pads input_ids (pad token), attention_mask (0) and labels (-100) to the longest in the batch;
    ``classification``: one integer label per example, only the inputs are padded."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        # Any id works: padded positions are masked out of attention and loss.
        tokenizer.pad_token = tokenizer.eos_token
    if classification:
        return DataCollatorWithPadding(tokenizer, return_tensors="pt")
    # Works for causal LMs too: it pads labels with label_pad_token_id and the rest with tokenizer.pad.
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
