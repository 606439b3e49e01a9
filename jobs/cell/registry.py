"""Finding models and datasets: the entry points of installed packages, or an import path.

    resolve("model", "resnet34")                # a name in the entry-point group critbatch.models
    resolve("dataset", "mypkg.plugins:WAVES")   # an import path module:attribute
    critbatch plugins                           # every name installed, with its package and options

A grid names a model or dataset either way. A short name is looked up among
the entry points of the groups ``critbatch.models`` and ``critbatch.datasets``
(importlib.metadata, as pytest and timm find their plug-ins); critbatch
registers its own there too (pyproject.toml), so a built-in and a plug-in are
found, validated and built by the same code. What a name resolves to is a
declaration (critbatch.jobs.cell.plugins): loading one imports only its
module, and built-in declarations import no torch; a factory named by its
import path is imported when the cell is built.

Every problem is a :class:`PluginError` of one line (the caller puts the
field's path in front). Results, failures too, are kept per name and
``sys.path``, so a grid of many cells imports each plug-in once.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict
from pydantic_core import core_schema

from .inputs import shown
from .plugins import TASKS, DatasetPlugin, ModelPlugin, PluginError, import_object, load_factory
from .validation import invalid

#: The entry-point group of each kind of plug-in.
GROUPS = {"model": "critbatch.models", "dataset": "critbatch.datasets"}
#: The distribution whose entry points are the built-ins.
OWN = "critbatch"
#: ``module.sub:attribute``: how a grid names a plug-in that no package registers.
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: How each kind's factory is called, for messages.
SIGNATURE = {"model": "(shape, options) -> torch.nn.Module", "dataset": "(request, options) -> InMemory | Streamed"}
_DECLARATION = {"model": ModelPlugin, "dataset": DatasetPlugin}
_DECORATOR = {"model": "@model_plugin(tasks=[...], options=...)", "dataset": "@dataset_plugin(task=..., options=...)"}


@dataclass(frozen=True)
class Resolved:
    """A name and what it resolved to: the declaration, with the package that provides it."""

    kind: str
    name: str
    plugin: Any  # ModelPlugin | DatasetPlugin
    options: type[BaseModel]  # the declared options model, unknown keys forbidden
    distribution: str | None  # None: a module on sys.path that no installed package owns
    version: str | None
    origin: str  # "entry point" | "import path"

    @property
    def builtin(self) -> bool:
        return self.distribution == OWN

    def factory(self) -> Callable[..., Any]:
        """The factory, imported if the declaration names it by path, with its signature checked."""
        factory = load_factory(self.plugin.factory)
        _check_signature(self.kind, self.name, factory)
        return factory

    def record(self) -> dict[str, Any]:
        """What cell.json keeps of a plug-in beside the code version: which package, which version."""
        return {"name": self.name, "distribution": self.distribution, "version": self.version, "origin": self.origin}


def resolve(kind: str, name: str) -> Resolved:
    """What ``name`` names among the ``kind`` ("model" or "dataset") plug-ins; PluginError if it cannot be used."""
    found = _resolve(kind, name, tuple(sys.path))
    if isinstance(found, PluginError):
        raise found
    return found


def names(kind: str, builtin: bool | None = None) -> list[str]:
    """The registered names of ``kind``, critbatch's first (``builtin``: only those; False: only the others)."""
    eps = _entry_points(kind, tuple(sys.path))
    own = [n for n, found in eps.items() if found[0].dist is not None and found[0].dist.name == OWN]
    other = [n for n in eps if n not in own]
    return own if builtin else other if builtin is False else own + other


def unknown(kind: str, name: str) -> str:
    """The message for a name nothing registers: the names that are, and the import-path form."""
    hint = "" if names(kind, builtin=True) else (
        f" (no {kind} of critbatch itself is registered: install it with pip install -e . and remove any stale "
        f"critbatch.egg-info on sys.path, whose metadata hides the installed one)")
    return (f"unknown {kind} {shown(name)}; allowed: {', '.join(names(kind))}, or the import path module:attribute "
            f"of a {_DECLARATION[kind].__name__}{hint}")


@lru_cache(maxsize=None)
def _entry_points(kind: str, path: tuple[str, ...]) -> dict[str, list[metadata.EntryPoint]]:
    """Entry points of ``kind``'s group by name, as installed on ``path`` (one distribution per name, the first)."""
    out: dict[str, list[metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=GROUPS[kind]):
        out.setdefault(ep.name, []).append(ep)
    # critbatch's own first (its order is its pyproject's), then the others by name.
    def order(item: tuple[str, list[metadata.EntryPoint]]) -> tuple[bool, str]:
        dist = item[1][0].dist
        own = dist is not None and dist.name == OWN
        return (not own, "" if own else item[0])

    return dict(sorted(out.items(), key=order))


@lru_cache(maxsize=None)
def _resolve(kind: str, name: str, path: tuple[str, ...]) -> Resolved | PluginError:
    try:
        if IMPORT_PATH.match(name):
            obj = import_object(name)
            dist, version, origin = (*_owner(name.partition(":")[0]), "import path")
        else:
            obj, dist, version = _load_entry_point(kind, name, path)
            origin = "entry point"
        plugin = _check_declaration(kind, name, obj)
        if callable(plugin.factory):
            _check_signature(kind, name, plugin.factory)
        return Resolved(kind, name, plugin, _strict_options(plugin.options), dist, version, origin)
    except PluginError as err:
        return err


def _load_entry_point(kind: str, name: str, path: tuple[str, ...]) -> tuple[Any, str | None, str | None]:
    found = _entry_points(kind, path).get(name)
    if not found:
        raise PluginError(unknown(kind, name))
    if len(found) > 1:
        owners = ", ".join(f"{ep.dist.name} {ep.dist.version} ({ep.value})" for ep in found if ep.dist)
        raise PluginError(f"{kind} {name!r} is registered by more than one package: {owners}; "
                          f"name the one meant by its import path")
    ep = found[0]
    dist, version = (ep.dist.name, ep.dist.version) if ep.dist is not None else (None, None)
    try:
        return ep.load(), dist, version
    except Exception as err:  # noqa: BLE001 - an entry point that raises is reported, in one line
        raise PluginError(f"entry point {name!r} of {dist} {version} ({ep.value}) raised "
                          f"{type(err).__name__}: {err}") from None


def _owner(module: str) -> tuple[str | None, str | None]:
    """The installed distribution that provides ``module``'s top-level package, and its version."""
    for dist in metadata.packages_distributions().get(module.split(".")[0], []):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None, None


def _check_declaration(kind: str, name: str, obj: Any) -> Any:
    """``obj`` if it is a well-formed declaration of ``kind``; PluginError saying what it is instead."""
    wanted = _DECLARATION[kind]
    if not isinstance(obj, wanted):
        other = next((k for k, cls in _DECLARATION.items() if isinstance(obj, cls)), None)
        if other is not None:
            raise PluginError(f"{name!r} is a {other} plug-in, not a {kind}")
        what = "a function" if inspect.isfunction(obj) else f"a {type(obj).__name__}"
        raise PluginError(f"{name!r} is {what}, not a {wanted.__name__}; declare its factory {SIGNATURE[kind]} "
                          f"with {_DECORATOR[kind]} (docs/plugins.md)")
    tasks = obj.tasks if kind == "model" else (obj.task,)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise PluginError(f"{name!r} declares task{'s' if kind == 'model' else ''} {list(tasks)!r}; "
                          f"allowed: {', '.join(TASKS)}")
    if not (isinstance(obj.options, type) and issubclass(obj.options, BaseModel)):
        raise PluginError(f"{name!r} declares options {obj.options!r}; expected a pydantic model class")
    if not (callable(obj.factory) or (isinstance(obj.factory, str) and IMPORT_PATH.match(obj.factory))):
        raise PluginError(f"{name!r} declares factory {obj.factory!r}; expected a function or its import path "
                          f"module:function")
    return obj


def _check_signature(kind: str, name: str, factory: Callable[..., Any]) -> None:
    """The factory takes two positional arguments (and needs no more); PluginError otherwise."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # a builtin without a signature: trust it
    try:
        signature.bind(None, None)
    except TypeError:
        shown = getattr(factory, "__qualname__", repr(factory))
        raise PluginError(f"the factory of {name!r} has the wrong signature {shown}{signature}; expected "
                          f"{shown}{SIGNATURE[kind]}") from None


def _strict_options(model: type[BaseModel]) -> type[BaseModel]:
    """``model``, with unknown keys forbidden if it does not forbid them already: an option the plug-in
    does not declare is an error, as for the built-ins."""
    if model.model_config.get("extra") == "forbid":
        return model
    return type(model.__name__, (model,), {"model_config": ConfigDict(extra="forbid"), "__doc__": model.__doc__,
                                           "__module__": model.__module__})


def fits(model: ModelPlugin, dataset: str, task: str) -> bool:
    """Whether ``model`` can train on ``dataset`` (a set posing ``task``): it serves the task, and the
    dataset is among those it is built for when it names any."""
    return task in model.tasks and (not model.datasets or dataset in model.datasets)


@dataclass(frozen=True)
class Registered:
    """A field that names a ``kind`` plug-in (a registered name or an import path), resolved when validated.

    The JSON Schema lists critbatch's own names and the import-path form: the short names other
    packages register differ from one machine to the next, so the committed schema cannot hold them
    (``critbatch cells`` checks them).
    """

    kind: str

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict:
        return {"anyOf": [{"enum": names(self.kind, builtin=True)},
                          {"type": "string", "pattern": IMPORT_PATH.pattern}]}

    def _check(self, name: str) -> str:
        try:
            resolve(self.kind, name)
        except PluginError as err:
            raise invalid(str(err)) from None
        return name


class Table(Mapping):
    """The facts of every usable registered ``kind`` (iterating) and of any name that resolves (looking up):
    for code that reads many names at once, such as a per-model memory estimate."""

    def __init__(self, kind: str, facts: Callable[[Resolved], Any]):
        self.kind, self._facts = kind, facts

    def __getitem__(self, name: str) -> Any:
        try:
            return self._facts(resolve(self.kind, name))
        except PluginError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._usable())

    def __len__(self) -> int:
        return len(self._usable())

    def _usable(self) -> list[str]:
        out = []
        for name in names(self.kind):
            try:
                resolve(self.kind, name)
            except PluginError:
                continue
            out.append(name)
        return out


def _dataset_facts(found: Resolved) -> dict[str, Any]:
    p = found.plugin
    return {"task": p.task, "train_size": p.train_size if isinstance(p.train_size, int) else None,
            "classes": p.classes}


def _model_facts(found: Resolved) -> tuple[str, ...]:
    return tuple(d for d, facts in DATASETS.items() if fits(found.plugin, d, facts["task"]))


#: Every dataset's task, training-set size (None when options decide it) and classes.
DATASETS = Table("dataset", _dataset_facts)
#: Every model's registered datasets it fits.
MODELS = Table("model", _model_facts)


# ---- `critbatch plugins` --------------------------------------------------------------------------------


def describe(found: Resolved) -> dict[str, str]:
    """One row of ``critbatch plugins``: the name, its package, what it serves, its options and description."""
    p = found.plugin
    serves = ", ".join(p.tasks) if found.kind == "model" else p.task
    if found.kind == "model" and p.datasets:
        serves += f" ({', '.join(p.datasets)})"
    options = ", ".join(f"{n}={f.default!r}" if not f.is_required() else n
                        for n, f in found.options.model_fields.items()) or "none"
    package = f"{found.distribution} {found.version}" if found.distribution else "(not installed)"
    return {"name": found.name, "package": package, "serves": serves, "options": options,
            "description": p.description.rstrip(".")}


def third_party_line() -> str:
    """One line naming the plug-ins other packages installed, or '' when there are none."""
    parts = [f"{kind}s {', '.join(found)}" for kind in GROUPS if (found := names(kind, builtin=False))]
    return f"plug-ins installed: {'; '.join(parts)} (critbatch plugins lists them)" if parts else ""


def cli_plugins(args: Any) -> int:
    """``critbatch plugins``: every model and dataset installed (critbatch's and other packages'), one per line."""
    for kind, group in GROUPS.items():
        print(f"{kind}s (entry-point group {group}):")
        rows = []
        for name in names(kind):
            try:
                rows.append(describe(resolve(kind, name)))
            except PluginError as err:
                rows.append({"name": name, "package": "-", "serves": "unusable", "options": "",
                             "description": str(err)})
        widths = {k: max(len(r[k]) for r in rows) for k in ("name", "package", "serves")} if rows else {}
        for r in rows:
            what = "; ".join(part for part in (r["description"], r["options"] and f"options: {r['options']}") if part)
            print(f"  {r['name']:<{widths['name']}}  {r['package']:<{widths['package']}}  "
                  f"{r['serves']:<{widths['serves']}}  {what}")
    return 0
