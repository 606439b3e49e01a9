"""The GPT, the token files (nanoGPT's .bin, FineWeb shards), the offline corpus and budgets in tokens."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.layout import cell_prefix
from critbatch.jobs.cell.options import GPTOptions
from critbatch.jobs.cell.plugins import DataRequest
from critbatch.jobs.cell.spec import Cell, total_steps
from critbatch.jobs.cli import main as cli_main
from critbatch.jobs.data.corpus import pycorpus_bytes
from critbatch.jobs.data.tokens import load_pycorpus, load_tokens, write_fineweb
from critbatch.jobs.models.gpt import GPT, n_params
from critbatch.jobs.store import open_store

SMALL = GPTOptions(n_layer=2, n_head=2, n_embd=16, seq_len=12)


@pytest.mark.parametrize("positions, norm", [("learned", "layernorm"), ("rotary", "rmsnorm")])
def test_gpt_is_causal_and_tied(positions, norm):
    torch.manual_seed(0)
    model = GPT(50, SMALL.model_copy(update={"positions": positions, "norm": norm})).eval()
    x = torch.randint(0, 50, (3, 12))
    out = model(x)
    assert out.shape == (3, 12, 50)
    later = x.clone()
    later[:, 7:] = (later[:, 7:] + 1) % 50  # tokens after position 6 cannot change its logits
    assert torch.equal(model(later)[:, :7], out[:, :7])
    assert not torch.equal(model(later)[:, 7:], out[:, 7:])
    assert model.head.weight is model.wte.weight


def test_gpt2_small_has_124m_parameters():
    """GPT-2 small: 12 layers, 12 heads, 768 wide, 1024 positions, vocabulary 50257: 124,439,808 parameters."""
    with torch.device("meta"):
        model = GPT(50257, GPTOptions())
    # 50257*768 + 1024*768 + 12 * (4*768 + 768*2304 + 2304 + 768*768 + 768 + 768*3072 + 3072 + 3072*768 + 768
    # + 2*768) + 2*768 (final LayerNorm); the head is the embedding
    per_block = 4 * 768 + 768 * 2304 + 2304 + 768 * 768 + 768 + 768 * 3072 + 3072 + 3072 * 768 + 768
    assert n_params(model) == 50257 * 768 + 1024 * 768 + 12 * per_block + 2 * 768 == 124_439_808


def test_gpt_options_are_checked():
    with pytest.raises(ConfigError, match="model_options.n_embd: 10 is not a multiple of n_head 4"):
        Cell.from_dict({**LM, "model_options": {"n_head": 4, "n_embd": 10}})
    with pytest.raises(ConfigError, match="model_options.positions: rotary positions rotate pairs"):
        Cell.from_dict({**LM, "model_options": {"n_head": 2, "n_embd": 6, "positions": "rotary"}})
    with pytest.raises(ConfigError, match=r"model_options.seq_len: 8 is shorter than the dataset's examples \(16"):
        Cell.from_dict({**LM, "model_options": {"seq_len": 8}})


def _request(tmp_path, batch=4, rank=0, world=1, seed=0, fraction=1.0, max_train=None) -> DataRequest:
    return DataRequest(name="tokens", root=tmp_path, data_root=str(tmp_path.parent), seed=seed, fraction=fraction,
                       max_train=max_train, extra=False, eval_train_subset=5, batch_size=batch, rank=rank,
                       world=world, download=False)


class Opts:
    def __init__(self, fmt, seq_len=8, vocab_size=1000):
        self.format, self.seq_len, self.vocab_size = fmt, seq_len, vocab_size


def test_nanogpt_and_fineweb_files_give_the_same_windows(tmp_path):
    ids = np.arange(3000, dtype=np.uint16)  # each id its own position: a window shows where it starts
    (tmp_path / "nano").mkdir()
    ids[:2500].tofile(tmp_path / "nano" / "train.bin")
    ids[2500:].tofile(tmp_path / "nano" / "val.bin")
    (tmp_path / "fw").mkdir()  # the training tokens across two shards
    write_fineweb(tmp_path / "fw" / "fineweb_train_000001.bin", ids[:1000])
    write_fineweb(tmp_path / "fw" / "fineweb_train_000002.bin", ids[1000:2500])
    write_fineweb(tmp_path / "fw" / "fineweb_val_000000.bin", ids[2500:])
    nano = load_tokens(_request(tmp_path / "nano"), Opts("nanogpt"))
    fw = load_tokens(_request(tmp_path / "fw"), Opts("fineweb"))
    a, b = iter(nano.train), iter(fw.train)
    for _ in range(5):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 8) and xa.dtype == torch.int64
        assert torch.equal(ya[:, :-1], xa[:, 1:])  # y is x shifted by one
        for row in xa:  # contiguous runs of the file, also across the shard boundary at 1000
            start = int(row[0])
            assert torch.equal(row, torch.arange(start, start + 8)) and start + 9 <= 2500
    assert nano.n_train == 2500 // 8 and nano.info["val_tokens"] == 500


def test_windows_resume_bit_exactly_and_split_over_ranks(tmp_path):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "val.bin")
    whole = iter(load_tokens(_request(tmp_path), Opts("nanogpt")).train)
    batches = [next(whole)[0] for _ in range(6)]
    resumed = load_tokens(_request(tmp_path), Opts("nanogpt")).train
    resumed.load_state_dict({"step": 4})
    assert torch.equal(next(iter(resumed))[0], batches[4])
    halves = [load_tokens(_request(tmp_path, rank=r, world=2), Opts("nanogpt")).train for r in (0, 1)]
    rows = [next(iter(h))[0] for h in halves]
    assert torch.equal(torch.cat(rows), batches[0])  # the global batch does not depend on the world size
    other_seed = next(iter(load_tokens(_request(tmp_path, seed=1), Opts("nanogpt")).train))[0]
    assert not torch.equal(other_seed, batches[0])


@pytest.mark.parametrize("fraction, max_train, windows", [
    (1.0, None, 625),   # 5003 tokens, windows of 8: nothing is cut, the 3 left over included
    (0.5, None, 312),   # int(625 x 0.5)
    (1.0, 100, 100),
    (0.5, 100, 50),     # the cap first, then the fraction (as the in-memory sets)
    (0.001, None, 1),   # at least one window
])
def test_fraction_and_max_train_keep_a_prefix_of_the_training_tokens(tmp_path, fraction, max_train, windows):
    np.arange(5003, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "val.bin")
    out = load_tokens(_request(tmp_path, batch=16, fraction=fraction, max_train=max_train), Opts("nanogpt"))
    kept = 5003 if windows == 625 else windows * 8 + 1  # the last window's targets included
    assert out.n_train == windows
    assert (out.info["train_tokens"], out.info["train_tokens_full"], out.info["val_tokens"]) == (kept, 5003, 500)
    starts = torch.cat([next(iter(out.train))[0][:, 0] for _ in range(20)])
    assert int(starts.max()) + 9 <= kept  # every window (x and its shifted y) inside the kept prefix
    if windows > 1:
        assert int(starts.max()) + 9 > kept * 0.9  # ... drawn from all of it
    evals = torch.cat([x[:, 0] for x, _ in out.eval_batches("train", 4)])
    assert int(evals.max()) + 9 <= kept
    assert len(list(out.eval_batches("test", 4))) == 2  # the validation split is whole: 5 windows of 8


def test_bad_fineweb_header_names_the_file(tmp_path):
    np.zeros(300, dtype=np.int32).tofile(tmp_path / "fineweb_train_000000.bin")
    write_fineweb(tmp_path / "fineweb_val_000000.bin", np.arange(50, dtype=np.uint16))
    with pytest.raises(ConfigError, match="fineweb_train_000000.bin is not a FineWeb shard"):
        load_tokens(_request(tmp_path), Opts("fineweb"))
    with pytest.raises(ConfigError, match="token files not found"):
        load_tokens(_request(tmp_path / "none"), Opts("nanogpt"))


def test_pycorpus_is_real_text_with_its_hash(tmp_path):
    data = pycorpus_bytes()
    assert len(data) > 100_000 and b"assert" in data and data.decode("utf-8")
    out = load_pycorpus(_request(tmp_path), Opts("nanogpt", seq_len=32))
    assert out.info["corpus_sha256"] == hashlib.sha256(data).hexdigest() and out.vocab_size == 256
    assert out.n_train == int(len(data) * 0.9) // 32


LM = {"dataset": {"name": "pycorpus", "options": {"seq_len": 16}}, "model": "gpt",
      "model_options": {"n_layer": 1, "n_head": 2, "n_embd": 16, "seq_len": 16}, "strategy": "blr",
      "batch_size": 8, "base_lr": 0.003, "base_batch": 8, "tokens": 1280.0, "sweep": "t",
      "eval": {"points": 3, "train_subset": 8}, "noise": {"every": 2}, "optimizer": {"name": "adamw"}}


def test_token_budget_counts_steps():
    cell = Cell.from_dict(LM)
    assert total_steps(cell, 1) == 10  # 1280 tokens / (8 x 16)
    assert total_steps(cell.model_copy(update={"batch_size": 16}), 1) == 5
    with pytest.raises(ConfigError, match="tokens: a budget in tokens needs a token dataset"):
        Cell.from_dict({"dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "blr", "batch_size": 8,
                        "base_lr": 0.1, "base_batch": 8, "tokens": 1000.0})
    with pytest.raises(ConfigError, match="epochs: give the budget as exactly one of epochs, tokens; got both"):
        Cell.from_dict({**LM, "epochs": 1.0})


def test_gpt_cell_trains_on_pycorpus(tmp_path, cpu_env):
    url = str(tmp_path / "store")
    cell = Cell.from_dict(LM)
    assert cli_main(["train", "--cell", cell.to_json(), "--store", url, "--progress", "none", "--threads", "1"]) == 0
    store = open_store(url)
    prefix = cell_prefix("t", cell.id)
    record = json.loads(store.get_text(f"{prefix}/cell.json"))
    assert record["derived"]["corpus_sha256"] == hashlib.sha256(pycorpus_bytes()).hexdigest()
    done = json.loads(store.get_text(f"{prefix}/_SUCCESS"))
    assert done["status"] == "done" and done["steps"] == 10 and done["final"]["metric"] == "perplexity"
    assert done["final"]["train_loss"] < np.log(256)  # below the uniform byte model


def test_a_pycorpus_cell_trains_on_the_windows_fraction_and_max_train_keep(tmp_path, cpu_env):
    """max_train 80 windows of 16 bytes, half of them kept: 40 windows, an epoch of 5 steps at batch 8."""
    url = str(tmp_path / "store")
    data = {k: v for k, v in LM.items() if k != "tokens"}
    cell = Cell.from_dict({**data, "dataset": {**LM["dataset"], "fraction": 0.5, "max_train": 80}, "epochs": 2.0})
    assert cell.train_size() == 40
    assert cli_main(["train", "--cell", cell.to_json(), "--store", url, "--progress", "none", "--threads", "1"]) == 0
    store = open_store(url)
    prefix = cell_prefix("t", cell.id)
    derived = json.loads(store.get_text(f"{prefix}/cell.json"))["derived"]
    assert (derived["n_train"], derived["train_tokens"]) == (40, 40 * 16 + 1)
    assert derived["train_tokens_full"] == int(len(pycorpus_bytes()) * 0.9)
    assert json.loads(store.get_text(f"{prefix}/_SUCCESS"))["steps"] == 10  # 2 epochs x 40 // 8


def test_tokens_staged_into_a_store_are_read_from_it(tmp_path, capsys):
    src = tmp_path / "shards"
    src.mkdir()
    write_fineweb(src / "fineweb_train_000001.bin", np.arange(2000, dtype=np.uint16))
    write_fineweb(src / "fineweb_val_000000.bin", np.arange(300, dtype=np.uint16))
    (src / "notes.txt").write_text("not a token file")
    store = tmp_path / "store"
    assert cli_main(["data", "stage", "tokens", "--from", str(src), "--store", str(store)]) == 0
    assert sorted(p.name for p in (store / "datasets" / "tokens").iterdir()) == [
        "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    request = DataRequest(name="tokens", root=store / "tokens", data_root=str(store), seed=0, fraction=1.0,
                          max_train=None, extra=False, eval_train_subset=4, batch_size=2, rank=0, world=1,
                          download=False)
    out = load_tokens(request, Opts("fineweb"))
    assert out.info["train_tokens"] == 2000 and out.info["val_tokens"] == 300
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["data", "stage", "tokens", "--from", str(empty), "--store", str(store)]) == 2
    assert "holds no .bin token files" in capsys.readouterr().err
