"""The optimizer of a cell, built by name from its options (critbatch.jobs.cell.optimizers).

    optimizer = build_optimizer(cell, model)      # one object: param_groups, zero_grad, step, state_dict
    optimizer.split                               # Muon: which parameters each part updates (for cell.json)

The batch-size rules (``cell.rules``) are applied here, once, to the options at
the cell's batch size. The trainer sets every group's ``lr`` each step from the
schedule; a group's ``lr_scale`` (Muon's AdamW part) multiplies it.

Muon updates the hidden 2-D weight matrices only: the weights of ``nn.Linear``
layers, except the last one (the output head) and any weight an ``nn.Embedding``
shares (tied embeddings). Everything else (embeddings, head, norms, biases,
convolutions) goes to AdamW, as in the Muon write-up and modded-nanogpt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..cell.optimizers import scaled_optimizer
from ..cell.science import lsr_lr
from ..cell.spec import Cell
from .strategies import peak_lr


class Optimizers(torch.optim.Optimizer):
    """Several torch optimizers stepped as one: the groups of all, one state dict (a list of theirs)."""

    def __init__(self, parts: list[torch.optim.Optimizer]):  # noqa: D107 - no Optimizer.__init__: no own state
        self.parts = parts
        self.defaults: dict[str, Any] = {}
        self.state: dict = {}

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return [g for part in self.parts for g in part.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for part in self.parts:
            part.step()

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(state)


def muon_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names Muon updates, names AdamW updates) of the trainable parameters, in the model's order."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hidden = {id(m.weight) for m in linears[:-1]} - embedded
    muon, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if id(p) in hidden and p.ndim == 2 else other).append(name)
    return muon, other


def build_optimizer(cell: Cell, model: nn.Module, derived: dict | None = None) -> torch.optim.Optimizer:
    """The cell's optimizer over ``model``'s trainable parameters, its options rescaled by the cell's rules."""
    opt = cell.optimizer
    if cell.rules:
        opt = scaled_optimizer(opt, cell.rules, cell.batch_size / cell.base_batch, cell.base_lr, peak_lr(cell, derived))
    lr = cell.base_lr  # replaced every step by the schedule's
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "sgd":
        out = torch.optim.SGD(params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                              nesterov=opt.nesterov)
    elif opt.name in ("adamw", "adam"):
        kind = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
        out = kind(params, lr=lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay,
                   foreach=False)
    elif opt.name == "adafactor":
        out = torch.optim.Adafactor(params, lr=lr, beta2_decay=opt.beta2_decay, eps=(None, opt.eps), d=opt.d,
                                    weight_decay=opt.weight_decay, foreach=False)
    elif opt.name == "muon":
        muon_names, other_names = muon_split(model)
        named = dict(model.named_parameters())
        parts: list[torch.optim.Optimizer] = []
        if muon_names:
            parts.append(torch.optim.Muon([named[n] for n in muon_names], lr=lr, weight_decay=opt.weight_decay,
                                          momentum=opt.momentum, nesterov=opt.nesterov, ns_steps=opt.ns_steps,
                                          adjust_lr_fn=opt.adjust_lr))
        if other_names:
            a = opt.adamw
            parts.append(torch.optim.AdamW([named[n] for n in other_names], lr=lr, betas=(a.beta1, a.beta2),
                                           eps=a.eps, weight_decay=a.weight_decay, foreach=False))
            parts[-1].param_groups[0]["lr_scale"] = opt.adamw_lr_scale
        out = Optimizers(parts)
        out.split = {"muon": muon_names, "adamw": other_names}  # type: ignore[attr-defined]
    else:  # pragma: no cover - the spec's union lists the names
        raise ValueError(f"optimizer {opt.name!r}")
    out.options = opt  # type: ignore[attr-defined]  # the effective options, for the plan and cell.json
    return out


def probe_step(cell: Cell, derived: dict | None = None) -> float:
    """The step size of paper 4.2's linear-approximation error: SGD's LSR step eta_0 m / m0 (the paper's,
    critbatch.jobs.cell.science.lsr_lr) whatever its strategy, for the other optimizers the LR their strategy
    gives at m (the step is taken along the gradient either way)."""
    if cell.optimizer.name == "sgd":
        return lsr_lr(cell.base_lr, cell.batch_size, cell.base_batch)
    return peak_lr(cell, derived)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's rate for the next step: ``lr``, times the group's ``lr_scale`` where it has one."""
    for group in optimizer.param_groups:
        scale = group.get("lr_scale")
        group["lr"] = lr if scale is None else lr * scale
