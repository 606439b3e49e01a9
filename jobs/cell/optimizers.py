"""The optimizers a cell may name, each with its options, and the batch-size rules that rescale them.

    optimizer: {name: sgd, momentum: 0.9, weight_decay: 5e-4}            # the default, as in the paper
    optimizer: {name: adamw, beta1: 0.9, beta2: 0.95, weight_decay: 0.1}
    optimizer: {name: muon, momentum: 0.95, adamw: {beta2: 0.95}}        # Muon on hidden matrices, AdamW on the rest
    rules: [adam_sqrt]                                                   # beside strategy: srsr

Each optimizer is a strict pydantic model whose ``name`` picks it (a grid
without a name means ``sgd``); the trainer builds it (critbatch.jobs.train.
optimizers), the sizing counts its state (``state_copies``), the plan prints it.
An SGD cell's options are the four fields they always were, so its id is unchanged.

The rules (:data:`RULES`) rescale the optimizer's other hyperparameters with
the batch size, beside the learning-rate strategy (blr, lsr, srsr, ...); each
takes k = m / m0 and is one function below with its formula and source.
Torch-free, like the rest of the cell contract.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator

from .validation import NonNegativeFloat, PositiveFloat, Range, Strict, invalid

Beta = Annotated[float, Range(0, 1, high_open=True)]


class SGDOptions(Strict):
    """torch.optim.SGD: heavy-ball momentum (or Nesterov's), coupled L2 weight decay."""

    name: Literal["sgd"] = "sgd"
    momentum: Beta = 0.9
    weight_decay: NonNegativeFloat = 5e-4
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0)")

    @field_validator("nesterov")
    @classmethod
    def _needs_momentum(cls, nesterov: bool, info: ValidationInfo) -> bool:
        if nesterov and info.data.get("momentum") == 0:
            raise invalid("Nesterov momentum needs momentum > 0, got momentum 0")
        return nesterov

    def state_copies(self) -> int:
        """fp32 copies of the weights the optimizer keeps: the momentum buffer (none without momentum)."""
        return 1 if self.momentum > 0 else 0

    def describe(self) -> str:
        return f"SGD momentum {self.momentum}, weight decay {self.weight_decay}, nesterov {self.nesterov}"


class AdamWOptions(Strict):
    """torch.optim.AdamW: Adam with decoupled weight decay (Loshchilov and Hutter 2019)."""

    name: Literal["adamw"] = "adamw"
    beta1: Beta = Field(0.9, description="first-moment decay")
    beta2: Beta = Field(0.95, description="second-moment decay")
    eps: PositiveFloat = Field(1e-8, description="added to the root of the second moment")
    weight_decay: NonNegativeFloat = Field(0.1, description="decoupled: w <- w - lr * weight_decay * w")

    def state_copies(self) -> int:
        return 2  # first and second moments

    def describe(self) -> str:
        return f"AdamW betas ({self.beta1}, {self.beta2}), eps {self.eps:g}, decoupled weight decay {self.weight_decay}"


class AdamOptions(Strict):
    """torch.optim.Adam: weight decay coupled, as an L2 term added to the gradient."""

    name: Literal["adam"] = "adam"
    beta1: Beta = Field(0.9, description="first-moment decay")
    beta2: Beta = Field(0.999, description="second-moment decay")
    eps: PositiveFloat = Field(1e-8, description="added to the root of the second moment")
    weight_decay: NonNegativeFloat = Field(0.0, description="coupled L2: added to the gradient")

    def state_copies(self) -> int:
        return 2

    def describe(self) -> str:
        return f"Adam betas ({self.beta1}, {self.beta2}), eps {self.eps:g}, L2 weight decay {self.weight_decay}"


class AdafactorOptions(Strict):
    """torch.optim.Adafactor (Shazeer and Stern 2018): factored second moment, no first moment."""

    name: Literal["adafactor"] = "adafactor"
    beta2_decay: Annotated[float, Range(high=0)] = Field(
        -0.8, description="the second moment's decay is 1 - t^beta2_decay at step t")
    eps: PositiveFloat = Field(1e-3, description="relative step floor (torch's eps[1])")
    d: PositiveFloat = Field(1.0, description="clipping threshold of the update's RMS")
    weight_decay: NonNegativeFloat = Field(0.0, description="decoupled weight decay")

    def state_copies(self) -> int:
        return 0  # row and column factors only: a vanishing fraction of the weights

    def describe(self) -> str:
        return f"Adafactor beta2_decay {self.beta2_decay}, eps {self.eps:g}, d {self.d}, weight decay {self.weight_decay}"


class MuonOptions(Strict):
    """torch.optim.Muon (Jordan et al. 2024) on the hidden 2-D weight matrices, AdamW on every other parameter
    (embeddings, the output head, norms, biases), as the Muon write-up and modded-nanogpt split them."""

    name: Literal["muon"] = "muon"
    momentum: Beta = Field(0.95, description="Muon's momentum")
    nesterov: bool = Field(True, description="Nesterov momentum")
    ns_steps: Annotated[int, Range(1, 20)] = Field(5, description="Newton-Schulz iterations")
    weight_decay: NonNegativeFloat = Field(0.0, description="decoupled weight decay of the matrices")
    adjust_lr: Literal["original", "match_rms_adamw"] = Field(
        "match_rms_adamw", description="per-shape LR scaling: match_rms_adamw (0.2 sqrt(max(A, B)), the LR and weight "
        "decay of AdamW carry over) or original (sqrt(max(1, A/B)))")
    adamw: AdamWOptions = Field(default_factory=lambda: AdamWOptions(weight_decay=0.0),
                                description="the AdamW of the other parameters")
    adamw_lr_scale: PositiveFloat = Field(1.0, description="the AdamW parameters' LR as a multiple of the cell's")

    def state_copies(self) -> int:
        return 2  # at most: AdamW's two moments (Muon itself keeps one)

    def describe(self) -> str:
        return (f"Muon momentum {self.momentum}, nesterov {self.nesterov}, {self.ns_steps} Newton-Schulz steps, "
                f"weight decay {self.weight_decay}, LR adjusted {self.adjust_lr}; other parameters "
                f"{self.adamw.describe()}, LR x {self.adamw_lr_scale}")


def _tag(value: Any) -> str | None:
    """The optimizer's name; a mapping without one is SGD (the cells written before any other existed)."""
    if isinstance(value, dict):
        return value.get("name", "sgd")
    return getattr(value, "name", None)


#: Every optimizer's options, by name.
OPTIMIZERS: dict[str, type[Strict]] = {
    cls.model_fields["name"].default: cls
    for cls in (SGDOptions, AdamWOptions, AdamOptions, AdafactorOptions, MuonOptions)
}
OptimizerSpec = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in OPTIMIZERS.items())],  # type: ignore[misc]
    Discriminator(_tag, custom_error_type="optimizer_name",
                  custom_error_message=f"unknown optimizer; allowed: {', '.join(OPTIMIZERS)}"),
]


# ---- batch-size rules ------------------------------------------------------------------------------------

Rule = Literal["adam_sqrt", "beta2_halflife", "wd_timescale"]
#: The optimizers each rule applies to.
RULE_OPTIMIZERS: dict[str, tuple[str, ...]] = {
    "adam_sqrt": ("adam", "adamw"),
    "beta2_halflife": ("adam", "adamw", "muon"),
    "wd_timescale": ("sgd", "adam", "adamw", "muon", "adafactor"),
}


def adam_sqrt(beta1: float, beta2: float, eps: float, k: float) -> tuple[float, float, float]:
    """Malladi et al. 2022 (arXiv 2205.10287, the square-root scaling rule for adaptive methods, Def. 4.2):
    for a batch k times the base, (1 - beta1) x k, (1 - beta2) x k, eps / sqrt(k), with the LR x sqrt(k)
    (here the ``srsr`` strategy). Returns (beta1, beta2, eps) at k."""
    return 1.0 - (1.0 - beta1) * k, 1.0 - (1.0 - beta2) * k, eps / math.sqrt(k)


def beta2_halflife(beta2: float, k: float) -> float:
    """Marek et al. 2025 (arXiv 2507.07101): beta2(m) = beta2_0^(m / m0), so that the second moment's half-life
    ln(1/2) / ln(beta2) steps x m examples per step stays the same number of examples."""
    return beta2**k


def wd_timescale(weight_decay: float, k: float, base_lr: float, lr: float) -> float:
    """Bergsma et al. 2025 "Power Lines" (arXiv 2505.13738): the AdamW timescale tau = m / (eta lambda n_train)
    held at its base-batch value, so lambda(m) = lambda_0 x (m / m0) x (eta_0 / eta(m)) (n_train cancels)."""
    return weight_decay * k * base_lr / lr


def scaled_optimizer(options: Any, rules: tuple[str, ...] | list[str], k: float, base_lr: float, lr: float) -> Any:
    """The optimizer's options at batch m = k m0 after ``rules`` (``lr``: the cell's peak LR at m)."""
    if not rules:
        return options
    inner = options.adamw if options.name == "muon" else options
    update: dict[str, Any] = {}
    if "adam_sqrt" in rules:
        update["beta1"], update["beta2"], update["eps"] = adam_sqrt(inner.beta1, inner.beta2, inner.eps, k)
    if "beta2_halflife" in rules:
        update["beta2"] = beta2_halflife(inner.beta2, k)
    if options.name == "muon":
        outer = {"adamw": inner.model_copy(update=update)}
        if "wd_timescale" in rules:
            outer["weight_decay"] = wd_timescale(options.weight_decay, k, base_lr, lr)
            outer["adamw"] = outer["adamw"].model_copy(
                update={"weight_decay": wd_timescale(inner.weight_decay, k, base_lr, lr)})
        return options.model_copy(update=outer)
    if "wd_timescale" in rules:
        update["weight_decay"] = wd_timescale(options.weight_decay, k, base_lr, lr)
    return options.model_copy(update=update)


def rule_problems(options: Any, rules: list[str], strategy: str, k: float, path: str) -> list[str]:
    """What a cell's rules do not allow: an optimizer a rule does not apply to, two rules that set beta2, a rule's
    part missing, a scaled beta outside [0, 1)."""
    out = []
    for i, rule in enumerate(rules):
        if options.name not in RULE_OPTIMIZERS[rule]:
            out.append(f"{path}[{i}]: {rule!r} does not apply to optimizer {options.name!r}; it applies to "
                       f"{', '.join(RULE_OPTIMIZERS[rule])}")
    if len(set(rules)) != len(rules):
        out.append(f"{path}: a rule is listed twice ({', '.join(rules)})")
    if {"adam_sqrt", "beta2_halflife"} <= set(rules):
        out.append(f"{path}: adam_sqrt and beta2_halflife both set beta2; choose one")
    if "adam_sqrt" in rules and strategy != "srsr":
        out.append(f"{path}: adam_sqrt scales the LR by sqrt(k) through strategy 'srsr', got strategy {strategy!r}")
    if out or "adam_sqrt" not in rules:
        return out
    beta1, beta2, _ = adam_sqrt(options.beta1, options.beta2, options.eps, k)
    if min(beta1, beta2) < 0:
        out.append(f"{path}: adam_sqrt at k = {k:g} gives beta1 {beta1:.4g}, beta2 {beta2:.4g}; (1 - beta) x k must "
                   "stay below 1 (a smaller k, or betas nearer 1)")
    return out

