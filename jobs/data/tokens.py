"""Token data for language models: nanoGPT's .bin files, modded-nanogpt's FineWeb shards, and an offline corpus.

    dataset: {name: tokens, options: {seq_len: 1024, format: nanogpt}}    # <data-root>/tokens/{train,val}.bin
    dataset: {name: tokens, options: {format: fineweb}}                   # <data-root>/tokens/fineweb_{train,val}_*.bin
    dataset: {name: pycorpus, options: {seq_len: 64}}                     # built in: bytes of Python's own docs

Formats (both uint16 token ids, read through ``np.memmap``, never loaded whole):

    nanogpt   train.bin / val.bin: the ids, nothing else (nanoGPT's data/*/prepare.py)
    fineweb   *_train_*.bin / *_val_*.bin shards: a header of 256 int32 (magic 20240520, version 1,
              the shard's token count), then the ids; the shards of a split are read in name order as one

Training windows (nanoGPT's ``get_batch``): the global batch after ``step`` updates is m windows of
seq_len + 1 tokens at offsets drawn uniformly by a generator seeded with (seed, step); x is a window's
first seq_len tokens, y the same shifted by one. A rank takes its rows of each global batch, so the
sequence of batches depends neither on the world size nor on where a run was resumed: the stream's state
is the step alone. An epoch is n_train_tokens // seq_len windows (the unit of ``epochs`` budgets).

``dataset.max_train`` and ``dataset.fraction`` keep a prefix of the training tokens, counted in windows as
the in-memory sets count examples: k = int(min(n_train_tokens // seq_len, max_train) x fraction) (at least 1)
windows' worth, the first k x seq_len + 1 tokens (the last window's targets included). Every training and
train-split evaluation window then lies inside them, and an epoch is k windows; the validation split is kept
whole. A prefix, not a random subset, so the kept text stays whole documents; with the defaults (1.0, null)
nothing is cut.

Evaluation windows are fixed: ``eval.train_subset`` of them from the (kept) training tokens (offsets from the
generator seeded by "eval"), and up to as many non-overlapping ones from the start of the validation tokens.

``pycorpus`` is the offline real-text set every machine with Python has: the text of ``pydoc_data.topics``
(the language reference that ``help()`` shows), its topics in sorted order, as UTF-8 bytes (vocabulary 256);
the last tenth is the validation split. Its SHA-256 is recorded in cell.json (``derived.corpus_sha256``): a
different Python release ships a different text, and the hash says so.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from ..cell.errors import ConfigError
from ..cell.plugins import DataRequest
from .corpus import pycorpus_bytes, pycorpus_split
from .datasets import _is_store_url as is_store_url
from .datasets import fetch_staged, mix_seed, subset_size
from .plugin import Streamed

FINEWEB_MAGIC = 20240520
HEADER_INTS = 256


class Tokens:
    """A split's token ids: one or more uint16 arrays (memmaps) read as one sequence."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.n = int(self.starts[-1])

    def prefix(self, n: int) -> "Tokens":
        """The first ``n`` ids (across shard boundaries)."""
        return Tokens([part[:max(0, n - int(start))] for part, start in zip(self.parts, self.starts)])

    def window(self, start: int, length: int) -> np.ndarray:
        """``length`` ids from ``start`` (across shard boundaries)."""
        out, pos, need = [], start, length
        i = int(np.searchsorted(self.starts, pos, side="right")) - 1
        while need:
            part = self.parts[i]
            lo = pos - int(self.starts[i])
            chunk = part[lo:lo + need]
            out.append(chunk)
            need -= len(chunk)
            pos += len(chunk)
            i += 1
        return np.concatenate(out) if len(out) > 1 else out[0]

    def windows(self, offsets: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
        """(x, y) int64 (len(offsets), seq_len) from windows of seq_len + 1 ids at ``offsets``."""
        rows = np.stack([self.window(int(o), seq_len + 1).astype(np.int64) for o in offsets])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def read_nanogpt(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=np.uint16, mode="r")


def read_fineweb(path: Path) -> np.ndarray:
    """A FineWeb shard: the 256-int32 header checked, then its uint16 ids."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != FINEWEB_MAGIC or header[1] != 1:
        raise ConfigError(f"cell.dataset: {path} is not a FineWeb shard (header magic {FINEWEB_MAGIC}, version 1)")
    count = int(header[2])
    ids = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4)
    if len(ids) < count:
        raise ConfigError(f"cell.dataset: {path} holds {len(ids)} tokens, its header says {count}")
    return ids[:count]


def write_fineweb(path: Path, ids: np.ndarray) -> None:
    """A FineWeb shard of ``ids`` (what modded-nanogpt's data scripts write)."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (FINEWEB_MAGIC, 1, len(ids))
    with open(path, "wb") as fh:
        fh.write(header.tobytes())
        fh.write(np.asarray(ids, dtype=np.uint16).tobytes())


def read_splits(root: Path, fmt: str) -> tuple[Tokens, Tokens]:
    """(train, val) token ids under ``root`` in format ``fmt``; ConfigError naming what is missing."""
    if fmt == "nanogpt":
        paths = {s: [root / f"{s}.bin"] for s in ("train", "val")}
        reader = read_nanogpt
    else:
        paths = {s: sorted(root.glob(f"*_{s}_*.bin")) for s in ("train", "val")}
        reader = read_fineweb
    missing = [f"{s}: {', '.join(map(str, p)) or f'{root}/*_{s}_*.bin'}" for s, p in paths.items()
               if not p or not all(x.is_file() for x in p)]
    if missing:
        raise ConfigError(f"cell.dataset: token files not found ({'; '.join(missing)}); put them under "
                          f"<data-root>/tokens or stage them (critbatch data stage tokens --from DIR)")
    return Tokens([reader(p) for p in paths["train"]]), Tokens([reader(p) for p in paths["val"]])


class WindowStream:
    """This rank's rows of each global batch of random windows; its state is the number of batches given."""

    def __init__(self, tokens: Tokens, seq_len: int, seed: int, batch: int, rank: int, world: int):
        if tokens.n < seq_len + 1:
            raise ConfigError(f"cell.dataset.options.seq_len: {seq_len} needs at least {seq_len + 1} training "
                              f"tokens, the set has {tokens.n}")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.batch, self.rows, self.rank = batch, batch // world, rank
        self.step = 0

    def offsets(self, step: int) -> Tensor:
        """The global batch's window offsets after ``step`` batches: from the generator seeded by (seed, step)."""
        gen = torch.Generator().manual_seed(mix_seed("tokens", self.seed, step))
        return torch.randint(0, self.tokens.n - self.seq_len, (self.batch,), generator=gen)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            mine = self.offsets(self.step)[self.rank * self.rows:(self.rank + 1) * self.rows]
            self.step += 1
            yield self.tokens.windows(mine, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def kept(train: Tokens, seq_len: int, fraction: float, max_train: int | None) -> Tokens:
    """The training tokens ``max_train`` and ``fraction`` keep (module docstring): all of them at the defaults."""
    windows = train.n // seq_len
    keep = subset_size(windows, fraction, max_train)
    return train if keep >= windows else train.prefix(keep * seq_len + 1)


def _streamed(full: Tokens, val: Tokens, request: DataRequest, seq_len: int, vocab: int, info: dict) -> Streamed:
    train = kept(full, seq_len, request.fraction, request.max_train)
    n_eval = request.eval_train_subset or max(1, train.n // seq_len)
    gen = torch.Generator().manual_seed(mix_seed("tokens-eval", request.seed))
    eval_train = torch.randint(0, train.n - seq_len, (min(n_eval, train.n // seq_len),), generator=gen)
    eval_test = torch.arange(0, max(1, min(n_eval, (val.n - 1) // seq_len))) * seq_len

    def eval_batches(split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        tokens, offsets = (train, eval_train) if split == "train" else (val, eval_test)
        for lo in range(0, len(offsets), batch_size):
            yield tokens.windows(offsets[lo:lo + batch_size], seq_len)

    stream = WindowStream(train, seq_len, request.seed, request.batch_size, request.rank, request.world)
    return Streamed(train=stream, n_train=max(1, train.n // seq_len), input_shape=(seq_len,),
                    eval_batches=eval_batches, vocab_size=vocab,
                    info={"train_tokens": train.n, "train_tokens_full": full.n, "val_tokens": val.n,
                          "seq_len": seq_len, **info})


def token_root(request: DataRequest) -> Path:
    """Where the token files are: staged in a store (copied once to the local cache), else ``<data-root>/tokens``
    or ``<data-root>/datasets/tokens`` (a directory store they were staged to)."""
    if is_store_url(request.data_root):
        return fetch_staged("tokens", request.data_root)
    staged = Path(request.data_root.removeprefix("file://")).expanduser() / "datasets" / "tokens"
    return staged if not any(Path(request.root).glob("*.bin")) and staged.is_dir() else Path(request.root)


def load_tokens(request: DataRequest, options: Any) -> Streamed:
    """nanoGPT's or modded-nanogpt's token files under ``<data-root>/tokens``."""
    train, val = read_splits(token_root(request), options.format)
    return _streamed(train, val, request, options.seq_len, options.vocab_size, {"format": options.format})


def load_pycorpus(request: DataRequest, options: Any) -> Streamed:
    """The offline byte-level corpus (module docstring); its hash goes to cell.json."""
    train, val = pycorpus_split()
    digest = hashlib.sha256(pycorpus_bytes()).hexdigest()
    return _streamed(Tokens([train]), Tokens([val]), request, options.seq_len, 256,
                     {"corpus": "pydoc_data.topics, utf-8 bytes", "corpus_sha256": digest})
