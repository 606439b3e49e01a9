"""Evaluation of a cell's model: loss and task metric over a whole split, and paper 4.2's error.

Splits are evaluated in eval mode (BatchNorm on running statistics, no
dropout) and without gradients. With several ranks the batches are dealt
round-robin (batch i to rank i mod world) and the per-rank sums are
all-reduced, so every rank gets the same figures over the whole split.

Sums per task, accumulated on the device (one host sync per split):

    classification   loss * n,         correct predictions,  n
    language_model   loss * tokens,    -,                    tokens    (perplexity = exp(mean token loss))
    segmentation     loss * labelled,  confusion matrix,     labelled pixels (mIoU over classes present)
    regression       loss * n,         -,                    n         (metric ``none``, value NaN)
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ..data.datasets import TaskData
from ..models.zoo import IGNORE_INDEX, metric_name
from .distributed import Dist, all_reduce_sum_

LossFn = Callable[[Tensor, Tensor], Tensor]


class Evaluator:
    """The model's loss and task metric over the train subset and the test split, at a step of training."""

    def __init__(self, model: nn.Module, data: TaskData, loss_fn: LossFn, *, dist: Dist, micro_batch: int,
                 prepare: Callable[[Tensor], Tensor], autocast):
        self.model, self.data, self.loss_fn, self.dist = model, data, loss_fn, dist
        self.prepare, self.autocast = prepare, autocast
        # Dense tasks (a loss per pixel or token) at the training micro-batch (memory), others in 256 to 2048.
        dense = data.task in ("segmentation", "language_model")
        self.batch_size = max(1, micro_batch) if dense else max(256, min(micro_batch, 2048))

    def split(self, split: str) -> tuple[float, str, float]:
        """(mean loss, metric name, metric value) over ``split``: train (its evaluation subset) or test."""
        return evaluate(self.model, self.data.eval_batches(split, self.batch_size), self.data.task, self.loss_fn,
                        dist=self.dist, num_classes=self.data.num_classes, prepare=self.prepare,
                        autocast=self.autocast)

    def at(self, step: int, epoch: float) -> tuple[dict, list[dict]]:
        """Both splits at ``step``: the figures (``{split}_loss``, ``{split}_metric``) and the ``evals`` rows."""
        result: dict = {"step": step, "metric": metric_name(self.data.task)}
        rows = []
        for split in ("train", "test"):
            loss, metric, value = self.split(split)
            result[f"{split}_loss"], result[f"{split}_metric"] = loss, value
            rows.append({"step": step, "epoch": epoch, "split": split, "loss": loss, "metric": metric,
                         "value": value})
        return result, rows


def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], task: str, loss_fn: LossFn, *,
             dist: Dist, num_classes: int | None = None, prepare=None, autocast=None) -> tuple[float, str, float]:
    """(mean loss, metric name, metric value) of ``model`` over ``batches``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    classes = num_classes or 1
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, metric count, weight
    confusion = torch.zeros(classes * classes, dtype=torch.float64, device=device) if task == "segmentation" else None
    try:
        with torch.no_grad():
            for i, (x, y) in enumerate(batches):
                if i % dist.world != dist.rank:
                    continue
                if prepare is not None:
                    x = prepare(x)
                with autocast or nullcontext():
                    out = model(x)
                    loss = loss_fn(out, y).double()
                if task == "segmentation":
                    valid = y != IGNORE_INDEX
                    weight = valid.sum().double()
                    # An image with no labelled pixel has a NaN mean loss; it carries no weight.
                    sums[0] += torch.where(weight > 0, loss * weight, torch.zeros_like(loss))
                    pred = out.argmax(1)
                    confusion += torch.bincount(y[valid] * classes + pred[valid], minlength=classes * classes).double()
                elif task == "language_model":
                    weight = torch.tensor(float(y.numel()), dtype=torch.float64, device=device)
                    sums[0] += loss * weight
                else:
                    weight = torch.tensor(float(len(y)), dtype=torch.float64, device=device)
                    sums[0] += loss * weight
                    if task == "classification":
                        sums[1] += (out.argmax(1) == y).sum()
                sums[2] += weight
        all_reduce_sum_(sums, dist)
        if confusion is not None:
            all_reduce_sum_(confusion, dist)
    finally:
        model.train(was_training)
    loss_sum, correct, weight = sums.tolist()
    mean_loss = loss_sum / weight if weight > 0 else math.nan
    name = metric_name(task)
    if task == "classification":
        value = correct / weight if weight > 0 else math.nan
    elif task == "language_model":
        value = math.exp(mean_loss) if mean_loss < 700 else math.inf
    elif task == "segmentation":
        value = mean_iou(confusion.view(classes, classes))
    else:
        value = math.nan
    return mean_loss, name, value


def mean_iou(confusion: Tensor) -> float:
    """Mean over classes present (in labels or predictions) of tp / (tp + fp + fn); rows are labels."""
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    if not bool(present.any()):
        return math.nan
    return float((tp[present] / union[present]).mean())


def gradient_sq_norm(params: Iterable[nn.Parameter]) -> Tensor:
    """|g|^2 over every parameter's gradient, as a 0-dim device tensor (no host sync); summed in fp32 at least
    (``.float()`` is the tensor itself for fp32 gradients, so their figures are unchanged)."""
    grads = [p.grad.float() for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).double().pow(2)


def linear_approx_error(model: nn.Module, loss_at: Callable[[], float], gradient: Callable[[], None],
                        step_size: float) -> tuple[float, dict]:
    """Paper 4.2: |L(w) - (L(w*) + <g_m(w*), w - w*>)| at w = w* - step_size * g_m(w*).

    ``loss_at()`` evaluates L at the model's current weights; ``gradient()``
    leaves g_m(w*) in the parameters' ``.grad``. With w - w* = -step_size * g_m
    the inner product is -step_size * |g_m|^2. The weights are restored
    exactly (a copy, not a reverse step) before returning.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss_star = loss_at()
    for p in params:
        p.grad = None
    gradient()
    g_sq = float(gradient_sq_norm(params))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-step_size)
    try:
        loss_step = loss_at()
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        for p in params:
            p.grad = None
    linear = loss_star - step_size * g_sq
    details = {"loss_star": loss_star, "loss_step": loss_step, "grad_sq": g_sq, "step_size": step_size}
    return abs(loss_step - linear), details
