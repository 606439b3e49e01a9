"""What a model or dataset plug-in declares: the torch-free half of the plug-in contract (docs/plugins.md).

A model is a :class:`ModelPlugin`: a factory ``(shape: DataShape, options) -> torch.nn.Module``, the
tasks it serves and the pydantic model of its options. A dataset is a :class:`DatasetPlugin`: a
factory ``(request: DataRequest, options) -> InMemory | Streamed`` (critbatch.jobs.data.plugin), the
task it poses, its options model and, where it is known without loading, its training-set size.
Declare one around its factory::

    @model_plugin(tasks=["classification"], options=WidthOptions)
    def build(shape, options): ...

or name the factory by its import path, so that validating a grid does not import it (nor torch)::

    WIDE = ModelPlugin("mypkg.models:build", tasks=("classification",), options=WidthOptions)

A grid names the declaration by import path (``model: mypkg.plugins:WIDE``) or by the short name an
installed package registers in the entry-point group ``critbatch.models`` / ``critbatch.datasets``
(critbatch.jobs.cell.registry). critbatch's own models and datasets are declared the same way
(jobs/models/catalog.py, jobs/data/catalog.py) and registered by its pyproject.toml.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel

from .logschema import TASK_METRIC
from .validation import Strict

#: The tasks a dataset may pose; each fixes the loss, the metric and the evaluation.
TASKS = tuple(TASK_METRIC)


class NoOptions(Strict):
    """A model or dataset without options."""


@dataclass(frozen=True)
class DataShape:
    """What a model factory learns about its data."""

    task: str
    input_shape: tuple[int, ...]  # one example's input, without the batch: (C, H, W), (C, L), (T,) token ids, (d,)
    num_classes: int | None = None  # classification and segmentation
    vocab_size: int | None = None  # language_model


@dataclass(frozen=True)
class DataRequest:
    """What a dataset factory is asked for: one cell's data, on one rank."""

    name: str  # the dataset as the grid names it
    root: Path  # a local folder for this dataset's files (to read, or to cache what it generates); may not exist
    data_root: str  # --data-root as given: a directory, or a store the paper's sets were staged to
    seed: int  # the cell's seed
    fraction: float  # a Streamed set keeps this fixed fraction of its training set (critbatch does it in memory)
    max_train: int | None  # ... and at most this many examples (applied before the fraction)
    extra: bool  # the grid asked for the set's extra training split
    eval_train_subset: int | None  # a Streamed set evaluates this many training examples (None: all)
    batch_size: int  # the global batch m
    rank: int  # this process's rank among ``world`` data-parallel ranks
    world: int
    download: bool  # --download: fetching missing files is allowed


def _first_line(text: str | None) -> str:
    return (text or "").strip().split("\n")[0].strip()


@dataclass(frozen=True)
class ModelPlugin:
    """A model factory and what it declares; calling it calls the factory."""

    factory: Callable[..., Any] | str  # (shape, options) -> nn.Module, or its import path "module:function"
    tasks: tuple[str, ...]
    options: type[BaseModel] = NoOptions
    datasets: tuple[str, ...] = ()  # only these datasets (the 32x32 image models); empty: any set of its tasks
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "datasets", tuple(self.datasets))

    def __call__(self, shape: DataShape, options: Any) -> Any:
        return load_factory(self.factory)(shape, options)


@dataclass(frozen=True)
class DatasetPlugin:
    """A dataset factory and what it declares; calling it calls the factory."""

    factory: Callable[..., Any] | str  # (request, options) -> InMemory | Streamed, or its import path
    task: str
    options: type[BaseModel] = NoOptions
    #: Training examples at 100 %, known without loading (checks batch sizes before anything runs):
    #: a number, a function of the effective options, or None when only the data knows.
    train_size: int | Callable[[Any], int] | None = None
    classes: int | None = None  # classification and segmentation classes, where known without loading
    extra_size: int | None = None  # examples ``dataset.extra: true`` adds (SVHN's extra split); None: none
    description: str = ""

    def __call__(self, request: DataRequest, options: Any) -> Any:
        return load_factory(self.factory)(request, options)


def model_plugin(*, tasks: Iterable[str], options: type[BaseModel] = NoOptions, datasets: Iterable[str] = (),
                 description: str | None = None) -> Callable[[Callable[..., Any]], ModelPlugin]:
    """Declare the decorated function ``(shape, options) -> nn.Module`` a model plug-in."""
    def declare(factory: Callable[..., Any]) -> ModelPlugin:
        return ModelPlugin(factory, tuple(tasks), options, tuple(datasets),
                           _first_line(factory.__doc__) if description is None else description)
    return declare


def dataset_plugin(*, task: str, options: type[BaseModel] = NoOptions,
                   train_size: int | Callable[[Any], int] | None = None, classes: int | None = None,
                   description: str | None = None) -> Callable[[Callable[..., Any]], DatasetPlugin]:
    """Declare the decorated function ``(request, options) -> InMemory | Streamed`` a dataset plug-in."""
    def declare(factory: Callable[..., Any]) -> DatasetPlugin:
        return DatasetPlugin(factory, task, options, train_size, classes,
                             description=_first_line(factory.__doc__) if description is None else description)
    return declare


class PluginError(ValueError):
    """A plug-in that cannot be used, in one line without the field's path (the caller adds it)."""


def load_factory(factory: Callable[..., Any] | str) -> Callable[..., Any]:
    """The factory itself: a callable as it is, an import path ``module:attribute`` imported."""
    return factory if callable(factory) else import_object(factory)


def import_object(path: str) -> Any:
    """The object at ``module:attribute`` (dots in the attribute walk into it); PluginError saying what failed."""
    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            raise PluginError(f"cannot import {module!r}: {err}") from None
        raise PluginError(f"importing {module!r} raised ModuleNotFoundError: {err}") from None
    except Exception as err:  # noqa: BLE001 - whatever a plug-in's module raises is reported, in one line
        raise PluginError(f"importing {module!r} raised {type(err).__name__}: {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
