"""Optimizers by name, the batch-size rules beside the LR strategy, and the schedules (warm-up, wsd, linear)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from critbatch.jobs.cell.errors import ConfigError
from critbatch.jobs.cell.layout import cell_prefix
from critbatch.jobs.cell.optimizers import adam_sqrt, beta2_halflife, scaled_optimizer, wd_timescale
from critbatch.jobs.cell.spec import Cell
from critbatch.jobs.cli import main as cli_main
from critbatch.jobs.store import open_store
from critbatch.jobs.sweep import sizing
from critbatch.jobs.train.optimizers import build_optimizer, muon_split
from critbatch.jobs.train.strategies import lr_at, warmup_steps

BASE = {
    "dataset": {"name": "digits"}, "model": "digits_cnn", "strategy": "blr", "batch_size": 64,
    "base_lr": 0.01, "base_batch": 16, "epochs": 2, "sweep": "t", "eval": {"points": 4, "train_subset": 200},
    "noise": {"every": 0}, "max_steps": 12, "model_options": {"width": 8},
}


def cell(**over) -> Cell:
    return Cell.from_dict({**BASE, **over})


# ---- the rules, each against a hand computation (k = 64 / 16 = 4) -------------------------------------------


def test_adam_sqrt_by_hand():
    # (1 - 0.99) x 4 = 0.04 -> 0.96; (1 - 0.999) x 4 = 0.004 -> 0.996; 1e-8 / sqrt(4) = 5e-9
    beta1, beta2, eps = adam_sqrt(0.99, 0.999, 1e-8, 4.0)
    assert (beta1, beta2, eps) == pytest.approx((0.96, 0.996, 5e-9), rel=1e-12)


def test_beta2_halflife_keeps_the_half_life_in_examples():
    assert beta2_halflife(0.95, 4.0) == pytest.approx(0.81450625, rel=1e-12)  # 0.95^4
    # half-life in steps ln(0.5)/ln(beta2), times the batch: the same examples at m0 = 16 and m = 64
    steps0, steps = math.log(0.5) / math.log(0.95), math.log(0.5) / math.log(0.81450625)
    assert steps0 * 16 == pytest.approx(steps * 64, rel=1e-12)


def test_wd_timescale_holds_tau():
    # lambda_0 0.1, k 4, eta_0 1e-3, eta(m) 2e-3 (srsr): 0.1 x 4 x 1e-3 / 2e-3 = 0.2
    lam = wd_timescale(0.1, 4.0, 1e-3, 2e-3)
    assert lam == pytest.approx(0.2, rel=1e-12)
    n = 1000  # tau = m / (eta lambda n) is the same at m0 and m
    assert 16 / (1e-3 * 0.1 * n) == pytest.approx(64 / (2e-3 * lam * n), rel=1e-12)


def test_rules_reach_the_built_optimizer():
    c = cell(strategy="srsr", optimizer={"name": "adamw", "beta1": 0.99, "beta2": 0.999, "weight_decay": 0.1},
             rules=["adam_sqrt", "wd_timescale"])
    opt = build_optimizer(c, torch.nn.Linear(3, 2))
    group = opt.param_groups[0]
    # srsr: eta = eta_0 sqrt(4) = 2 eta_0, so wd_timescale gives 0.1 x 4 / 2 = 0.2
    assert group["betas"] == pytest.approx((0.96, 0.996), rel=1e-12)
    assert group["eps"] == pytest.approx(5e-9, rel=1e-12) and group["weight_decay"] == pytest.approx(0.2, rel=1e-12)
    muon = scaled_optimizer(cell(optimizer={"name": "muon", "adamw": {"beta2": 0.95}}).optimizer, ["beta2_halflife"],
                            4.0, 0.01, 0.01)
    assert muon.adamw.beta2 == pytest.approx(0.95**4, rel=1e-12)


def test_rules_are_in_the_id_only_when_listed():
    plain = cell(optimizer={"name": "adamw"})
    ruled = cell(optimizer={"name": "adamw"}, rules=["beta2_halflife"])
    assert "rules" not in json.loads(plain.canonical_json()) and plain.id != ruled.id


@pytest.mark.parametrize("over, message", [
    ({"rules": ["adam_sqrt"], "strategy": "srsr"}, r"rules\[0\]: 'adam_sqrt' does not apply to optimizer 'sgd'"),
    ({"rules": ["adam_sqrt"], "optimizer": {"name": "adamw"}}, r"rules: adam_sqrt scales the LR .* strategy 'blr'"),
    ({"rules": ["adam_sqrt", "beta2_halflife"], "optimizer": {"name": "adam"}, "strategy": "srsr"},
     "both set beta2"),
    ({"rules": ["adam_sqrt"], "optimizer": {"name": "adam", "beta1": 0.5}, "strategy": "srsr"},
     r"\(1 - beta\) x k must stay below 1"),
    ({"rules": ["lars"]}, r"rules\[0\]: unknown rules 'lars'; allowed: adam_sqrt, beta2_halflife, wd_timescale"),
    ({"optimizer": {"name": "lion"}}, "optimizer: unknown optimizer; allowed: sgd, adamw, adam, adafactor, muon"),
    ({"optimizer": {"name": "adamw", "momentum": 0.9}}, r"optimizer.momentum: unknown field; allowed: name, beta1"),
    ({"optimizer": {"name": "adamw", "beta2": 1.0}}, r"optimizer.beta2: 1.0 is outside \[0, 1\)"),
    ({"optimizer": {"name": "muon", "adamw": {"eps": 0.0}}}, "optimizer.adamw.eps: must be a positive number"),
])
def test_bad_optimizer_or_rule_names_the_field(over, message):
    with pytest.raises(ConfigError, match=message):
        cell(**over)


# ---- the optimizers, built and stepped -------------------------------------------------------------------------


def test_sgd_cell_json_is_what_it_was():
    """The four fields an SGD cell always had, in its canonical JSON; no field of the new ones."""
    data = json.loads(cell().canonical_json())
    assert data["optimizer"] == {"name": "sgd", "momentum": 0.9, "weight_decay": 0.0005, "nesterov": False}
    assert not {"rules", "warmup", "wsd", "tokens"} & set(data)
    assert cell(optimizer={"momentum": 0.5}).optimizer.name == "sgd"  # no name: SGD, as before


def test_muon_takes_the_hidden_matrices_only():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                torch.nn.Linear(16, 10))
    muon, other = muon_split(model)
    assert muon == ["1.weight"]  # not the embedding, not the head, not biases or norms
    assert other == ["0.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias"]


def test_state_copies_size_the_cell():
    """SGD's fixed bytes as before (4 copies of the weights); Adam's two moments add one more."""
    assert sizing.state_copies(cell()) == sizing.STATE_COPIES == 4
    assert sizing.state_copies(cell(optimizer={"name": "adamw"})) == 5


def _train(c: Cell, url: str) -> int:
    return cli_main(["train", "--cell", c.to_json(), "--store", url, "--progress", "none", "--threads", "1"])


@pytest.mark.parametrize("optimizer, lr", [({"name": "adamw"}, 0.003), ({"name": "adam"}, 0.003),
                                           ({"name": "adafactor"}, 0.03), ({"name": "muon", "ns_steps": 3}, 0.003)])
def test_each_optimizer_trains_a_cell(tmp_path, cpu_env, optimizer, lr):
    c = cell(optimizer=optimizer, base_lr=lr)
    url = str(tmp_path / "store")
    assert _train(c, url) == 0
    store = open_store(url)
    prefix = cell_prefix("t", c.id)
    done = json.loads(store.get_text(f"{prefix}/_SUCCESS"))
    record = json.loads(store.get_text(f"{prefix}/cell.json"))
    assert done["status"] == "done" and done["final"]["train_loss"] < 2.2  # from ln 10 = 2.30
    assert record["optimizer"]["name"] == optimizer["name"]
    if optimizer["name"] == "muon":
        split = record["derived"]["optimizer_split"]
        assert split["muon"] and all(name.endswith("weight") for name in split["muon"])
        assert set(split["muon"]).isdisjoint(split["adamw"])


def test_bad_optimizer_exits_2(tmp_path, cpu_env, capsys):
    bad = json.dumps({**BASE, "optimizer": {"name": "adamw", "beta1": 2}})
    assert cli_main(["train", "--cell", bad, "--store", str(tmp_path / "s"), "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.beta1: 2.0 is outside [0, 1)" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


# ---- schedules, by hand ----------------------------------------------------------------------------------------


def test_wsd_phases_by_hand():
    """100 steps, warm-up 10, decay the last 20 %: 0 -> peak over 10, flat to step 80, then down."""
    c = cell(decay="wsd", warmup={"steps": 10}, max_steps=100, epochs=100)
    peak = 0.01
    assert warmup_steps(c, 40) == 10
    assert lr_at(c, 0, 40) == pytest.approx(peak * 1 / 10) and lr_at(c, 9, 40) == pytest.approx(peak)
    assert lr_at(c, 10, 40) == lr_at(c, 79, 40) == peak
    assert lr_at(c, 80, 40) == pytest.approx(peak)  # the decay's first step: 1 - 0/20
    assert lr_at(c, 90, 40) == pytest.approx(peak * 0.5)  # linear: half-way
    assert lr_at(c, 99, 40) == pytest.approx(peak * 0.05)
    sqrt = cell(decay="wsd", wsd={"shape": "1-sqrt", "decay_fraction": 0.2}, max_steps=100, epochs=100)
    assert lr_at(sqrt, 90, 40) == pytest.approx(peak * (1 - math.sqrt(0.5)))
    assert lr_at(sqrt, 95, 40) == pytest.approx(peak * (1 - math.sqrt(0.75)))


def test_linear_decay_to_zero_by_hand():
    c = cell(decay="linear", max_steps=10, epochs=100)
    assert [lr_at(c, s, 40) for s in (0, 5, 9)] == pytest.approx([0.01, 0.005, 0.001])


def test_warmup_in_examples_and_tokens():
    # 640 examples at m = 64: 10 steps; lsr on top: the peak is 4 x eta_0
    c = cell(strategy="lsr", warmup={"examples": 640})
    assert warmup_steps(c, 40) == 10 and lr_at(c, 4, 40) == pytest.approx(0.04 * 5 / 10)
    with pytest.raises(ConfigError, match="warmup: give exactly one of steps, examples, tokens"):
        cell(warmup={"steps": 3, "examples": 4})
    with pytest.raises(ConfigError, match="warmup.tokens: 'digits' is not a token dataset"):
        cell(warmup={"tokens": 1000.0})
    with pytest.raises(ConfigError, match="warmup: lsr already warms up"):
        cell(strategy="lsr", warmup={"steps": 3}, warmup_epochs=1.0)


def test_bf16_step_with_a_non_finite_gradient_is_skipped_and_counted(tmp_path, cpu_env):
    """Mixed precision: the step whose gradient is poisoned leaves the weights as they were; _SUCCESS counts it."""
    from critbatch.jobs.data.datasets import load_task_data
    from critbatch.jobs.models.zoo import build_model
    from critbatch.jobs.store import LocalStore
    from critbatch.jobs.train.distributed import Dist
    from critbatch.jobs.train.trainer import Trainer

    class Poisoned(Trainer):
        seen: dict[int, torch.Tensor] = {}

        def _backward(self, *args, **kwargs):
            loss = super()._backward(*args, **kwargs)
            if self.step == 3:  # the 4th update: an overflow in one gradient
                next(iter(self.params)).grad[0].fill_(float("inf"))
            return loss

        def _update(self, *args, **kwargs):
            before = [p.detach().clone() for p in self.params]
            out = super()._update(*args, **kwargs)
            self.seen[self.step] = all(torch.equal(a, p) for a, p in zip(before, self.params))
            return out

    c = cell(precision="bf16", optimizer={"name": "adamw"}, max_steps=6)
    data = load_task_data(c, str(tmp_path))
    torch.manual_seed(0)
    trainer = Poisoned(c, LocalStore(tmp_path / "store"), data, build_model(c, data), torch.device("cpu"), Dist(),
                       flush_steps=100, flush_seconds=10.0, checkpoint_seconds=300.0, checkpoint_steps=0,
                       progress="none")
    summary = trainer.run()
    assert Poisoned.seen == {0: False, 1: False, 2: False, 3: True, 4: False, 5: False}
    assert summary["skipped_nonfinite_steps"] == 1 and summary["status"] == "done"
