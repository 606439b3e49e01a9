"""``wave-cnn``: a small 1-D CNN for signals of shape (C, L)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from critbatch.jobs.cell.plugins import DataShape, model_plugin


class WaveCNNOptions(BaseModel):
    """What a grid may set under ``model_options``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    width: int = Field(16, ge=1, description="channels of the first convolution (the second has twice as many)")


@model_plugin(tasks=["classification"], options=WaveCNNOptions)
def wave_cnn(shape: DataShape, options: WaveCNNOptions) -> nn.Module:
    """Two 1-D convolutions, global average pooling and a linear classifier."""
    channels, _length = shape.input_shape
    w = options.width
    return nn.Sequential(
        nn.Conv1d(channels, w, 7, padding=3), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(w, 2 * w, 5, padding=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * w, shape.num_classes),
    )
