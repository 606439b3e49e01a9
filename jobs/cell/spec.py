"""The cell: one point of a grid, frozen to JSON, content-addressed.

A cell holds every field that changes a training result (dataset, model,
strategy, batch size, seed, ...). Its id is a short hash of the canonical JSON
of those fields, so re-rendering a grid is byte-identical and a finished cell
(its ``_SUCCESS`` exists) is never trained twice. Resources, image and store
are not part of a cell: they change where it runs, not what it computes.

The specs are strict pydantic models (:mod:`.validation`): each field checks
its own type, range or choices, and :meth:`Cell.problems` what only fields
together show (a model that does not fit its dataset, options the dataset does
not take, a batch larger than the training set). Every problem is reported at
once as one :class:`ConfigError`, each naming its field's path and the allowed
values. A cell's dataset and model are names the registry resolves (a built-in,
an installed plug-in or an import path; critbatch.jobs.cell.registry), whose
declarations say what fits together; :data:`DATASETS` and :data:`MODELS` hold
the facts of every installed one.
"""

from __future__ import annotations

import copy
import hashlib
import json
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from .errors import ConfigError
from .inputs import json_object
from .layout import SWEEP_NAME
from .optimizers import OptimizerSpec, Rule, SGDOptions, rule_problems
from .options import dataset_options, model_options, option_problems
from .registry import DATASETS, MODELS, Registered, fits, resolve
from .validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    Matches,
    Strict,
    error_lines,
    invalid,
)

Strategy = Literal["blr", "lsr", "srsr", "longer", "oracle"]
Decay = Literal["none", "step", "cosine", "wsd", "linear"]


class DatasetSpec(Strict):
    name: Annotated[str, Registered("dataset")] = Field(
        description="a dataset's name (`critbatch plugins` lists those installed) or the import path "
        "module:attribute of a DatasetPlugin")
    fraction: Annotated[float, Range(0, 1, low_open=True)] = Field(
        1.0, description="fixed seeded subset of the training set, in (0, 1]")
    max_train: PositiveInt | None = Field(None, description="cap on training examples (the paper: 50k)")
    extra: bool = Field(False, description="SVHN only: train + extra (the 600k study)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="the dataset's options (augment; cityscapes: size; linreg: n, d, spikes, "
        "spike_var; mnist1d: num_samples; a plug-in's: `critbatch plugins`)")


class WarmupSpec(Strict):
    """A linear warm-up from 0 to the peak LR, for any strategy: over ``steps`` updates, or over as many as
    ``examples`` (or ``tokens``) take at the cell's batch size (rounded, at least 1)."""

    steps: PositiveInt | None = Field(None, description="warm-up length in updates")
    examples: PositiveInt | None = Field(None, description="warm-up length in training examples")
    tokens: PositiveFloat | None = Field(None, description="warm-up length in tokens (token datasets)")

    @model_validator(mode="after")
    def _one_unit(self) -> "WarmupSpec":
        given = [n for n in ("steps", "examples", "tokens") if getattr(self, n) is not None]
        if len(given) != 1:
            raise invalid(f"give exactly one of steps, examples, tokens; got {', '.join(given) or 'none'}")
        return self


class WsdSpec(Strict):
    """Warm-up, stable, decay (Hu et al. 2024, MiniCPM): the peak until the last ``decay_fraction`` of the
    updates, then down to ``final`` x peak, linearly or as 1 - sqrt (Hägele et al. 2024)."""

    decay_fraction: Annotated[float, Range(0, 1, low_open=True)] = Field(
        0.2, description="the fraction of the updates spent decaying")
    shape: Literal["linear", "1-sqrt"] = Field("linear", description="the decay's shape")
    final: Annotated[float, Range(0, 1)] = Field(0.0, description="the LR at the end, as a fraction of the peak")


class EvalSpec(Strict):
    points: Annotated[int, Range(2)] = Field(200, description="evaluations per cell, log-spaced in iterations")
    train_subset: PositiveInt | None = Field(
        10000, description="examples of the train set used for the train loss; null = all")


class NoiseSpec(Strict):
    every: NonNegativeInt = Field(10, description="measure the gradient-noise statistics every N steps; 0 = off")


class StopSpec(Strict):
    """Stop at the threshold (jobs/train/stop.py): end the run once the train-split loss has crossed ``threshold``
    and stayed at or below it over the confirmation window; ``_SUCCESS`` then says ``reached`` and gives k.

    The window after the evaluation s that first reaches eps is w = max(confirm_evals, ceil(confirm * s))
    steps, checked by ``confirm_evals`` evaluations spread evenly over it (only those); one above eps voids
    it, and the next evaluation at or below eps opens a new one. k stays the first crossing (the analysis's k(m; eps)).
    """

    threshold: PositiveFloat = Field(description="eps: the train-split loss at which the cell may stop")
    confirm: Annotated[float, Range(0, 4, low_open=True)] = Field(
        0.25, description="the confirmation window as a fraction of the steps to the crossing")
    confirm_evals: Annotated[int, Range(1, 20)] = Field(3, description="evaluations inside the window")
    expect: PositiveInt | None = Field(
        None, description="the step the crossing is expected at: evaluations 4x denser from expect/2 to 2 expect")


class Cell(Strict):
    """One training run. Every field here changes the result (``sweep`` excepted: it names, it is not hashed).

    Frozen: the id and the JSON are computed once, on first use.
    """

    dataset: DatasetSpec
    model: Annotated[str, Registered("model")] = Field(
        description="a model's name (`critbatch plugins` lists those installed) or the import path "
        "module:attribute of a ModelPlugin")
    strategy: Strategy
    batch_size: PositiveInt = Field(description="global batch m, across all ranks and micro-batches")
    base_lr: PositiveFloat = Field(description="eta_0, tuned at base_batch")
    base_batch: PositiveInt = Field(description="m_0")
    epochs: PositiveFloat | None = Field(None, description="E, the budget in epochs (or give tokens)")
    tokens: PositiveFloat | None = Field(
        None, description="the budget in tokens (token datasets: steps = tokens / (m x seq_len)); part of the id "
        "only when set")
    sweep: Annotated[str, Matches(SWEEP_NAME, "a DNS-1123 label (lower-case letters, digits and '-', starting and "
                                  "ending with a letter or digit)", max_length=63)] = Field(
        "default", description="names jobs and store prefixes; not part of the id")
    warmup_epochs: NonNegativeFloat = Field(0.0, description="W, for lsr")
    decay: Decay = "none"
    wsd: WsdSpec | None = Field(None, description="decay wsd's options (defaults when unset); part of the id only "
                                "when set")
    warmup: WarmupSpec | None = Field(None, description="a linear warm-up from 0 for any strategy; part of the id "
                                      "only when set")
    seed: int = 0
    optimizer: OptimizerSpec = Field(default_factory=SGDOptions, description="the optimizer and its options, "
                                     "by name: sgd, adamw, adam, adafactor, muon")
    rules: list[Rule] = Field(default_factory=list, description="batch-size rules for the optimizer's other "
                              "hyperparameters, beside the LR strategy; part of the id only when listed")
    eval: EvalSpec = Field(default_factory=EvalSpec)
    noise: NoiseSpec = Field(default_factory=NoiseSpec)
    accumulation: PositiveInt = Field(1, description="micro-batches per rank per step (default: the sizing's)")
    micro_batch: PositiveInt | None = Field(
        None, description="examples of one forward pass on one device (default: the sizing's). BatchNorm "
        "normalises over it, so a BatchNorm cell on several devices records it; part of the id only when set")
    sync_bn: bool = Field(False, description="BatchNorm statistics over every device's micro-batch "
                          "(torch.nn.SyncBatchNorm; GPUs only); part of the id only when true")
    clip_grad: PositiveFloat | None = Field(None, description="max gradient norm (the LSTM uses 0.25)")
    model_options: dict[str, Any] = Field(default_factory=dict, description="the model's options")
    max_steps: PositiveInt | None = Field(None, description="hard cap on iterations (smoke runs, demos)")
    precision: Literal["fp32", "bf16"] = "fp32"
    stop: StopSpec | None = Field(None, description="stop once the training loss has crossed a threshold; "
                                  "part of the id only when set")

    # ---- identity -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data; the optional ones (``stop``, ``micro_batch``, ``sync_bn``, ``tokens``,
        ``rules``, ``warmup``, ``wsd``) only when set, so a cell without them keeps the id it always had."""
        data = self.model_dump()
        for name, unset in (("stop", None), ("micro_batch", None), ("sync_bn", False), ("tokens", None),
                            ("epochs", None), ("rules", []), ("warmup", None), ("wsd", None)):
            if data[name] is None if unset is None else data[name] == unset:
                del data[name]
        return data

    @cached_property
    def _json(self) -> tuple[str, str]:
        data = self.to_dict()
        full = json.dumps(data, sort_keys=True, separators=(",", ":"))
        del data["sweep"]
        return full, json.dumps(data, sort_keys=True, separators=(",", ":"))

    def to_json(self) -> str:
        """The cell's JSON with sorted keys, sweep included: the ``--cell`` argument of ``critbatch train``."""
        return self._json[0]

    def canonical_json(self) -> str:
        """What the id hashes: the JSON without ``sweep``, sorted keys, floats as floats (epochs 5 -> 5.0)."""
        return self._json[1]

    @cached_property
    def id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:10]

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> "Cell":
        """A copy with ``update`` applied, validated again, so it never carries the original's id or JSON."""
        data = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**(copy.deepcopy(data) if deep else data), **(update or {})})

    # ---- derived figures ------------------------------------------------
    @property
    def task(self) -> str:
        return resolve("dataset", self.dataset.name).plugin.task

    def tokens_per_example(self) -> int | None:
        """Tokens of one training example (a token dataset's ``seq_len``), or None when examples are not text."""
        try:
            return getattr(dataset_options(self.dataset), "seq_len", None)
        except ConfigError:
            return None

    def train_size(self) -> int | None:
        """Training examples the cell uses, or None when only the data knows."""
        data = resolve("dataset", self.dataset.name).plugin
        size = data.train_size(dataset_options(self.dataset)) if callable(data.train_size) else data.train_size
        if size is None:
            return None
        if self.dataset.extra:
            size += data.extra_size or 0
        if self.dataset.max_train is not None:
            size = min(size, self.dataset.max_train)
        return max(1, int(size * self.dataset.fraction))

    def plugins(self) -> dict[str, dict[str, Any]]:
        """The models and datasets of other packages this cell uses, by kind, with their package and version:
        what cell.json records beside the code version (critbatch's own are that version)."""
        out = {}
        for kind, name in (("dataset", self.dataset.name), ("model", self.model)):
            found = resolve(kind, name)
            if not found.builtin:
                out[kind] = found.record()
        return out

    # ---- validation -----------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, path: str = "cell") -> "Cell":
        """A cell from plain data; ConfigError with every problem, each naming its field under ``path``."""
        try:
            cell = cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(error_lines(err, path, cls)) from None
        found = cell.problems(path, world_size=None)  # the trainer checks its world size itself
        if found:
            raise ConfigError(found)
        return cell

    @classmethod
    def from_json(cls, text: str, path: str = "cell") -> "Cell":
        """A cell from its JSON (a cell.json from the store too: its provenance beside the fields is left out)."""
        data = json_object(text, path)
        return cls.from_dict({k: v for k, v in data.items() if k not in CELL_JSON_EXTRAS}, path)

    def problems(self, path: str = "cell", world_size: int | None = 1) -> list[str]:
        """The problems no single field shows (fields that do not fit together, or this world size).

        ``world_size`` None: not yet known (a grid checks its cells before sizing them), so the batch
        arithmetic is left to the sizing.
        """
        out: list[str] = []
        ds = self.dataset
        model, data = resolve("model", self.model).plugin, resolve("dataset", ds.name).plugin
        if not fits(model, ds.name, data.task):
            why = (f"it serves {', '.join(model.tasks)}, the dataset is {data.task}" if data.task not in model.tasks
                   else f"it is built for {', '.join(model.datasets)}")
            allowed = [m for m in MODELS if fits(resolve("model", m).plugin, ds.name, data.task)]
            out.append(f"{path}.model: {self.model!r} does not fit dataset {ds.name!r} ({why}); "
                       f"allowed for it: {', '.join(allowed) or 'none registered'}")
        if self.strategy == "oracle" and ds.name != "linreg":
            out.append(f"{path}.strategy: 'oracle' needs dataset 'linreg' (it is Ma et al.'s step for least squares)")
        if ds.extra and data.extra_size is None:
            with_extra = [d for d in DATASETS if resolve("dataset", d).plugin.extra_size]
            out.append(f"{path}.dataset.extra: {ds.name!r} has no extra split; datasets with one: "
                       f"{', '.join(with_extra)}")
        out.extend(option_problems("dataset", ds.name, ds.options, f"{path}.dataset.options"))
        out.extend(option_problems("model", self.model, self.model_options, f"{path}.model_options"))
        if world_size is not None and self.batch_size % (world_size * self.accumulation):
            out.append(f"{path}.batch_size: {self.batch_size} is not divisible by world size {world_size} "
                       f"x accumulation {self.accumulation}")
        elif world_size is not None and self.micro_batch is not None and \
                self.micro_batch * world_size * self.accumulation != self.batch_size:
            out.append(f"{path}.micro_batch: {self.micro_batch} x world size {world_size} x accumulation "
                       f"{self.accumulation} is not the batch size {self.batch_size}: the cell was sized for "
                       f"{self.batch_size // (self.micro_batch * self.accumulation)} devices (`critbatch cells` "
                       "prints each cell's plan)")
        if (self.epochs is None) == (self.tokens is None):
            out.append(f"{path}.epochs: give the budget as exactly one of epochs, tokens; got "
                       f"{'both' if self.epochs is not None else 'neither'}")
        elif self.tokens is not None and self.tokens_per_example() is None:
            out.append(f"{path}.tokens: a budget in tokens needs a token dataset (one with seq_len); "
                       f"{ds.name!r} counts examples: give epochs")
        if self.warmup is not None and self.warmup.tokens is not None and self.tokens_per_example() is None:
            out.append(f"{path}.warmup.tokens: {ds.name!r} is not a token dataset; give steps or examples")
        if self.warmup is not None and self.strategy == "lsr" and self.warmup_epochs > 0:
            out.append(f"{path}.warmup: lsr already warms up over warmup_epochs ({self.warmup_epochs}); give one")
        if self.wsd is not None and self.decay != "wsd":
            out.append(f"{path}.wsd: options of the wsd decay, but decay is {self.decay!r}")
        context = getattr(_model_options_or_none(self.model, self.model_options), "seq_len", None)
        if context is not None and (self.tokens_per_example() or 0) > context:
            out.append(f"{path}.model_options.seq_len: {context} is shorter than the dataset's examples "
                       f"({self.tokens_per_example()} tokens); allowed: {self.tokens_per_example()} or more")
        out.extend(rule_problems(self.optimizer, self.rules, self.strategy, self.batch_size / self.base_batch,
                                 f"{path}.rules"))
        if out:
            return out
        size = self.train_size()
        out.extend(self._budget_problems(path, max(1, size // self.batch_size) if size else None))
        if out:
            return out
        if size is not None and self.batch_size > size:
            out.append(f"{path}.batch_size: {self.batch_size} is larger than the training set ({size} examples)")
        elif size is not None:
            # The evaluation grid spans the base batch's budget and each cell keeps its own part of it
            # (train.strategies.eval_steps): more points than either run has steps merge into the same
            # iterations, and a huge count only spins the grid's loop. The default fits every run.
            steps = max(total_steps(self, max(1, size // self.batch_size)),
                        total_steps(self, max(1, size // self.base_batch), batch_size=self.base_batch))
            limit = max(steps + 1, EvalSpec.model_fields["points"].default)
            if self.eval.points > limit:
                out.append(f"{path}.eval.points: {self.eval.points} evaluations for a run of {steps} steps; "
                           f"allowed: 2 to {limit}")
        return out

    def _budget_problems(self, path: str, steps_per_epoch: int | None) -> list[str]:
        """A budget the run cannot finish (more than MAX_STEPS updates), and a warm-up longer than the run
        (counted in steps where the training set's size is known, else in epochs)."""
        out = []
        spe = steps_per_epoch or 1  # unknown: at least one step per epoch
        steps = uncapped_steps(self, spe)
        if self.max_steps is None and steps > MAX_STEPS:
            budget = "tokens" if self.tokens is not None else "epochs"
            unit = budget if self.strategy != "longer" else f"{budget} (x batch_size / base_batch for longer)"
            more = "" if steps_per_epoch else " or more"
            out.append(f"{path}.{budget}: {getattr(self, budget):g} {unit} imply {steps:.3g} steps{more}; "
                       f"allowed: at most {MAX_STEPS:.0e} steps (or set max_steps)")
            return out
        if self.strategy != "lsr":
            return out
        if steps_per_epoch is None:
            if self.epochs is not None and self.warmup_epochs > self.epochs:
                out.append(f"{path}.warmup_epochs: a warm-up of {self.warmup_epochs} epochs is longer than the run "
                           f"({self.epochs} epochs); allowed: 0 to {self.epochs}")
            return out
        total, warm = total_steps(self, spe), round(self.warmup_epochs * spe)
        if warm > total:
            capped = f", capped by max_steps {self.max_steps}" if total == self.max_steps else ""
            out.append(f"{path}.warmup_epochs: a warm-up of {self.warmup_epochs} epochs ({warm} steps) is longer "
                       f"than the run ({total} steps{capped}); allowed: 0 to {total / spe:g} epochs")
        return out


#: The most updates a cell may take: a budget past it cannot finish (a typo such as epochs 1e12), and the
#: trainer counts steps and samples in 64-bit integers.
MAX_STEPS = 10**9

def _model_options_or_none(model: str, options: dict[str, Any]) -> Any:
    try:
        return model_options(model, options)
    except ConfigError:
        return None  # reported by option_problems


#: Keys cell.json carries beside the cell's own fields.
CELL_JSON_EXTRAS = ("id", "code_version", "plugins", "derived", "created")


def total_steps(cell: Cell, steps_per_epoch: int, batch_size: int | None = None) -> int:
    """Updates of the cell: E epochs, or T tokens / (m x seq_len) (``longer``: x m / m_0), capped by ``max_steps``;
    at least 1.

    ``batch_size``: count them for this m instead of the cell's (the base batch's budget anchors the eval grid).
    """
    total = uncapped_steps(cell, steps_per_epoch, batch_size)
    if cell.max_steps is not None:
        total = min(total, cell.max_steps)
    return max(1, round(total))


def uncapped_steps(cell: Cell, steps_per_epoch: int, batch_size: int | None = None) -> float:
    """The updates the cell's budget (epochs or tokens) implies, before ``max_steps`` caps them (a float: it may
    be huge)."""
    m = cell.batch_size if batch_size is None else batch_size
    longer = m / cell.base_batch if cell.strategy == "longer" else 1.0
    if cell.tokens is not None:
        return cell.tokens * longer / (m * (cell.tokens_per_example() or 1))
    return cell.epochs * longer * steps_per_epoch
