"""A rank's random-number generators: seeded per rank, saved in and restored from checkpoints.

Data order and augmentation draw from their own seeded generators (the data
loader's); what remains on the global ones is dropout and the like, which is
why the seed is offset by rank.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..data.datasets import mix_seed


def seed_rngs(seed: int, rank: int, *extra: Any) -> None:
    """Seed torch, NumPy and Python's generators from the cell's seed, the rank and ``extra``."""
    mixed = mix_seed("train", seed, rank, *extra)
    torch.manual_seed(mixed)
    np.random.seed(mixed % 2**32)
    random.seed(mixed)


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
