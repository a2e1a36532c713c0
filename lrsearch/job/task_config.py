"""The job file's ``task`` section: one pydantic model per task kind (``kind`` picks it)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PositiveInt = Annotated[int, Field(ge=1)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, and values are re-checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)




class SyntheticTask(Strict):
    """A tiny synthetic task for tests (Gaussian clusters, an MLP trained from scratch)."""

    kind: Literal["synthetic"]
    num_train: PositiveInt = 2048
    num_val: PositiveInt = 512
    #: held-out examples only a final run (``lrsearch train``) scores; the search never sees them
    num_test: Annotated[int, Field(ge=0)] = 512
    num_features: PositiveInt = 32
    num_classes: Annotated[int, Field(ge=2)] = 8
    hidden: PositiveInt = 64
    noise: NonNegFloat = 2.0
    batch_size: PositiveInt = 64
    seed: int = 0


class PeftConfig(Strict):
    """``task.peft``: fine-tune a LoRA adapter (PyPI ``peft``) instead of every weight.

    The pretrained weights stay frozen; the low-rank updates of ``target_modules`` and the new
    classifier head train. ``alpha / r`` scales the update, as in the LoRA paper.
    """

    #: rank of each low-rank update
    r: PositiveInt = 8
    #: LoRA's ``lora_alpha``: the update is scaled by ``alpha / r``
    alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 16.0
    #: dropout on the adapter's input
    dropout: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.1
    #: names of the layers to adapt (``query``, ``value``); ``None``: peft's default for the model
    #: type (``query`` and ``value`` for BERT and MiniLM)
    target_modules: list[str] | None = None

    @field_validator("target_modules")
    @classmethod
    def _target_modules(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not all(name.strip() for name in value)):
            raise ValueError("allowed: a non-empty list of layer names (or leave it out for peft's default)")
        return value


class _TextData(Strict):
    """What the text tasks read: a corpus (fortunes, or a table's text column) and its splits."""

    dataset: str = "fortunes"
    categories: list[str] | None = None
    text_column: str = "text"
    num_train: Annotated[int, Field(ge=2)] = 512
    num_val: Annotated[int, Field(ge=2)] = 256
    #: held-out texts only a final run (``lrsearch train``) scores; the search never sees them
    num_test: Annotated[int, Field(ge=0)] = 256
    max_length: Annotated[int, Field(ge=2)] = 64
    batch_size: PositiveInt = 16
    seed: int = 0


class TextClassificationTask(_TextData):
    """A Hugging Face sequence classifier fine-tuned on labelled text."""

    kind: Literal["text_classification"]
    model: str = "minilm-l6"
    label_column: str = "label"
    #: train a LoRA adapter and the head instead of the whole model (``None``: full fine-tuning)
    peft: PeftConfig | None = None

    @field_validator("categories")
    @classmethod
    def _categories(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) < 2:
            raise ValueError("needs at least 2 distinct categories")
        return value


class LanguageModelingTask(_TextData):
    """A Hugging Face causal language model (GPT-2 style) fine-tuned on text; labels are ignored."""

    kind: Literal["language_modeling"]
    model: str
    #: what the search minimises: mean validation token loss, or its exp (perplexity)
    metric: Literal["loss", "perplexity"] = "loss"

    @field_validator("categories")
    @classmethod
    def _categories(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("needs at least 1 category, each named once")
        return value


class ImageClassificationTask(Strict):
    """A pretrained image classifier fine-tuned on labelled images."""

    kind: Literal["image_classification"]
    model: str = "efficientnet-lite0"
    dataset: str = "fashion_mnist"
    weights: str | None = None
    num_classes: Annotated[int, Field(ge=2)] | None = None
    image_size: Annotated[int, Field(ge=8, le=1024)] = 64
    num_train: PositiveInt = 512
    num_val: PositiveInt = 256
    #: held-out images only a final run (``lrsearch train``) scores; the search never sees them
    num_test: Annotated[int, Field(ge=0)] = 512
    batch_size: PositiveInt = 32
    seed: int = 0


_ENTRYPOINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class PythonTask(Strict):
    """The user's own code: ``entrypoint`` is ``package.module:function`` returning a ``Task``, a
    ``transformers.Trainer``, a ``(LightningModule, LightningDataModule)`` pair or a
    ``train_fn(trial)`` (:func:`lrsearch.tasks.user.python_loop` tells them apart).

    The function is called with ``options`` as keyword arguments. ``path`` (relative to the job
    file) is put on ``sys.path`` first, so a task module can sit next to the job file.
    """

    kind: Literal["python"]
    entrypoint: str
    options: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value: str) -> str:
        if not _ENTRYPOINT.match(value):
            raise ValueError("must look like 'package.module:function'")
        return value


TaskConfig = Annotated[
    SyntheticTask | TextClassificationTask | LanguageModelingTask | ImageClassificationTask | PythonTask,
    Field(discriminator="kind"),
]


#: ``task.kind`` -> its model
TASK_MODELS = {
    "synthetic": SyntheticTask,
    "text_classification": TextClassificationTask,
    "language_modeling": LanguageModelingTask,
    "image_classification": ImageClassificationTask,
    "python": PythonTask,
}
