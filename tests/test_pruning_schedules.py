"""The pure schedule and latency-budget arithmetic behind `PruningCallback` (no Trainer)."""

from __future__ import annotations

import logging

import pytest
import torch

from compresslight.compression.latency_budget import MAX_CORRECTION, LatencyBudgetOptions, clipped_correction
from compresslight.compression.pruning import prune_filters
from compresslight.compression.pruning_graph import prunable_groups
from compresslight.compression.schedules import (
    PruningSchedule,
    agp_ramp,
    constant_ramp,
    final_group_ratios,
    step_ratios_toward,
)
from compresslight.registry import create_model


def test_ramps_end_at_the_target_and_agp_prunes_most_first():
    assert constant_ramp(4) == [0.25, 0.5, 0.75, 1.0]
    agp = agp_ramp(4)
    assert agp[-1] == 1.0 and agp == sorted(agp)
    increments = [b - a for a, b in zip([0.0, *agp], agp)]
    assert increments == sorted(increments, reverse=True)  # cubic: the first step is the largest
    assert agp[0] == pytest.approx(1 - 0.75**3)


def test_schedule_gives_each_pruning_epoch_its_fraction_and_none_elsewhere():
    schedule = PruningSchedule.build(start_epoch=2, end_epoch=6, frequency=2, ramp="agp")
    assert schedule.epochs == [2, 4, 6]
    first, second, last = agp_ramp(3)
    assert [schedule(epoch) for epoch in range(8)] == [None, None, first, None, second, None, last, None]
    assert PruningSchedule.build()(0) == 1.0  # one-shot before training by default
    explicit = PruningSchedule.build(epochs=[1, 3], targets=[0.4, 1.0])
    assert (explicit(1), explicit(3)) == (0.4, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(epochs=[1], start_epoch=0, end_epoch=2), "Give either `epochs` or `start_epoch`/`end_epoch`"),
        (dict(start_epoch=0, end_epoch=2, frequency=0), r"`frequency` must be >= 1, got 0"),
        (dict(epochs=[]), r"`epochs` must be increasing epochs >= 0, got \[\]"),
        (dict(epochs=[0, 1], targets=[1.0, 0.5]), r"`targets` must be 2 increasing fractions in \(0, 1\]"),
        (dict(epochs=[0, 1], ramp="linear"), r"`ramp` must be 'constant' or 'agp', got 'linear'"),
    ],
)
def test_bad_schedules_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningSchedule.build(**kwargs)


def test_steps_toward_the_final_ratios_land_on_the_original_widths_without_drift():
    model = create_model("resnet20", num_classes=4).eval()
    inputs = torch.randn(2, 3, 32, 32)
    groups = prunable_groups(model, inputs)
    final = final_group_ratios(model, groups, {"layer1.*.conv1": 0.5}, amount=None)
    assert final == {f"layer1.{i}.conv1": (16, 0.5) for i in range(3)}
    for goal in (0.5, 1.0):
        prune_filters(model, ratios=step_ratios_toward(model, final, goal), example_inputs=inputs)
        assert model.layer1[0].conv1.out_channels == int(16 * (1 - 0.5 * goal))
    assert step_ratios_toward(model, final, 1.0) == {}  # already there: nothing to prune


def test_final_ratios_refuse_unknown_patterns_and_split_groups():
    model = create_model("resnet20", num_classes=4).eval()
    groups = prunable_groups(model, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"`ratios` pattern 'layer9\.\*' matches no prunable layer"):
        final_group_ratios(model, groups, {"layer9.*": 0.5}, amount=None)
    with pytest.raises(ValueError, match="are coupled .* different ratios"):
        final_group_ratios(model, groups, {"layer1.0.conv2": 0.5, "layer1.1.conv2": 0.25}, amount=None)


def test_correction_is_the_prediction_error_clipped_per_step(caplog):
    assert clipped_correction(2.2, 2.0) == pytest.approx((1.1, 1.1))
    with caplog.at_level(logging.WARNING, logger="compresslight.compression.latency_budget"):
        error, correction = clipped_correction(10.0, 1.0)
    assert (error, correction) == (10.0, MAX_CORRECTION) and "clipped" in caplog.text
    assert clipped_correction(1.0, 10.0) == (0.1, 1 / MAX_CORRECTION)


def test_latency_budget_options_name_the_callback_arguments():
    with pytest.raises(ValueError, match=r"`latency_grid_points` must be an int >= 2, got 1"):
        LatencyBudgetOptions(target_speedup=2.0, grid_points=1)
    options = LatencyBudgetOptions(target_latency_ms=4.0, ignored_layers=("fc",))
    assert options.ignored_layers == ["fc"] and options.table_settings["statistic"] == "min"
