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
import math
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

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


Fraction = Annotated[float, Range(0, 1, low_open=True, high_open=True)]


class KeepSpec(Strict):
    """Checkpoints that outlive the run, for branches to start from (docs/branches.md): at fractions of the
    cell's total steps (``at``: step = round(at x total), at least 1) and at steps (``steps``). Each must fall
    before the last step and on a step of its own; ``_SUCCESS`` lists those the run reached (``kept``)."""

    at: list[Fraction] = Field(default_factory=list, description="fractions of the cell's total steps, in (0, 1)")
    steps: list[PositiveInt] = Field(default_factory=list, description="steps (updates made), before the last")

    @field_validator("at", "steps")
    @classmethod
    def _once_each(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise invalid(f"a point is listed twice ({', '.join(f'{v:g}' for v in values)})")
        return sorted(values)  # one id for one set of points

    @model_validator(mode="after")
    def _points(self) -> "KeepSpec":
        if not self.at and not self.steps:
            raise invalid("give at least one point: at (fractions of the run) or steps")
        return self


class BranchLength(Strict):
    """How long a branch trains: ``examples`` (or ``tokens``), the same for every multiplier of one point, so
    their losses compare; a multiple of each branch's batch (its steps are length / (k x B))."""

    examples: PositiveInt | None = Field(None, description="training examples after the branch point")
    tokens: PositiveFloat | None = Field(None, description="training tokens after the branch point (token datasets)")

    @model_validator(mode="after")
    def _one_unit(self) -> "BranchLength":
        given = [n for n in ("examples", "tokens") if getattr(self, n) is not None]
        if len(given) != 1:
            raise invalid(f"give exactly one of examples, tokens; got {', '.join(given) or 'none'}")
        return self


#: The LR rule of a branch at k = multiplier, as the strategy that computes it (train.strategies.peak_lr):
#: linear eta_t x k (SGD), sqrt eta_t x sqrt(k) (Adam), oracle Ma et al.'s eta*(k B) (linreg).
BRANCH_RULES = {"linear": "lsr", "sqrt": "srsr", "oracle": "oracle"}


class BranchSpec(Strict):
    """This cell continues its base from one of the base's kept checkpoints (Merrill et al. 2025, "Critical
    Batch Size Revisited", arXiv 2505.23971): the weights, the optimizer state and the data position of the
    base at step t, then ``length`` more examples at ``multiplier`` x the base's batch, at a constant LR: the
    base's rate at t scaled by ``rule``. The base is this cell with batch_size / multiplier and without branch
    (its id is ``base``); both live in the same sweep."""

    base: Annotated[str, Matches(r"^[0-9a-f]{10}$", "a cell id (10 hex digits)")] = Field(
        description="the base cell's id")
    at: Fraction | None = Field(None, description="the branch point: one of the base's keep.at fractions")
    step: PositiveInt | None = Field(None, description="the branch point: one of the base's keep.steps")
    multiplier: PositiveInt = Field(description="k: this cell's batch is k x the base's")
    rule: Literal["linear", "sqrt", "oracle"] = Field(
        description="the LR at k: linear eta_t x k, sqrt eta_t x sqrt(k), oracle m / (beta + (m - 1) lambda_1)")
    length: BranchLength
    seed: int = Field(description="the data order after t: the base's seed continues the base's order exactly; "
                      "another reshuffles the examples the base has not seen in its epoch, then seeds the epochs")
    base_accumulation: PositiveInt = Field(1, description="the base's accumulation (its id records it; the "
                                           "branch's own may differ); part of the id only when not 1")
    base_micro_batch: PositiveInt | None = Field(None, description="the base's micro_batch, where its id records "
                                                 "it; part of the id only when set")

    @model_validator(mode="after")
    def _one_point(self) -> "BranchSpec":
        if (self.at is None) == (self.step is None):
            raise invalid(f"give the branch point as exactly one of at, step; got "
                          f"{'both' if self.at is not None else 'neither'}")
        return self

    @property
    def point(self) -> str:
        """The branch point as written: ``at 0.2`` or ``step 120``."""
        return f"at {self.at:g}" if self.at is not None else f"step {self.step}"


class RampPhase(Strict):
    """From ``epoch`` on (0-based, until the next phase), every update takes ``batch`` examples."""

    epoch: NonNegativeInt = Field(description="the first epoch at this batch (the first phase's: 0)")
    batch: PositiveInt = Field(description="the global batch from that epoch on: a multiple of the cell's "
                               "batch_size B (the first phase's: B)")


class RampSpec(Strict):
    """A batch-size schedule (Merrill et al. 2025, arXiv 2505.23971: a warm-up of the batch following the critical
    batch size over training; docs/ramp.md): the batch changes at epoch boundaries, each epoch whole batches of
    its size, grown by accumulating micro-batches of B's size. An update at batch k x B runs at the cell's rate at
    the same point of the data (its step at B) scaled by ``rule`` (``BRANCH_RULES``, as a branch's)."""

    rule: Literal["linear", "sqrt", "oracle"] = Field(
        description="the LR at k x B: linear eta x k, sqrt eta x sqrt(k), oracle eta x eta*(k B) / eta*(B) "
        "(linreg)")
    phases: list[RampPhase] = Field(min_length=1, description="the batches from epochs on, in order: the first "
                                    "from epoch 0 at batch_size, batches nondecreasing multiples of it")


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
    keep: KeepSpec | None = Field(None, description="checkpoints kept after the run, for branches; part of the id "
                                  "only when set")
    branch: BranchSpec | None = Field(None, description="continue a base cell from one of its kept checkpoints at "
                                      "a multiple of its batch; part of the id only when set (a grid writes it "
                                      "through its branch block)")
    ramp: RampSpec | None = Field(None, description="a batch-size schedule: the batch grows at epoch boundaries "
                                  "(docs/ramp.md); part of the id only when set")

    # ---- identity -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data; the optional ones (``stop``, ``micro_batch``, ``sync_bn``, ``tokens``,
        ``rules``, ``warmup``, ``wsd``, ``keep``, ``branch``, ``ramp``) only when set, so a cell without them keeps
        the id it always had."""
        data = self.model_dump()
        for name, unset in (("stop", None), ("micro_batch", None), ("sync_bn", False), ("tokens", None),
                            ("epochs", None), ("rules", []), ("warmup", None), ("wsd", None), ("keep", None),
                            ("branch", None), ("ramp", None)):
            if data[name] is None if unset is None else data[name] == unset:
                del data[name]
        if "branch" in data:
            for name, unset in (("base_accumulation", 1), ("base_micro_batch", None)):
                if data["branch"][name] == unset:
                    del data["branch"][name]
            data["branch"]["length"] = {k: v for k, v in data["branch"]["length"].items() if v is not None}
            data["branch"] = {k: v for k, v in data["branch"].items() if v is not None or k not in ("at", "step")}
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

    def base_cell(self) -> "Cell":
        """A branch's base: this cell at batch_size / multiplier, without branch (its id is ``branch.base``)."""
        if self.branch is None:
            raise ValueError(f"cell {self.id} is not a branch")
        b = self.branch
        return self.model_copy(update={"batch_size": self.batch_size // b.multiplier, "branch": None,
                                       "accumulation": b.base_accumulation, "micro_batch": b.base_micro_batch})

    def keep_points(self, total: int) -> list[tuple[float | None, int]]:
        """The kept checkpoints as (fraction or None, step) in ``keep`` order, for a run of ``total`` steps. A
        branch keeps none: its ``keep`` is its base's (a branch holds its base's fields)."""
        if self.keep is None or self.branch is not None:
            return []
        return [(f, keep_step(f, total)) for f in self.keep.at] + [(None, s) for s in self.keep.steps]

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
        if self.branch is not None:
            out.extend(self._branch_problems(path))
        if self.ramp is not None:
            out.extend(self._ramp_problems(path))
        if out:
            return out
        size = self.train_size()
        out.extend(self._budget_problems(path, max(1, size // self.batch_size) if size else None))
        if out:
            return out
        if size is not None and self.batch_size > size:
            out.append(f"{path}.batch_size: {self.batch_size} is larger than the training set ({size} examples)")
        elif size is not None and self.branch is None:
            out.extend(self._keep_problems(path, total_steps(self, max(1, size // self.batch_size))))
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

    def _keep_problems(self, path: str, total: int) -> list[str]:
        """Kept checkpoints that do not fall before the last of ``total`` steps, or two on one step."""
        out: list[str] = []
        first: dict[int, str] = {}
        names = [f"keep.at[{i}]" for i in range(len(self.keep.at))] if self.keep else []
        names += [f"keep.steps[{i}]" for i in range(len(self.keep.steps))] if self.keep else []
        for name, (fraction, step) in zip(names, self.keep_points(total)):
            point = f"{fraction:g} of {total} steps is step {step}" if fraction is not None else f"step {step}"
            if step >= total:
                out.append(f"{path}.{name}: {point}, not before the run's last step ({total}); allowed: points "
                           f"before it")
            elif step in first:
                out.append(f"{path}.{name}: {point}, as {first[step]} is; allowed: one point per step")
            else:
                first[step] = name
        return out

    def _branch_problems(self, path: str) -> list[str]:
        """A branch that does not fit its base: the multiplier, the base's id and keep points, the rule, the
        length (a multiple of the batch, so every multiplier trains on the same examples)."""
        b, m = self.branch, self.batch_size
        out: list[str] = []
        if self.stop is not None:
            out.append(f"{path}.stop: a branch trains for its length; it takes no stop threshold")
        if b.rule == "oracle" and self.dataset.name != "linreg":
            out.append(f"{path}.branch.rule: 'oracle' needs dataset 'linreg' (Ma et al.'s step for least squares); "
                       "allowed: linear, sqrt")
        if b.length.examples is not None and b.length.examples % m:
            out.append(f"{path}.branch.length.examples: {b.length.examples} is not a multiple of the batch {m} "
                       f"({b.multiplier} x {m // b.multiplier if m % b.multiplier == 0 else '?'}); allowed: "
                       f"multiples of {m}, e.g. {max(1, round(b.length.examples / m)) * m}")
        if b.length.tokens is not None:
            seq = self.tokens_per_example()
            if seq is None:
                out.append(f"{path}.branch.length.tokens: {self.dataset.name!r} counts examples; give examples")
            elif b.length.tokens % (m * seq):
                out.append(f"{path}.branch.length.tokens: {b.length.tokens:g} is not a multiple of the batch's "
                           f"{m * seq} tokens ({m} x seq_len {seq}); allowed: multiples of {m * seq}")
        if m % b.multiplier:
            out.append(f"{path}.batch_size: {m} is not branch.multiplier {b.multiplier} x a base batch")
            return out
        base = self.base_cell()
        if base.id != b.base:
            out.append(f"{path}.branch.base: {b.base} is not the id of this cell's base (the cell at batch_size "
                       f"{base.batch_size} without branch), which is {base.id}")
        elif base.keep is None:
            out.append(f"{path}.branch: the base cell {base.id} keeps no checkpoints; give it keep: {{at: [...]}}")
        elif b.at is not None and b.at not in base.keep.at:
            out.append(f"{path}.branch.at: {b.at:g} is not a kept point of the base cell {base.id}; allowed: "
                       f"{', '.join(f'{f:g}' for f in base.keep.at) or 'none (it keeps steps)'}")
        elif b.step is not None and b.step not in base.keep.steps:
            out.append(f"{path}.branch.step: {b.step} is not a kept step of the base cell {base.id}; allowed: "
                       f"{', '.join(map(str, base.keep.steps)) or 'none (it keeps fractions)'}")
        return out

    def _ramp_problems(self, path: str) -> list[str]:
        """A ramp that does not fit the cell: phases from epoch 0 at batch_size, later ones at nondecreasing
        multiples of it, each starting inside the budget; and what a changing batch does not go with."""
        r, m, where = self.ramp, self.batch_size, f"{path}.ramp"
        out: list[str] = []
        for name, why in (("branch", "a branch trains at one batch"), ("keep", "kept checkpoints are for branches, "
                          "which start from a run at one batch"), ("tokens", "the batch changes at epoch "
                          "boundaries; give epochs"), ("rules", "the rules scale other hyperparameters for "
                          "batch_size alone")):
            if getattr(self, name):
                out.append(f"{where}: a ramp does not go with {name} ({why}); allowed: ramp or {name}")
        if self.tokens_per_example() is not None:
            out.append(f"{where}: {self.dataset.name!r} is a token stream, which has no epochs to change the batch "
                       "at; allowed: datasets held in memory")
        if self.noise.every > 0:
            out.append(f"{path}.noise.every: {self.noise.every}, but the noise probe measures at one batch; allowed "
                       "with a ramp: 0")
        if self.strategy == "longer":
            out.append(f"{path}.strategy: 'longer' holds the budget in iterations at one batch; allowed with a "
                       "ramp: blr, lsr, srsr, oracle")
        if r.rule == "oracle" and self.dataset.name != "linreg":
            out.append(f"{where}.rule: 'oracle' needs dataset 'linreg' (Ma et al.'s step for least squares); "
                       "allowed: linear, sqrt")
        first = r.phases[0]
        if first.epoch != 0:
            out.append(f"{where}.phases[0].epoch: {first.epoch}; allowed: 0 (the first phase starts the run)")
        if first.batch != m:
            out.append(f"{where}.phases[0].batch: {first.batch}; allowed: the cell's batch_size {m} (the anchor "
                       "of the LR and of the micro-batch)")
        for i, (before, phase) in enumerate(zip(r.phases, r.phases[1:]), start=1):
            name = f"{where}.phases[{i}]"
            if phase.epoch <= before.epoch:
                out.append(f"{name}.epoch: {phase.epoch} does not follow phases[{i - 1}].epoch {before.epoch}; "
                           f"allowed: epochs in increasing order, above {before.epoch}")
            if phase.batch % m:
                out.append(f"{name}.batch: {phase.batch} is not a multiple of batch_size {m}; allowed: multiples "
                           f"of {m}, e.g. {max(1, round(phase.batch / m)) * m}")
            elif phase.batch < before.batch:
                out.append(f"{name}.batch: {phase.batch} is smaller than phases[{i - 1}].batch {before.batch}; "
                           f"allowed: {before.batch} or more (a ramp does not shrink the batch)")
        if self.epochs is not None:
            for i, phase in enumerate(r.phases[1:], start=1):
                if phase.epoch >= self.epochs:
                    out.append(f"{where}.phases[{i}].epoch: {phase.epoch} is not inside the budget of "
                               f"{self.epochs:g} epochs; allowed: 1 to {math.ceil(self.epochs) - 1}")
        size = self.train_size()
        if size is not None:
            for i, phase in enumerate(r.phases):
                if phase.batch > size:
                    out.append(f"{where}.phases[{i}].batch: {phase.batch} is larger than the training set ({size} "
                               "examples)")
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
        if self.strategy != "lsr" or self.branch is not None:  # a branch runs at one rate, without warm-up
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


def keep_step(fraction: float, total: int) -> int:
    """The step of a kept checkpoint at ``fraction`` of a run of ``total`` steps: round(fraction x total), >= 1."""
    return max(1, round(fraction * total))


def branch_start(cell: Cell, n_train: int) -> int:
    """A branch's point t: the base's step whose kept checkpoint it starts from (``n_train``: the examples the
    base trains on, which its step budget depends on)."""
    base, b = cell.base_cell(), cell.branch
    if b.step is not None:
        return b.step
    return keep_step(b.at, total_steps(base, max(1, n_train // base.batch_size)))


def total_steps(cell: Cell, steps_per_epoch: int, batch_size: int | None = None) -> int:
    """Updates of the cell: E epochs, or T tokens / (m x seq_len) (``longer``: x m / m_0), capped by ``max_steps``;
    at least 1. A branch's: its length over its batch (neither the budget nor ``max_steps`` of its base).

    ``batch_size``: count them for this m instead of the cell's (the base batch's budget anchors the eval grid).
    """
    if cell.branch is not None:
        return max(1, round(uncapped_steps(cell, steps_per_epoch)))
    total = uncapped_steps(cell, steps_per_epoch, batch_size)
    if cell.max_steps is not None:
        total = min(total, cell.max_steps)
    return max(1, round(total))


def uncapped_steps(cell: Cell, steps_per_epoch: int, batch_size: int | None = None) -> float:
    """The updates the cell's budget (epochs or tokens) implies, before ``max_steps`` caps them (a float: it may
    be huge)."""
    m = cell.batch_size if batch_size is None else batch_size
    if cell.branch is not None:
        length = cell.branch.length
        return length.examples / m if length.examples is not None else \
            length.tokens / (m * (cell.tokens_per_example() or 1))
    longer = m / cell.base_batch if cell.strategy == "longer" else 1.0
    if cell.tokens is not None:
        return cell.tokens * longer / (m * (cell.tokens_per_example() or 1))
    return cell.epochs * longer * steps_per_epoch
