"""Tiny datasets written in each dataset's real on-disk format (what torchvision and the loaders read).

    write_dataset("cifar10", tmp_path / "cifar10")   # -> tmp_path/cifar10/cifar-10-batches-py/...

Every writer takes the torchvision root (the folder torchvision's class is given)
and returns it. Pixels and labels are seeded random numbers.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _idx(path: Path, array: np.ndarray) -> None:
    """The idx format: a big-endian magic (0, 0, type 0x08 = uint8, number of dims), the dims, the bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 96, n_test: int = 40, seed: int = 0) -> Path:
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return Path(root)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 40, seed: int = 0) -> Path:
    """Five training batches of ``per_batch`` rows of 3072 bytes (R plane, G plane, B plane) and a test batch."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        _pickle(folder / name, {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                "labels": rng.integers(0, 10, n).tolist(), "filenames": [f"{i}.png" for i in range(n)]})
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    return Path(root)


def write_cifar100(root: Path, n_train: int = 100, n_test: int = 40, seed: int = 0) -> Path:
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        _pickle(folder / name, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                "fine_labels": rng.integers(0, 100, n).tolist(),
                                "coarse_labels": rng.integers(0, 20, n).tolist()})
    _pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                              "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return Path(root)


def write_svhn(root: Path, n_train: int = 96, n_test: int = 40, n_extra: int = 0, seed: int = 0) -> Path:
    """MATLAB files with X (32, 32, 3, N) uint8 and y (N, 1) in 1..10 (10 is the digit 0)."""
    from scipy.io import savemat

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    for split, n in (("train", n_train), ("test", n_test), ("extra", n_extra)):
        if n:
            savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                  "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
    return root


def write_wikitext2(root: Path, lines: int = 200, words: int = 50, seed: int = 0) -> Path:
    """wiki.{train,valid,test}.tokens: headings, blank lines and sentences over a small vocabulary."""
    folder = Path(root) / "wikitext-2"
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    vocab = [f"w{i}" for i in range(words)] + ["<unk>", ".", ",", "@-@"]
    for split, n in (("train", lines), ("valid", lines // 4), ("test", lines // 4)):
        out = []
        for i in range(n):
            if i % 20 == 0:
                out += [" \n", f" = Heading {i} = \n", " \n"]
            out.append(" " + " ".join(rng.choice(vocab, rng.integers(5, 25))) + " \n")
        (folder / f"wiki.{split}.tokens").write_text("".join(out), encoding="utf-8")
    return Path(root)


#: Label ids used by the tiny Cityscapes files and the train id each maps to (255: ignored).
CITYSCAPES_IDS = {0: 255, 4: 255, 7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18}


def write_cityscapes(root: Path, n_train: int = 6, n_val: int = 3, size: tuple[int, int] = (64, 128),
                     seed: int = 0) -> Path:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png."""
    from PIL import Image

    root = Path(root)
    rng = _rng(seed)
    h, w = size
    ids = np.array(sorted(CITYSCAPES_IDS), dtype=np.uint8)
    for split, n, city in (("train", n_train, "aachen"), ("val", n_val, "frankfurt")):
        images = root / "leftImg8bit" / split / city
        labels = root / "gtFine" / split / city
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{stem}_leftImg8bit.png")
            # Blocks of 8x8 pixels share a label, so a downscale keeps whole regions.
            blocks = rng.choice(ids, (h // 8, w // 8))
            label = np.kron(blocks, np.ones((8, 8), dtype=np.uint8))
            Image.fromarray(label).save(labels / f"{stem}_gtFine_labelIds.png")
    return root


def write_tokens(root: Path, n_train: int = 5000, n_val: int = 2100, seed: int = 0) -> Path:
    """modded-nanogpt's FineWeb shards: a header of 256 int32 (magic 20240520, version 1, count), uint16 ids."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    for name, n in (("fineweb_train_000001.bin", n_train), ("fineweb_val_000000.bin", n_val)):
        header = np.zeros(256, dtype=np.int32)
        header[:3] = (20240520, 1, n)
        (root / name).write_bytes(header.tobytes() + rng.integers(0, 50257, n, dtype=np.uint16).tobytes())
    return root


WRITERS = {
    "mnist": write_mnist, "cifar10": write_cifar10, "cifar100": write_cifar100, "svhn": write_svhn,
    "wikitext2": write_wikitext2, "cityscapes": write_cityscapes, "tokens": write_tokens,
}


def write_dataset(name: str, root: Path, **kwargs) -> Path:
    return WRITERS[name](Path(root), **kwargs)
