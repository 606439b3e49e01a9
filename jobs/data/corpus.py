"""The offline real-text corpus, ``pycorpus`` (torch-free: the catalog sizes it when a grid is checked).

The text of ``pydoc_data.topics`` (the language reference that ``help()`` shows, shipped with every
Python), its topics in sorted order, as UTF-8 bytes: token ids 0-255. The last tenth is the validation
split. critbatch.jobs.data.tokens streams it like any token file and records its SHA-256 in cell.json.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

VAL_SHARE = 0.1


@lru_cache(maxsize=1)
def pycorpus_bytes() -> bytes:
    """The offline corpus: ``pydoc_data.topics``'s texts in sorted topic order, UTF-8."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics)).encode("utf-8")


def pycorpus_split() -> tuple[np.ndarray, np.ndarray]:
    data = np.frombuffer(pycorpus_bytes(), dtype=np.uint8).astype(np.uint16)
    cut = int(len(data) * (1 - VAL_SHARE))
    return data[:cut], data[cut:]


def pycorpus_windows(seq_len: int) -> int:
    """Training windows in an epoch of pycorpus (the catalog's train size)."""
    return pycorpus_split()[0].shape[0] // seq_len
