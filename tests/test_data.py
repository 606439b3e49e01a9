"""Datasets: sizes, deterministic batching across calls/ranks/resumes, augmentation, linreg's figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.data.datasets import TaskData, load_task_data, random_crop


def make_cell(dataset: str, model: str, batch_size: int = 32, **ds) -> Cell:
    return Cell.from_dict({
        "dataset": {"name": dataset, **ds}, "model": model, "strategy": "blr",
        "batch_size": batch_size, "base_lr": 0.1, "base_batch": batch_size, "epochs": 1,
    })


def linreg_cell(batch_size: int = 8, **opts) -> Cell:
    options = {"n": 64, "d": 128, "spikes": 2, "spike_var": 20.0, **opts}
    return make_cell("linreg", "linear", batch_size, options=options)


@pytest.mark.slow
def test_digits_split_and_shapes():
    data = load_task_data(make_cell("digits", "digits_cnn"), "/nonexistent")
    assert (data.n_train, len(data.test_x)) == (1437, 360)
    assert data.train_x.shape == (1437, 1, 8, 8) and data.train_x.dtype == torch.float32
    assert data.train_y.dtype == torch.int64 and set(data.train_y.tolist()) == set(range(10))
    assert data.in_channels == 1 and data.num_classes == 10
    assert abs(float(data.train_x.mean())) < 0.05 and abs(float(data.train_x.std()) - 1) < 0.05
    assert data.n_train == make_cell("digits", "digits_cnn").train_size()


@pytest.mark.parametrize("fraction,max_train,expected", [
    (1.0, None, 1437), (0.5, None, 718), (0.25, None, 359), (1.0, 1000, 1000), (0.5, 1000, 500),
])
def test_digits_fraction_and_max_train(fraction, max_train, expected):
    cell = make_cell("digits", "digits_cnn", 16, fraction=fraction, max_train=max_train)
    data = load_task_data(cell, "/nonexistent")
    assert data.n_train == expected == cell.train_size() == len(data.train_x)
    # The subset is fixed: the same rows whatever the cell's seed.
    again = load_task_data(Cell.from_dict({**cell.to_dict(), "seed": 7}), "/nonexistent")
    assert torch.equal(data.train_x, again.train_x)


def test_steps_per_epoch_drops_last():
    data = load_task_data(make_cell("digits", "digits_cnn"), "/x")
    assert data.steps_per_epoch(64) == 1437 // 64 == 22
    assert data.steps_per_epoch(5000) == 1


def test_train_batches_deterministic_and_epoch_dependent():
    data = load_task_data(make_cell("digits", "digits_cnn"), "/x")
    a = [y for _, y in data.train_batches(0, 64, seed=1)]
    b = [y for _, y in data.train_batches(0, 64, seed=1)]
    c = [y for _, y in data.train_batches(1, 64, seed=1)]
    d = [y for _, y in data.train_batches(0, 64, seed=2)]
    assert len(a) == 22 and all(len(y) == 64 for y in a)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c)) and not torch.equal(torch.cat(a), torch.cat(d))


@pytest.mark.slow
def test_epoch_is_a_permutation():
    data = load_task_data(make_cell("linreg", "linear", 8), "/x")
    xs = torch.cat([x for x, _ in data.train_batches(3, 8, seed=0)])
    assert xs.shape == data.train_x.shape
    # Every training row appears exactly once (up to the dropped remainder; 512 % 8 == 0).
    assert torch.equal(xs[torch.argsort(xs[:, 0])], data.train_x[torch.argsort(data.train_x[:, 0])])


@pytest.mark.parametrize("dataset,model", [("digits", "digits_cnn"), pytest.param("linreg", "linear", marks=pytest.mark.slow)])
def test_rank_slices_concatenate_to_world_one(dataset, model):
    data = load_task_data(make_cell(dataset, model, 8), "/x")
    whole = list(data.train_batches(0, 32, seed=5))
    r0 = list(data.train_batches(0, 32, seed=5, rank=0, world=2))
    r1 = list(data.train_batches(0, 32, seed=5, rank=1, world=2))
    assert len(whole) == len(r0) == len(r1)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, r0, r1):
        assert len(x0) == len(x1) == 16
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


def test_resume_from_start_gives_the_same_batches():
    data = load_task_data(make_cell("digits", "digits_cnn"), "/x")
    full = list(data.train_batches(2, 50, seed=3))
    resumed = list(data.train_batches(2, 50, seed=3, start=9))
    assert len(resumed) == len(full) - 9
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[9:], resumed))


def test_train_batches_rejects_bad_world():
    data = load_task_data(make_cell("digits", "digits_cnn"), "/x")
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        next(data.train_batches(0, 32, seed=0, world=3))


def test_eval_batches():
    cell = Cell.from_dict({**make_cell("digits", "digits_cnn").to_dict(), "eval": {"train_subset": 100}})
    data = load_task_data(cell, "/x")
    train = list(data.eval_batches("train", 30))
    assert [len(y) for _, y in train] == [30, 30, 30, 10]
    assert torch.equal(torch.cat([y for _, y in train]), torch.cat([y for _, y in data.eval_batches("train", 30)]))
    test_x = torch.cat([x for x, _ in data.eval_batches("test", 128)])
    assert torch.equal(test_x, data.test_x)
    with pytest.raises(ValueError, match="allowed: train, test"):
        next(data.eval_batches("valid", 8))


def test_linreg_beta_lambda_against_numpy():
    data = load_task_data(linreg_cell(), "/x")
    x = data.train_x.numpy().astype(np.float64)
    beta = (x ** 2).sum(1).max()
    lam = np.linalg.eigvalsh(x.T @ x / len(x))[-1]
    assert data.info["beta"] == pytest.approx(beta, rel=1e-9)
    assert data.info["lambda_1"] == pytest.approx(lam, rel=1e-7)
    assert data.info["m_star"] == pytest.approx(beta / lam + 1, rel=1e-7)
    # The spiked directions carry the variance they were given; labels are noiseless.
    assert x[:, :2].var(0).mean() == pytest.approx(20.0, rel=0.35)
    assert x[:, 2:].var() == pytest.approx(1.0, rel=0.1)
    w, *_ = np.linalg.lstsq(x, data.train_y.numpy().astype(np.float64), rcond=None)
    assert np.abs(x @ w - data.train_y.numpy()).max() < 1e-3


@pytest.mark.slow
def test_linreg_default_calibration():
    """The design's setting (512 x 1024, four spikes of 60): m* near 33.7."""
    data = load_task_data(make_cell("linreg", "linear", 8), "/x")
    assert data.train_x.shape == (512, 1024) and data.test_x.shape == (512, 1024)
    assert 25 < data.info["m_star"] < 45


def test_linreg_depends_on_seed_only():
    a, b = load_task_data(linreg_cell(), "/x"), load_task_data(linreg_cell(), "/x")
    c = load_task_data(Cell.from_dict({**linreg_cell().to_dict(), "seed": 1}), "/x")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert not torch.equal(a.train_x, a.test_x)


@pytest.mark.parametrize("options,match", [
    ({"n": 0}, r"options.n: must be a positive integer"),
    ({"spike_var": -1.0}, r"options.spike_var: must be a positive number"),
    ({"spikes": 500}, r"options.spikes: 500 exceeds d = 128"),
])
def test_linreg_bad_options(options, match):
    from critbatch.jobs.cell.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_task_data(linreg_cell(1, **options), "/x")


def test_to_device_keeps_values():
    data = load_task_data(make_cell("digits", "digits_cnn"), "/x")
    moved = data.to("cpu")
    assert isinstance(moved, TaskData) and moved.n_train == data.n_train
    assert torch.equal(next(moved.train_batches(0, 8, seed=0))[0], next(data.train_batches(0, 8, seed=0))[0])


def test_random_crop_gathers_shifted_windows():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).view(2, 1, 5, 5)
    out = random_crop(x, torch.tensor([4, 0]), torch.tensor([4, 8]), 4)
    assert torch.equal(out[0], x[0])  # offset == pad: the original image
    # Image 1 shifted by 4 rows down and 4 columns left in the padded frame.
    expected = torch.zeros(5, 5, dtype=torch.uint8)
    expected[4:, :1] = x[1, 0, :1, 4:]
    assert torch.equal(out[1, 0], expected)


# ---- the paper's sets, read from tiny files in their real formats ------------------------

import pickle  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from datafiles import CITYSCAPES_IDS, write_dataset  # noqa: E402

from critbatch.jobs.cli import main as cli  # noqa: E402
from critbatch.jobs.data.datasets import LAYOUTS, stage_dataset, subset_size  # noqa: E402
from critbatch.jobs.cell.errors import ConfigError  # noqa: E402
from critbatch.jobs.store import open_store  # noqa: E402

MODEL_OF = {"mnist": "resnet34", "cifar10": "resnet34", "cifar100": "vgg16", "svhn": "alexnet",
            "wikitext2": "lstm", "cityscapes": "drn_d_22"}
TINY = {  # name -> (train examples, test examples) the writers produce by default
    "mnist": (96, 40), "cifar10": (100, 40), "cifar100": (100, 40), "svhn": (96, 40), "cityscapes": (6, 3),
}


@pytest.fixture(scope="module")
def disk_root(tmp_path_factory):
    """One data root holding every paper set as <root>/<name>/..., plus SVHN's extra split."""
    root = tmp_path_factory.mktemp("data")
    for name in MODEL_OF:
        kwargs = {"n_extra": 24} if name == "svhn" else {}
        write_dataset(name, root / name, **kwargs)
    return root


def disk_cell(name: str, batch_size: int = 4, **ds) -> Cell:
    return make_cell(name, MODEL_OF[name], batch_size, **ds)


@pytest.mark.parametrize("name,shape,classes", [
    ("mnist", (1, 32, 32), 10), ("cifar10", (3, 32, 32), 10), ("cifar100", (3, 32, 32), 100),
    ("svhn", (3, 32, 32), 10), ("cityscapes", (3, 256, 512), 19),
])
def test_image_sets_load(disk_root, name, shape, classes):
    data = load_task_data(disk_cell(name), str(disk_root))
    assert (data.n_train, len(data.test_x)) == TINY[name]
    assert data.train_x.dtype == torch.uint8 and tuple(data.train_x.shape[1:]) == shape
    assert data.num_classes == classes and data.in_channels == shape[0]
    x, y = next(data.train_batches(0, 4, seed=0))
    assert x.dtype == torch.float32 and x.shape == (4, *shape) and y.dtype == torch.int64
    xe = torch.cat([b for b, _ in data.eval_batches("train", 16)])
    # Normalised with the training split's statistics: mean 0, std 1 per channel (without augmentation).
    assert xe.mean((0, 2, 3)).abs().max() < 1e-4 and (xe.std((0, 2, 3)) - 1).abs().max() < 1e-3


def test_cifar10_pixels_and_labels_match_the_pickles(disk_root):
    data = load_task_data(disk_cell("cifar10"), str(disk_root))
    folder = disk_root / "cifar10" / "cifar-10-batches-py"
    batches = [pickle.loads((folder / f"data_batch_{i}").read_bytes()) for i in range(1, 6)]
    raw = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    assert np.array_equal(data.train_x.numpy(), raw)
    assert data.train_y.tolist() == sum((b["labels"] for b in batches), [])


def test_mnist_is_padded_to_32(disk_root):
    data = load_task_data(disk_cell("mnist"), str(disk_root))
    x = data.train_x
    assert x[:, :, :2].sum() == 0 and x[:, :, -2:].sum() == 0 and x[:, :, :, :2].sum() == 0
    assert x[:, :, 2:30, 2:30].float().mean() > 100  # the written pixels are uniform in 0..255


def test_svhn_labels_and_extra(disk_root):
    from scipy.io import loadmat

    data = load_task_data(disk_cell("svhn"), str(disk_root))
    mat = loadmat(disk_root / "svhn" / "train_32x32.mat")
    assert data.train_y.tolist() == [0 if v == 10 else int(v) for v in mat["y"][:, 0]]
    assert torch.equal(data.train_x[5].permute(1, 2, 0), torch.from_numpy(mat["X"][:, :, :, 5]))
    extra = load_task_data(disk_cell("svhn", extra=True), str(disk_root))
    assert extra.n_train == 96 + 24 and torch.equal(extra.train_x[:96], data.train_x)


def test_wikitext2_tokens_and_sequences(disk_root):
    data = load_task_data(disk_cell("wikitext2"), str(disk_root))
    folder = disk_root / "wikitext2" / "wikitext-2"
    words = {s: [w for line in (folder / f"wiki.{s}.tokens").read_text().splitlines(keepends=True)
                 for w in line.split() + ["<eos>"]] for s in ("train", "valid", "test")}
    assert data.vocab_size == len(set(words["train"] + words["valid"] + words["test"]))
    assert data.info["tokens"] == {s: len(w) for s, w in words.items()}
    assert data.n_train == (len(words["train"]) - 1) // 35 and data.train_x.shape == (data.n_train, 35)
    # y is x shifted by one token; consecutive samples continue each other.
    assert torch.equal(data.train_x[:, 1:], data.train_y[:, :-1])
    assert torch.equal(data.train_y[:-1, -1], data.train_x[1:, 0])
    # Ids follow first appearance: the first line is blank, so '<eos>' is id 0.
    assert data.train_x[0, 0] == 0 and words["train"][0] == "<eos>"


def test_cityscapes_train_ids(disk_root):
    from PIL import Image

    cell = disk_cell("cityscapes", options={"size": [64, 128]})
    data = load_task_data(cell, str(disk_root))
    assert data.info["input_shape"] == [3, 64, 128]
    label_files = sorted((disk_root / "cityscapes" / "gtFine" / "train" / "aachen").glob("*_labelIds.png"))
    ids = np.array(Image.open(label_files[2]))
    expected = np.vectorize(CITYSCAPES_IDS.get)(ids)
    assert np.array_equal(data.train_y[2].numpy(), expected)
    assert set(np.unique(data.train_y.numpy())) <= {0, 1, 2, 8, 10, 11, 13, 18, 255}


@pytest.mark.parametrize("options,match", [
    ({"size": [10]}, r"options.size: must list at least 2 values, got \[10\]"),
    ({"augment": "crop"}, r"options.augment: unknown augment 'crop'; allowed: none, flip"),
    ({"scale": 2}, r"options.scale: unknown option for dataset 'cityscapes'; allowed: size, augment"),
])
def test_cityscapes_bad_options(disk_root, options, match):
    with pytest.raises(ConfigError, match=match):
        load_task_data(disk_cell("cityscapes", options=options), str(disk_root))


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "svhn", "wikitext2", "cityscapes"])
@pytest.mark.parametrize("fraction,max_train", [(0.5, None), (1.0, 10), (0.5, 10)])
def test_fraction_and_max_train_on_every_set(disk_root, name, fraction, max_train):
    full = load_task_data(disk_cell(name, 2), str(disk_root))
    part = load_task_data(disk_cell(name, 2, fraction=fraction, max_train=max_train), str(disk_root))
    assert part.n_train == subset_size(full.n_train, fraction, max_train) == len(part.train_x)
    # A fixed subset of the full set's rows, the same on every load.
    rows = {tuple(r.flatten()[:64].tolist()) for r in full.train_x}
    assert all(tuple(r.flatten()[:64].tolist()) in rows for r in part.train_x)
    again = load_task_data(disk_cell(name, 2, fraction=fraction, max_train=max_train), str(disk_root))
    assert torch.equal(part.train_x, again.train_x)
    assert len(part.test_x) == len(full.test_x)


def test_augmentation_repeats_and_changes_pixels(disk_root):
    aug = load_task_data(disk_cell("cifar10"), str(disk_root))
    plain = load_task_data(disk_cell("cifar10", options={"augment": "none"}), str(disk_root))
    a = list(aug.train_batches(1, 20, seed=4))
    b = list(aug.train_batches(1, 20, seed=4))
    p = list(plain.train_batches(1, 20, seed=4))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    assert all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(a, p))  # same examples, same order
    changed = torch.cat([(x1 != x2).flatten(1).any(1) for (x1, _), (x2, _) in zip(a, p)])
    assert changed.float().mean() > 0.8  # 1/81 crops are the identity, and half of those are not flipped
    # Each augmented image is a window of the zero-padded plain one, mirrored or not (compared in uint8 units).
    def raw(x):
        return (x * aug.std.view(1, -1, 1, 1) + aug.mean.view(1, -1, 1, 1)).round()

    for plain_img, aug_img in zip(raw(p[0][0]), raw(a[0][0])):
        padded = torch.nn.functional.pad(plain_img, (4, 4, 4, 4))
        windows = [padded[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(w, aug_img) or torch.equal(w.flip(-1), aug_img) for w in windows)


def test_augmentation_independent_of_world_and_resume(disk_root):
    data = load_task_data(disk_cell("cifar10"), str(disk_root))
    whole = list(data.train_batches(0, 20, seed=9))
    r0 = list(data.train_batches(0, 20, seed=9, rank=0, world=2))
    r1 = list(data.train_batches(0, 20, seed=9, rank=1, world=2, start=0))
    for (x, y), (x0, y0), (x1, y1) in zip(whole, r0, r1):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    resumed = list(data.train_batches(0, 20, seed=9, start=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[3:], resumed))


def test_segmentation_flip_moves_labels_with_pixels(disk_root):
    cell = disk_cell("cityscapes", 6, options={"size": [64, 128]})
    flip = load_task_data(cell, str(disk_root))
    plain = load_task_data(disk_cell("cityscapes", 6, options={"size": [64, 128], "augment": "none"}),
                           str(disk_root))
    (xf, yf), = list(flip.train_batches(0, 6, seed=1))
    (xp, yp), = list(plain.train_batches(0, 6, seed=1))
    flipped = [i for i in range(6) if not torch.equal(xf[i], xp[i])]
    assert flipped and len(flipped) < 6
    for i in range(6):
        mirrored = i in flipped
        assert torch.equal(xf[i], xp[i].flip(-1) if mirrored else xp[i])
        assert torch.equal(yf[i], yp[i].flip(-1) if mirrored else yp[i])


@pytest.mark.parametrize("name,expect", [
    ("cifar10", r"dataset 'cifar10' not found: looked for cifar-10-batches-py/data_batch_1"),
    ("mnist", r"MNIST/raw/train-images-idx3-ubyte.*critbatch data stage mnist --from DIR.*or pass --download"),
    ("svhn", r"train_32x32.mat.*under .*/empty/svhn, .*/empty, .*/empty/datasets/svhn"),
    ("wikitext2", r"wikitext-2/wiki.train.tokens.*\(wikitext2 cannot be downloaded automatically\)"),
    ("cityscapes", r"leftImg8bit/train/.*holding leftImg8bit/ and gtFine/"),
])
def test_missing_dataset_error(tmp_path, name, expect):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^--data-root: .*" + expect):
        load_task_data(disk_cell(name), str(tmp_path / "empty"))


def test_missing_svhn_extra(disk_root, tmp_path):
    write_dataset("svhn", tmp_path / "svhn")
    with pytest.raises(ConfigError, match="extra_32x32.mat"):
        load_task_data(disk_cell("svhn", extra=True), str(tmp_path))


@pytest.mark.slow
def test_shared_torchvision_root_is_found(tmp_path):
    write_dataset("cifar100", tmp_path)  # tmp_path/cifar-100-python, no per-dataset folder
    assert load_task_data(disk_cell("cifar100"), str(tmp_path)).n_train == 100


# ---- staging to a store and reading back ------------------------------------------------

def test_stage_and_read_back(disk_root, any_store_url, tmp_path, monkeypatch):
    monkeypatch.setenv("CRITBATCH_CACHE", str(tmp_path / "cache"))
    keys = stage_dataset("cifar10", disk_root / "cifar10", any_store_url)
    assert keys == [f"datasets/cifar10/cifar-10-batches-py/{f}" for f in sorted(LAYOUTS["cifar10"].required)]
    assert open_store(any_store_url).list("datasets/") == keys
    direct = load_task_data(disk_cell("cifar10"), str(disk_root))
    staged = load_task_data(disk_cell("cifar10"), any_store_url)
    assert torch.equal(staged.train_x, direct.train_x) and torch.equal(staged.test_y, direct.test_y)
    if any_store_url.startswith("s3://"):
        copied = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != ".staged")
        assert len(copied) == len(keys)
        mtimes = [p.stat().st_mtime_ns for p in copied]
        load_task_data(disk_cell("cifar10"), any_store_url)  # the second read uses the cache
        assert [p.stat().st_mtime_ns for p in copied] == mtimes


@pytest.mark.parametrize("name,sub,prefix", [
    ("cifar10", "cifar-10-batches-py", "cifar-10-batches-py"),
    ("mnist", "MNIST", "MNIST/raw"),
    ("mnist", "MNIST/raw", "MNIST/raw"),
    ("wikitext2", "wikitext-2", "wikitext-2"),
])
def test_stage_from_the_inner_folder(disk_root, tmp_path, name, sub, prefix):
    keys = stage_dataset(name, disk_root / name / sub, str(tmp_path / "store"))
    assert keys and all(k.startswith(f"datasets/{name}/{prefix}/") for k in keys)
    assert load_task_data(disk_cell(name), str(tmp_path / "store")).n_train > 0


def test_stage_svhn_and_cityscapes_layouts(disk_root, tmp_path):
    keys = stage_dataset("svhn", disk_root / "svhn", str(tmp_path / "store"))
    assert keys == [f"datasets/svhn/{s}_32x32.mat" for s in ("extra", "test", "train")]
    keys = stage_dataset("cityscapes", disk_root / "cityscapes", str(tmp_path / "store"))
    assert len(keys) == 2 * (6 + 3) and all(k.split("/")[2] in ("leftImg8bit", "gtFine") for k in keys)


def test_stage_rejects_incomplete_dir(disk_root, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(disk_root / "cifar10", src)
    (src / "cifar-10-batches-py" / "data_batch_3").unlink()
    (src / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(ConfigError) as err:
        stage_dataset("cifar10", src, str(tmp_path / "store"))
    assert err.value.problems[:2] == [
        f"--from: {src} does not hold cifar10: missing cifar-10-batches-py/data_batch_3",
        f"--from: {src} does not hold cifar10: missing cifar-10-batches-py/test_batch",
    ]
    assert not (tmp_path / "store").exists()


def test_restage_removes_stale_keys(disk_root, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(disk_root / "svhn", src)
    store = str(tmp_path / "store")
    stage_dataset("svhn", src, store)
    (src / "extra_32x32.mat").unlink()
    stage_dataset("svhn", src, store)
    assert open_store(store).list("datasets/svhn") == [f"datasets/svhn/{s}_32x32.mat" for s in ("test", "train")]


@pytest.mark.parametrize("name,match", [
    ("digits", r"'digits' cannot be staged \(digits needs no files: nothing to stage\)"),
    ("imagenet", r"'imagenet' cannot be staged; allowed: mnist, cifar10"),
])
def test_stage_bad_name(tmp_path, name, match):
    with pytest.raises(ConfigError, match=match):
        stage_dataset(name, tmp_path, str(tmp_path / "store"))


def test_stage_cli(disk_root, tmp_path, capsys):
    store = tmp_path / "store"
    assert cli(["data", "stage", "mnist", "--from", str(disk_root / "mnist"), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "staged 4 files" in out and f"--data-root {store}" in out
    assert cli(["data", "stage", "mnist", "--from", str(tmp_path / "nope"), "--store", str(store)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_random_crop_with_flip_mirrors_the_window():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    dy, dx = torch.tensor([0, 1, 4, 8, 3, 4]), torch.tensor([8, 2, 4, 0, 5, 4])
    flip = torch.tensor([True, False, True, True, False, False])
    plain = random_crop(x, dy, dx, 4)
    both = random_crop(x, dy, dx, 4, flip)
    assert torch.equal(both, torch.where(flip.view(-1, 1, 1, 1), plain.flip(-1), plain))
    assert torch.equal(both[5], x[5]) and torch.equal(both[2], x[2].flip(-1))


@pytest.mark.parametrize("name", ["wikitext2", "cityscapes"])
def test_download_cannot_fetch_sets_without_a_public_url(tmp_path, name):
    with pytest.raises(ConfigError, match=rf"\({name} cannot be downloaded automatically\)"):
        load_task_data(disk_cell(name), str(tmp_path), download=True)


def test_store_root_without_the_staged_set(any_store_url, tmp_path, monkeypatch):
    monkeypatch.setenv("CRITBATCH_CACHE", str(tmp_path / "cache"))
    if any_store_url.startswith("s3://"):
        match = r"dataset 'svhn' is not staged in s3://.*/datasets/svhn/; stage it with `critbatch data stage svhn"
    else:
        match = r"dataset 'svhn' not found: .*critbatch data stage svhn --from DIR"
    with pytest.raises(ConfigError, match=match):
        load_task_data(disk_cell("svhn"), any_store_url)
