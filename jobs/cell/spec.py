"""The cell: one point of a grid, frozen to JSON, content-addressed.

A cell holds every field that changes a training result (dataset, model,
strategy, batch size, seed, ...). Its id is a short hash of the canonical JSON
of those fields, so re-rendering a grid is byte-identical and a finished cell
(its ``_SUCCESS`` exists) is never trained twice. Resources, image and store
are not part of a cell: they change where it runs, not what it computes.

Validation names the offending field (its path) and the allowed values; every
problem is reported at once as one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError

# What each dataset is, how many training examples it has at 100 %, and which
# models fit it. Sizes are the standard train splits (SVHN ``extra`` adds
# 531,131 to the 73,257; WikiText-2's figure counts bptt-35 sequences of its
# 2,088,628 training tokens; ``digits`` keeps 80 % of scikit-learn's 1,797).
DATASETS: dict[str, dict[str, Any]] = {
    "mnist": {"task": "classification", "train_size": 60000, "classes": 10},
    "cifar10": {"task": "classification", "train_size": 50000, "classes": 10},
    "cifar100": {"task": "classification", "train_size": 50000, "classes": 100},
    "svhn": {"task": "classification", "train_size": 73257, "classes": 10},
    "wikitext2": {"task": "language_model", "train_size": 59675},
    "cityscapes": {"task": "segmentation", "train_size": 2975, "classes": 19},
    "digits": {"task": "classification", "train_size": 1437, "classes": 10},
    "linreg": {"task": "regression", "train_size": None},  # n, from options
}
SVHN_EXTRA_SIZE = 531131

IMAGE_MODELS = ("resnet34", "vgg16", "alexnet", "mobilenetv2")
MODELS: dict[str, tuple[str, ...]] = {
    **{m: ("mnist", "cifar10", "cifar100", "svhn") for m in IMAGE_MODELS},
    "lstm": ("wikitext2",),
    "drn_d_22": ("cityscapes",),
    "digits_cnn": ("digits",),
    "linear": ("linreg",),
}
STRATEGIES = ("blr", "lsr", "srsr", "longer", "oracle")
DECAYS = ("none", "step", "cosine")
OPTIMIZERS = ("sgd",)
PRECISIONS = ("fp32", "bf16")

#: Defaults of the known-answer problem (design section 7): 512 samples, 1024
#: features, four directions of variance 60 against 1.
LINREG_DEFAULTS: dict[str, Any] = {"n": 512, "d": 1024, "spikes": 4, "spike_var": 60.0}


@dataclass
class DatasetSpec:
    name: str
    fraction: float = 1.0  # fixed seeded subset of the training set, in (0, 1]
    max_train: int | None = None  # cap on training examples (the paper: 50k)
    extra: bool = False  # SVHN only: train + extra (the 600k study)
    options: dict[str, Any] = field(default_factory=dict)  # linreg: n, d, spikes, spike_var


@dataclass
class OptimizerSpec:
    name: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False


@dataclass
class EvalSpec:
    points: int = 200  # evaluations per cell, log-spaced in iterations
    train_subset: int | None = 10000  # examples of the train set used for train loss; None = all


@dataclass
class NoiseSpec:
    every: int = 10  # measure the gradient-noise statistics every N steps; 0 = off


@dataclass
class Cell:
    """One training run. Every field here changes the result."""

    dataset: DatasetSpec
    model: str
    strategy: str
    batch_size: int  # global batch m, across all ranks and micro-batches
    base_lr: float  # eta_0, tuned at base_batch
    base_batch: int  # m_0
    epochs: float  # E
    sweep: str = "default"  # names jobs and store prefixes; not part of the id
    warmup_epochs: float = 0.0  # W, for lsr
    decay: str = "none"
    seed: int = 0
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    accumulation: int = 1  # micro-batches per rank per step
    clip_grad: float | None = None  # max gradient norm (the LSTM uses 0.25)
    model_options: dict[str, Any] = field(default_factory=dict)
    max_steps: int | None = None  # hard cap on iterations (smoke runs, demos)
    precision: str = "fp32"

    # ---- identity -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def canonical_json(self) -> str:
        data = self.to_dict()
        data.pop("sweep")
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @property
    def id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:10]

    # ---- derived figures ------------------------------------------------
    @property
    def task(self) -> str:
        return DATASETS[self.dataset.name]["task"]

    def train_size(self) -> int | None:
        """Training examples the cell uses, or None when only the data knows."""
        info = DATASETS[self.dataset.name]
        size = info["train_size"]
        if self.dataset.name == "linreg":
            size = int({**LINREG_DEFAULTS, **self.dataset.options}["n"])
        if self.dataset.name == "svhn" and self.dataset.extra:
            size += SVHN_EXTRA_SIZE
        if size is None:
            return None
        if self.dataset.max_train is not None:
            size = min(size, self.dataset.max_train)
        return max(1, int(size * self.dataset.fraction))

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "cell") -> "Cell":
        problems: list[str] = []
        cell = build(cls, data, path, problems)
        if not problems:
            problems.extend(cell.problems(path))
        if problems:
            raise ConfigError(problems)
        return cell

    @classmethod
    def from_json(cls, text: str) -> "Cell":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"cell: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError("cell: must be a JSON object")
        # cell.json as written to the store carries provenance beside the fields.
        data = {k: v for k, v in data.items() if k not in CELL_JSON_EXTRAS}
        return cls.from_dict(data)

    def problems(self, path: str = "cell", world_size: int = 1) -> list[str]:
        """Every semantic problem of this cell, each naming its field."""
        out: list[str] = []
        ds = self.dataset
        if ds.name not in DATASETS:
            out.append(f"{path}.dataset.name: unknown dataset {ds.name!r}; allowed: {', '.join(DATASETS)}")
        if self.model not in MODELS:
            out.append(f"{path}.model: unknown model {self.model!r}; allowed: {', '.join(MODELS)}")
        elif ds.name in DATASETS and ds.name not in MODELS[self.model]:
            out.append(
                f"{path}.model: {self.model!r} does not fit dataset {ds.name!r}; "
                f"allowed for it: {', '.join(m for m, d in MODELS.items() if ds.name in d)}"
            )
        if self.strategy not in STRATEGIES:
            out.append(f"{path}.strategy: unknown strategy {self.strategy!r}; allowed: {', '.join(STRATEGIES)}")
        elif self.strategy == "oracle" and ds.name != "linreg":
            out.append(f"{path}.strategy: 'oracle' needs dataset 'linreg' (it is Ma et al.'s step for least squares)")
        if self.decay not in DECAYS:
            out.append(f"{path}.decay: unknown decay {self.decay!r}; allowed: {', '.join(DECAYS)}")
        if self.optimizer.name not in OPTIMIZERS:
            out.append(f"{path}.optimizer.name: unknown optimizer {self.optimizer.name!r}; allowed: {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            out.append(f"{path}.precision: {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if not (0.0 < ds.fraction <= 1.0):
            out.append(f"{path}.dataset.fraction: {ds.fraction} is outside (0, 1]")
        if ds.max_train is not None and ds.max_train < 1:
            out.append(f"{path}.dataset.max_train: must be a positive integer or null, got {ds.max_train}")
        if ds.extra and ds.name != "svhn":
            out.append(f"{path}.dataset.extra: only 'svhn' has an extra split")
        if ds.name == "linreg":
            unknown = set(ds.options) - set(LINREG_DEFAULTS)
            if unknown:
                out.append(f"{path}.dataset.options: unknown {sorted(unknown)}; allowed: {', '.join(LINREG_DEFAULTS)}")
        for name in ("batch_size", "base_batch", "accumulation"):
            value = getattr(self, name)
            if value < 1:
                out.append(f"{path}.{name}: must be a positive integer, got {value}")
        for name in ("base_lr", "epochs"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                out.append(f"{path}.{name}: must be a positive number, got {value}")
        if self.warmup_epochs < 0:
            out.append(f"{path}.warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if self.eval.points < 2:
            out.append(f"{path}.eval.points: must be at least 2, got {self.eval.points}")
        if self.noise.every < 0:
            out.append(f"{path}.noise.every: must be >= 0 (0 = off), got {self.noise.every}")
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"{path}.max_steps: must be a positive integer or null, got {self.max_steps}")
        if self.batch_size >= 1 and world_size >= 1:
            per = self.batch_size % (world_size * self.accumulation) if self.accumulation >= 1 else 0
            if per:
                out.append(
                    f"{path}.batch_size: {self.batch_size} is not divisible by world size {world_size} "
                    f"x accumulation {self.accumulation}"
                )
        if ds.name in DATASETS and not out:
            size = self.train_size()
            if size is not None and self.batch_size > size:
                out.append(f"{path}.batch_size: {self.batch_size} is larger than the training set ({size} examples)")
        return out


#: Keys cell.json carries beside the cell's own fields.
CELL_JSON_EXTRAS = ("id", "code_version", "derived", "created")


# ---- strict construction of dataclasses from plain data -------------------

def build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from ``data``; append problems (with paths) instead of raising.

    Unknown keys are errors; missing required keys are errors; scalar types are
    checked (an int is accepted where a float is asked for, a bool never is).
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        problems.append(f"{path}: must be a mapping, got {type(data).__name__}")
        return None
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            problems.append(f"{path}.{key}: unknown field; allowed: {', '.join(known)}")
    kwargs: dict[str, Any] = {}
    missing = False
    for name, f in known.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{path}.{name}: required field is missing")
                missing = True
            continue
        kwargs[name] = _coerce(hints[name], data[name], f"{path}.{name}", problems)
    if missing or any(v is _BAD for v in kwargs.values()):
        return _Invalid()
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - guarded by the checks above
        problems.append(f"{path}: {err}")
        return _Invalid()


class _Invalid:
    """Placeholder for a part that failed to build; never escapes build()."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


_BAD = object()


#: Scalar field types: what a value must be, and how the error names it. A bool is never an int or float.
_SCALARS: dict[type, tuple[Any, str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = get_origin(tp)
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, path, problems)
    if dataclasses.is_dataclass(tp):
        before = len(problems)
        built = build(tp, value, path, problems)
        return _BAD if len(problems) > before else built
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: must be a mapping, got {type(value).__name__}")
            return _BAD
        return dict(value)
    if tp in _SCALARS:
        accepts, wanted = _SCALARS[tp]
        if not accepts(value):
            problems.append(f"{path}: must be {wanted}, got {value!r}")
            return _BAD
        return float(value) if tp is float else value
    return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: must be an integer, got {value!r}")
            return _BAD
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: must be a number, got {value!r}")
            return _BAD
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: must be a string, got {value!r}")
            return _BAD
        return value
    return value
