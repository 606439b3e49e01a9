"""Cells sized for their GPUs: the plan (devices, micro-batch, accumulation) from the memory table.

The arithmetic is checked on a table entry written here (8 MiB per example, 256 MiB of weights), the
preset-facing behaviour on the committed table (jobs/sweep/memory.json, benchmarks/measure_memory.py).
"""

from __future__ import annotations

import copy

import pytest
import yaml

from critbatch.jobs import cli
from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.sweep import render, sizing
from critbatch.jobs.sweep.grid import load_grid, preset_names

MiB, GiB = 2 ** 20, 2 ** 30

BASE = {
    "sweep": "size",
    "dataset": {"name": "cifar10"},
    "model": "resnet34",
    "strategy": "blr",
    "base_lr": 0.1,
    "base_batch": 64,
    "epochs": 1,
    "batch_size": 64,
    "resources": {"gpus": 4, "cpu": 16, "memory": "64Gi", "shm": "16Gi", "gpu_memory": "16Gi"},
    "store": "s3://critbatch/runs",
}


def spec(**changes):
    out = copy.deepcopy(BASE)
    out.update(changes)
    return out


def plans(**changes):
    grid = load_grid(spec(**changes))
    return {c.batch_size: (grid.plan(c), c) for c in grid.cells()}


@pytest.fixture
def table(monkeypatch):
    """resnet34 on 32x32x3 at exactly 8 MiB an example and 4 x 256 MiB of state; no data on the device.

    On a 16 GiB device: 14.4 GiB usable - 1 GiB state - 1 GiB reserved = 12.4 GiB: 1587 examples."""
    entry = {"param_bytes": 256 * MiB, "batch_norm": True,
             "saved_bytes_per_sample": {"fp32": 6 * MiB, "bf16": 3 * MiB},
             "peak_bytes_per_sample": {"fp32": 8 * MiB, "bf16": 4 * MiB}}
    monkeypatch.setattr(sizing, "load_table", lambda: {"resnet34/3x32x32": entry,
                                                       "alexnet/3x32x32": {**entry, "batch_norm": False}})
    monkeypatch.setattr(sizing, "data_bytes", lambda cell: 0)
    return entry


# ---- the plan ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, devices, accumulation, micro", [
    (32, 1, 1, 32),          # small cells take one GPU
    (1024, 1, 1, 1024),
    (1536, 1, 1, 1536),      # the last that fits one GPU (1587)
    (2048, 2, 1, 1024),      # the fewest GPUs whose share fits
    (4096, 4, 1, 1024),
    (8192, 4, 2, 1024),      # all four, then accumulation
    (32768, 4, 8, 1024),
    (6144, 4, 1, 1536),
    (96, 1, 1, 96),
])
def test_fewest_devices_then_accumulation(table, batch, devices, accumulation, micro):
    plan, cell = plans(batch_size=[batch])[batch]
    assert (plan.world, plan.accumulation, plan.micro_batch) == (devices, accumulation, micro)
    assert plan.placement.gpus == devices and plan.placement.nodes == 1
    assert plan.estimate == 2 * GiB + micro * 8 * MiB
    assert cell.accumulation == accumulation
    assert micro * devices * accumulation == batch


def test_bf16_halves_the_activations(table):
    plan, _ = plans(batch_size=[4096], precision="bf16")[4096]
    assert (plan.world, plan.micro_batch) == (2, 2048)  # 3175 examples fit at 4 MiB


def test_a_batch_the_devices_cannot_share_evenly_takes_fewer_and_accumulates(table):
    plan, _ = plans(batch_size=[4099 * 2], resources={**BASE["resources"], "gpus": 4})[8198]
    assert (plan.world, plan.accumulation, plan.micro_batch) == (2, 4099, 1)  # 8198 = 2 x 4099 (a prime)


def test_nodes_are_taken_whole_after_the_gpus_of_one(table):
    resources = {**BASE["resources"], "gpus": 2, "nodes": 3}
    batches = [1024, 2048, 4096, 6144, 9216, 12288]
    got = {b: (p.placement.nodes, p.placement.gpus, p.accumulation) for b, (p, _) in
           plans(batch_size=batches, resources=resources, backend="pytorchjob").items()}
    assert got == {1024: (1, 1, 1), 2048: (1, 2, 1), 4096: (2, 2, 1), 6144: (2, 2, 1), 9216: (3, 2, 1),
                   12288: (3, 2, 2)}


def test_cpu_cells_are_sized_by_the_pods_memory(table):
    resources = {"gpus": 0, "cpu": 2, "memory": "8Gi"}  # 7.2 GiB - 1 GiB state - 0.5 GiB torch: 729 examples
    got = {b: (p.placement.describe(), p.accumulation) for b, (p, _) in
           plans(batch_size=[512, 2048], resources=resources).items()}
    assert got == {512: ("1 CPU", 1), 2048: ("1 CPU", 4)}


def test_fixed_sizing_runs_every_cell_on_every_gpu_as_before(table):
    got = {b: (p.world, p.accumulation, p.note) for b, (p, _) in
           plans(batch_size=[64, 8192], resources={**BASE["resources"], "sizing": "fixed"}).items()}
    assert got[64] == (4, 1, "")
    assert got[8192] == (4, 1, "micro-batch 2048 is over the estimated fit of 1587 (accumulation pinned)")


@pytest.mark.parametrize("pins, expect", [
    ({"micro_batch": 256}, (4, 2, 256)),                 # spread over the devices first, then accumulate
    ({"micro_batch": 1024}, (2, 1, 1024)),
    ({"accumulation": 2}, (1, 2, 1024)),                 # the fewest devices whose micro-batch fits
    ({"accumulation": 4, "micro_batch": 256}, (2, 4, 256)),
])
def test_a_grid_may_pin_micro_batch_or_accumulation(table, pins, expect):
    plan, cell = plans(batch_size=[2048], **pins)[2048]
    assert (plan.world, plan.accumulation, plan.micro_batch) == expect
    assert cell.accumulation == expect[1]


@pytest.mark.parametrize("changes, message", [
    ({"micro_batch": 48}, r"^micro_batch: 48 does not divide the batch of cell \w+ \(resnet34, batch 2048\)"),
    ({"accumulation": 8, "micro_batch": 32}, r"^micro_batch: 32 x accumulation 8 needs 8 devices .*allowed: 1, 2, 4$"),
    ({"accumulation": 3}, r"^accumulation: 3 does not split the batch of cell \w+ \(resnet34, batch 2048\) evenly"),
    ({"resources": {"gpus": 1, "gpu_memory": "2Gi"}},
     r"^resources: one example of cell \w+ \(resnet34, batch 2048\) needs about 2\.0 GiB on one device, more than "
     r"the 1\.8 GiB usable; set resources.gpu_memory"),
    ({"sync_bn": True, "resources": {"gpus": 0, "nodes": 2}, "backend": "pytorchjob", "batch_size": 4096},
     r"^sync_bn: torch's SyncBatchNorm runs on GPUs only"),
    ({"sync_bn": True, "model": "alexnet"}, r"^sync_bn: model 'alexnet' has no BatchNorm layers"),
])
def test_plans_that_cannot_be_made_name_the_field(table, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_grid(spec(**{"batch_size": 2048, **changes}))


def test_a_model_without_a_table_entry_gets_one_device_and_a_warning(table, capsys):
    grid = load_grid(spec(model="vgg16", batch_size=[64, 32768]))
    assert [(p.world, p.accumulation) for p in grid.plans()] == [(1, 1), (1, 1)]
    assert cli.main(["cells", str(write(grid.raw))]) == 0
    err = capsys.readouterr().err
    assert "warning: no memory estimate for vgg16/3x32x32 (jobs/sweep/memory.json): those cells take one device" in err


# ---- identity ---------------------------------------------------------------------------------------------


def test_batchnorm_cells_on_several_devices_record_their_micro_batch(table):
    got = {b: c for b, (_, c) in plans(batch_size=[1024, 4096, 8192]).items()}
    assert got[1024].micro_batch is None  # one device: the micro-batch is the batch / accumulation
    assert got[4096].micro_batch == 1024 and got[8192].micro_batch == 1024
    assert "micro_batch" in got[4096].canonical_json() and "micro_batch" not in got[1024].canonical_json()
    plain = Cell.from_dict({k: v for k, v in spec(batch_size=1024).items() if k not in ("resources", "store")})
    assert got[1024].id == plain.id  # a cell whose plan is one device keeps the id it always had


def test_models_without_batchnorm_and_sync_bn_cells_do_not(table):
    assert plans(model="alexnet", batch_size=[4096])[4096][1].micro_batch is None
    cell = plans(batch_size=[4096], sync_bn=True)[4096][1]
    assert cell.micro_batch is None and '"sync_bn":true' in cell.canonical_json()


def test_the_trainer_refuses_a_cell_on_other_devices_than_it_was_sized_for(table):
    cell = plans(batch_size=[4096])[4096][1]
    assert cell.problems(world_size=4) == []
    assert cell.problems(world_size=2) == [
        "cell.micro_batch: 1024 x world size 2 x accumulation 1 is not the batch size 4096: the cell was sized "
        "for 4 devices (`critbatch cells` prints each cell's plan)"]


def test_presets_cells_on_one_device_keep_their_ids():
    """Cells of the shipped presets that one device holds without accumulation are the cells they always were."""
    for name in ("digits", "linreg", "table1-wikitext2-lstm", "table2-cifar10-resnet34"):
        grid = load_grid(name)
        for cell, plan in zip(grid.cells(), grid.plans()):
            if plan.world == 1 and plan.accumulation == 1:
                data = {k: v for k, v in cell.to_dict().items()}
                assert "micro_batch" not in data and "sync_bn" not in data
                assert Cell.from_dict(data).id == cell.id


# ---- the device's memory ----------------------------------------------------------------------------------


@pytest.mark.parametrize("resources, size, warned", [
    ({"gpus": 1, "gpu_memory": "40Gi"}, 40 * GiB, False),
    ({"gpus": 1, "gpu_type": "NVIDIA-A100-SXM4-80GB"}, 80 * GiB, False),
    ({"gpus": 1, "gpu_type": "Tesla-T4"}, 15 * GiB, False),
    ({"gpus": 1, "gpu_type": "NVIDIA-RTX-PRO-6000-96GB"}, 96 * GiB, False),  # the "-96GB" in the name
    ({"gpus": 1, "gpu_type": "NVIDIA-Unknown"}, 16 * GiB, True),
    ({"gpus": 1}, 16 * GiB, True),
    ({"gpus": 0, "memory": "6Gi"}, 6 * GiB, False),
])
def test_device_memory(resources, size, warned):
    grid = load_grid(spec(resources=resources))
    got, _, warning = sizing.device_memory(grid.resources)
    assert got == size
    assert bool(warning) == warned


# ---- the committed table, the presets ----------------------------------------------------------------------


def test_every_preset_model_and_input_has_a_measured_entry():
    table = sizing.load_table()
    for name in preset_names():
        for cell in load_grid(name).cells():
            entry = table[sizing.memory_key(cell)]
            assert entry["saved_bytes_per_sample"]["bf16"] < entry["saved_bytes_per_sample"]["fp32"]
            assert sizing.per_sample_bytes(entry, cell.precision) >= entry["saved_bytes_per_sample"][cell.precision]


def test_the_gpt124m_estimate_is_its_weights_and_a_sequence_each():
    """GPT-2 small (vocabulary 50304) at 1024 tokens, bf16, AdamW: five fp32 copies of its weights (weights,
    gradients, DDP's buckets, two moments), nothing of the streamed data, and per sequence the counted peak."""
    import torch

    from critbatch.jobs.cell.options import GPTOptions
    from critbatch.jobs.models.gpt import GPT, n_params

    cell = load_grid("gpt124m-fineweb").cells()[0]
    entry = sizing.load_table()[sizing.memory_key(cell)]
    assert sizing.memory_key(cell) == "gpt/1024x50304" and "counted" in entry["method"]
    with torch.device("meta"):
        assert entry["param_bytes"] == 4 * n_params(GPT(50304, GPTOptions())) == 4 * 124_475_904
    fit = sizing.fit_of(cell)
    assert (fit.fixed, fit.per_sample, fit.batch_norm) == (5 * entry["param_bytes"],
                                                           entry["peak_bytes_per_sample"]["bf16"], False)
    # Per sequence at least the logits, their log-softmax and their gradient in fp32 (3 x 1024 x 50304 x 4
    # bytes), and at most twice the saved tensors; bf16 keeps less than fp32.
    logits = 1024 * 50304 * 4
    for precision in ("fp32", "bf16"):
        peak, saved = entry["peak_bytes_per_sample"][precision], entry["saved_bytes_per_sample"][precision]
        assert 3 * logits <= peak <= 2 * saved
    assert entry["peak_bytes_per_sample"]["bf16"] < entry["peak_bytes_per_sample"]["fp32"]


def test_gpt124m_on_80gb_gpus_spreads_then_accumulates_micro_batches_of_64():
    grid = load_grid("gpt124m-fineweb")
    fit = sizing.fit_of(grid.cells()[0])
    budget = int(80 * GiB * sizing.USABLE)
    most = (budget - sizing.RESERVED_BYTES - fit.fixed) // fit.per_sample
    assert most == 76  # sequences of 1024 tokens one 80 GB GPU holds
    got = {c.batch_size: (p.world, p.accumulation, p.micro_batch) for c, p in zip(grid.cells(), grid.plans())}
    assert got == {32: (1, 1, 32), 64: (1, 1, 64), 128: (2, 1, 64), 256: (4, 1, 64), 512: (8, 1, 64),
                   1024: (8, 2, 64), 2048: (8, 4, 64), 4096: (8, 8, 64)}
    for cell, plan in zip(grid.cells(), grid.plans()):
        assert plan.estimate == sizing.RESERVED_BYTES + fit.fixed + plan.micro_batch * fit.per_sample <= budget
        assert cell.accumulation == plan.accumulation and cell.micro_batch is None  # no BatchNorm


def test_the_gpt_pycorpus_cells_take_one_cpu_as_before_they_were_measured():
    grid = load_grid("gpt-pycorpus")
    for cell, plan in zip(grid.cells(), grid.plans()):
        assert sizing.fit_of(cell) is not None and not plan.note
        assert (plan.placement.describe(), plan.accumulation, cell.accumulation, cell.micro_batch) == \
            ("1 CPU", 1, 1, None)


@pytest.mark.slow
def test_counting_on_fake_tensors_gives_the_saved_tensors_of_a_real_step():
    """The counted entries' method (benchmarks/measure_memory.py) on a GPT small enough to run for real."""
    import importlib.util
    from pathlib import Path

    import torch

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "measure_memory.py"
    spec_ = importlib.util.spec_from_file_location("measure_memory", path)
    measure_memory = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(measure_memory)
    cell = Cell.from_dict({"dataset": {"name": "pycorpus", "options": {"seq_len": 16}}, "model": "gpt",
                           "model_options": {"n_layer": 1, "n_head": 2, "n_embd": 16, "seq_len": 16},
                           "strategy": "blr", "batch_size": 8, "base_lr": 0.01, "base_batch": 8, "epochs": 1.0})
    assert not measure_memory.is_counted(cell)
    assert measure_memory.is_counted(load_grid("gpt124m-fineweb").cells()[0])
    counted = measure_memory.counted(cell)
    data, _, _ = measure_memory.synthetic(cell, 2, torch.Generator().manual_seed(0))
    model = measure_memory.build_model(cell, data)
    a, b = measure_memory.SAVED_AT
    for precision in ("fp32", "bf16"):
        real = [measure_memory.saved_bytes(model, cell, n, precision) for n in (a, b)]
        assert counted["saved_bytes_per_sample"][precision] == round((real[1] - real[0]) / (b - a)) > 0
        # live bytes at their peak: at least what the backward keeps
        assert counted["peak_bytes_per_sample"][precision] >= counted["saved_bytes_per_sample"][precision]
    assert counted["param_bytes"] == 4 * sum(p.numel() for p in model.parameters())


def test_the_paper_grid_on_16gib_gpus_uses_one_gpu_for_small_cells_and_accumulates_the_largest():
    """table2's ResNet-34 cells (batch 32 to 32768) on four 16 GiB GPUs: about 8 MiB an example in fp32."""
    grid = load_grid("table2-cifar10-resnet34").with_overrides(
        resources={"gpus": 4, "cpu": 16, "memory": "64Gi", "shm": "16Gi", "gpu_memory": "16Gi"})
    got = {c.batch_size: (p.world, p.accumulation) for c, p in zip(grid.cells(), grid.plans())}
    assert all(got[b] == (1, 1) for b in (32, 64, 128, 256, 512, 1024))
    assert got[2048] == (2, 1) and got[4096] == (4, 1)
    assert got[8192] == (4, 2) and got[16384] == (4, 4) and got[32768] == (4, 8)
    assert all(p.estimate <= 16 * GiB * sizing.USABLE for p in grid.plans())


def test_resources_scale_with_the_cells_gpus(table):
    grid = load_grid(spec(batch_size=[1024, 4096], backend="job"))
    pods = {c.batch_size: render.pod_specs(render.render_cell(grid, c))[0] for c in grid.cells()}
    small, big = (pods[b]["containers"][0]["resources"] for b in (1024, 4096))
    assert small == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi", "nvidia.com/gpu": 1}}
    assert big == {"requests": {"cpu": "16", "memory": "64Gi"}, "limits": {"memory": "64Gi", "nvidia.com/gpu": 4}}
    assert pods[1024]["containers"][0]["args"][1] == "--nproc-per-node=1"
    shm = {v["name"]: v for v in pods[1024]["volumes"]}["dshm"]["emptyDir"]["sizeLimit"]
    assert shm == "4Gi"


@pytest.mark.parametrize("quantity, share, cpu, expect", [
    (16, 0.25, True, 4), ("7500m", 0.5, True, "3750m"), (2, 1 / 3, True, "667m"),
    ("64Gi", 0.25, False, "16Gi"), ("1Gi", 1 / 3, False, 357913942), ("6Gi", 0.5, False, "3Gi"),
])
def test_scale_quantity(quantity, share, cpu, expect):
    assert sizing.scale_quantity(quantity, share, cpu=cpu) == expect


# ---- printed before anything is created -------------------------------------------------------------------


def write(raw):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cells_and_render_print_the_plan_to_stderr(table, capsys, tmp_path):
    path = write(spec(batch_size=[64, 8192]))
    assert cli.main(["cells", str(path)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2  # stdout keeps one line per cell
    lines = err.splitlines()
    assert lines[0] == ("plan of sweep size: 2 cells on up to 4 GPUs each, 16.0 GiB per device "
                        "(resources.gpu_memory 16Gi), 90% of it usable")
    assert lines[1].split() == ["CELL", "MODEL", "PRECISION", "BATCH", "DEVICES", "MICRO", "ACCUM", "EST/DEVICE",
                                "NOTE"]
    assert lines[2].split()[1:] == ["resnet34", "fp32", "64", "1", "GPU", "64", "1", "2.5", "GiB"]
    assert lines[3].split()[1:] == ["resnet34", "fp32", "8192", "4", "GPUs", "1024", "2", "10.0", "GiB"]
    assert cli.main(["render", str(path), "-o", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err.splitlines()[:4] == lines
