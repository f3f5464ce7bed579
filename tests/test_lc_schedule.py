"""The LC algorithm over a run's epochs, without a Trainer: options, the C-step schedule, layer
selection, the rank cost, and the report."""

import json

import pytest
import torch
from helpers import INPUT_SHAPE

from compresslight.compression.lc import FlopsCost, LowRankLC, StorageCost
from compresslight.compression.lc_schedule import (
    LCOptions,
    LCReport,
    RuntimeMeasurement,
    c_step_due,
    cpu_state_dict,
    make_cost,
    select_layers,
)
from compresslight.registry import create_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=4)


def test_c_steps_are_due_at_the_start_of_the_epoch_after_each_l_step(model):
    options = LCOptions(lam=1.0, cost="flops", mu_init=1e-2, mu_growth=2.0, steps=3, epochs_per_step=2)
    lc = LowRankLC(model, StorageCost(model), lam=1.0, mu_init=1e-2, mu_growth=2.0, steps=3)
    state = lc.init_state(model)
    assert options.lc_epochs == 6
    assert [c_step_due(options, state, epoch) for epoch in range(8)] == [False, False] + [True] * 6
    state.step = 2  # C steps 0 and 1 done: step 2 is due once epoch 6 starts, never more than T
    assert [c_step_due(options, state, epoch) for epoch in (5, 6, 9)] == [False, True, True]
    state.step = 3
    assert not c_step_due(options, state, 100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lam=True), r"`lam` must be a number >= 0, got True"),
        (dict(lam=float("nan")), r"`lam` must be a number >= 0, got nan"),
        (dict(lam=1.0, cost="ms"), r"`cost` must be one of \['runtime', 'flops', 'storage'\], got 'ms'"),
        (dict(lam=1.0, mu_init=-1), r"`mu_init` \(a of mu_t = a \* b\^t\) must be > 0, got -1"),
        (dict(lam=1.0, mu_growth=0.9), r"`mu_growth` \(b of mu_t = a \* b\^t\) must be >= 1 so mu grows, got 0.9"),
        (dict(lam=1.0, steps=True), r"`steps` must be an int >= 1, got True"),
        (dict(lam=1.0, epochs_per_step=0), r"`epochs_per_step` must be an int >= 1, got 0"),
        (dict(lam=1.0, tolerance="0"), r"`tolerance` must be >= 0, got '0'"),
        (
            dict(lam=1.0, cost="storage", runtime_model="rm.json"),
            r"needs `cost`='runtime' \(or a `latency_target`\), got cost='storage'",
        ),
    ],
)
def test_bad_options_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LCOptions(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(iters=0), r"`measure_iters` must be an int >= 1, got 0"),
        (dict(grid_points=1), r"`grid_points` must be an int >= 2, got 1"),
        (dict(batch_size=0), r"`batch_size` must be an int >= 1, got 0"),
        (dict(backend="tvm"), r"`backend` must be one of \['torch', 'onnxruntime'\] or None, got 'tvm'"),
        (dict(statistic="mean"), r"`statistic` must be one of \['median', 'min'\], got 'mean'"),
    ],
)
def test_bad_runtime_measurement_fails_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RuntimeMeasurement(**kwargs)


def test_select_layers_by_glob(model):
    assert select_layers(model, ["layer1.*"], ["layer1.2.*"]) == [
        f"layer1.{block}.conv{conv}" for block in (0, 1) for conv in (1, 2)
    ]
    assert select_layers(model, None, ["layer*"]) == ["conv1", "fc"]
    with pytest.raises(ValueError, match=r"`ignored_layers` pattern 'nothing' matches no compressible layer"):
        select_layers(model, None, ["nothing"])
    with pytest.raises(ValueError, match=r"leaves no layer to compress"):
        select_layers(model, ["fc"], ["f*"])
    with pytest.raises(ValueError, match=r"ReLU has no compressible layer"):
        select_layers(torch.nn.ReLU(), None, [])


def test_make_cost(model):
    inputs = torch.zeros(1, *INPUT_SHAPE)
    assert isinstance(make_cost("flops", model, inputs, ["fc"], None), FlopsCost)
    storage = make_cost("storage", model, inputs, ["fc"], None)
    assert storage.layer_costs("fc").dense == pytest.approx((64 * 4 + 4) / 1e6)
    with pytest.raises(ValueError, match=r"The cost 'runtime' needs a runtime model"):
        make_cost("runtime", model, inputs, ["fc"], None)


def test_report_of_a_run_round_trips_and_renders(model):
    # A lam at which some layers are factorized and some kept dense (storage in M params, random weights).
    lc = LowRankLC(model, StorageCost(model), lam=1e4, mu_init=1.0, mu_growth=2.0, steps=2)
    state = lc.init_state(model)
    report = LCReport()
    assert "No C step yet." in report.to_markdown()
    for epoch in (1, 2):
        entry = report.add_c_step(lc.c_step(model, state), epoch=epoch, global_step=10 * epoch)
        assert entry["event"] == "c_step" and entry["epoch"] == epoch and "predicted_network_ms" not in entry
        metrics = LCReport.metrics(entry)
        assert metrics["lc/mu"] == entry["mu"] and metrics["lc/rank/fc"] == entry["ranks"]["fc"]
    assert [entry["mu"] for entry in report.c_steps] == pytest.approx([1.0, 2.0])
    assert "Not factorized yet." in report.to_markdown()
    record = lc.compress(model, state)
    entry = report.add_factorization(record.ranks, state, epoch=2, global_step=20)
    assert entry["event"] == "factorize" and entry["c_steps"] == 2 and entry["ranks"] == record.ranks
    assert report.final_ranks and report.kept_dense
    assert set(report.final_ranks) | set(report.kept_dense) == set(lc.layer_names)

    again = LCReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report
    markdown = report.to_markdown()
    assert markdown.count("\n| ") == 2 + 2 + len(lc.layer_names)  # both tables: headers and rows
    assert "Factorized at the start of epoch 2, after all C steps." in markdown
    name, rank = next(iter(report.final_ranks.items()))
    assert f"| {name} | {rank} |" in markdown


def test_cpu_state_dict_holds_cpu_tensors(model):
    lc = LowRankLC(model, StorageCost(model), lam=1.0, mu_init=1.0, mu_growth=2.0, steps=1)
    state = lc.init_state(model)
    data = cpu_state_dict(state)
    assert all(tensor.device.type == "cpu" for tensor in data["thetas"].values())
    assert data["step"] == 0 and set(data["multipliers"]) == set(lc.layer_names)
