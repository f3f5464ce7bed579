"""The side-by-side measurement: statistics on scripted timings, stopping rules, load records, models."""

import itertools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from compresslight.profiling.load import LoadMonitor, MachineLoad
from compresslight.profiling.side_by_side import (
    BUDGET_SPENT,
    FASTER,
    MAX_ROUNDS,
    NARROW_ENOUGH,
    NOT_DISTINGUISHABLE,
    SLOWER,
    SideBySide,
    SideBySideReport,
    compare_models,
    paired_speedup,
)


def scripted_timer(latencies: dict[str, float], noise: float = 0.0, seed: int = 0, load: float = 0.0):
    """A `timer` for `SideBySide.run` whose contenders are their names: each call returns the
    contender's latency times lognormal noise, times a machine slowdown that changes every round
    (`load`: each round draws a factor in [1, 1 + load] that applies to every contender alike)."""
    rng = np.random.default_rng(seed)
    calls = itertools.count()
    state = {"factor": 1.0}

    def timer(name: str) -> float:
        if next(calls) % len(latencies) == 0:
            state["factor"] = 1.0 + load * rng.random()
        return latencies[name] * state["factor"] * float(np.exp(noise * rng.standard_normal()))

    return timer


def run(latencies: dict[str, float], options: SideBySide, **timer_kwargs):
    contenders = {name: name for name in latencies}  # the scripted timer maps a name to its latency
    return options.run(contenders, "baseline", progress=False, timer=scripted_timer(latencies, **timer_kwargs))


def test_a_known_ratio_is_recovered_under_noise_and_round_to_round_load():
    options = SideBySide(min_rounds=10, max_rounds=10, target_width=None, time_budget_s=None)
    # The machine is up to 3x slower in some rounds: a two-time ratio could land anywhere in
    # [1/3, 3] x 1.6; paired rounds cancel it. A 95% interval may miss now and then: over 20
    # independent measurements it must cover the truth at least 17 times.
    covered = 0
    for seed in range(20):
        result = run({"baseline": 1.6e-3, "pruned": 1.0e-3}, options, noise=0.03, load=2.0, seed=seed)
        speedup = result.speedup_of("pruned")
        assert speedup.rounds == 10 and result.rounds == 10
        assert speedup.estimate == pytest.approx(1.6, rel=0.04)
        assert speedup.verdict == FASTER
        covered += speedup.low <= 1.6 <= speedup.high
    assert covered >= 17
    assert speedup.label() == f"{speedup.estimate:.2f}x [{speedup.low:.2f}, {speedup.high:.2f}]"


def test_equal_models_are_not_distinguishable_and_a_2x_slower_one_is_slower():
    options = SideBySide(min_rounds=8, max_rounds=8, target_width=None, time_budget_s=None)
    result = run({"baseline": 1e-3, "same": 1e-3, "twice as slow": 2e-3}, options, noise=0.05, load=1.0)
    same, slow = result.speedup_of("same"), result.speedup_of("twice as slow")
    assert same.verdict == NOT_DISTINGUISHABLE and same.low < 1.0 < same.high
    assert slow.verdict == SLOWER and slow.high < 1.0
    assert slow.estimate == pytest.approx(0.5, rel=0.05)


def test_paired_speedup_matches_numpy_and_validates():
    base, cand = [2.0, 4.0, 3.0, 2.2], [1.0, 2.5, 1.5, 1.0]
    speedup = paired_speedup(base, cand, confidence=0.9)
    assert speedup.estimate == pytest.approx(math.exp(np.mean(np.log(np.divide(base, cand)))))
    assert speedup.round_speedups == pytest.approx(list(np.divide(base, cand)))
    assert min(speedup.round_speedups) <= speedup.low <= speedup.estimate <= speedup.high <= max(speedup.round_speedups)
    assert speedup.baseline_median_s == pytest.approx(np.median(base))
    # The same seed gives the same interval: reports are reproducible.
    assert paired_speedup(base, cand, confidence=0.9).to_dict() == speedup.to_dict()
    with pytest.raises(ValueError, match="at least 2 paired rounds, got 1"):
        paired_speedup([1.0], [1.0])
    with pytest.raises(ValueError, match="paired lists of equal length"):
        paired_speedup([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="Latencies must be > 0 seconds"):
        paired_speedup([1.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"`confidence` must be in \(0, 1\), e.g. 0.95, got 95"):
        paired_speedup([1.0, 2.0], [1.0, 2.0], confidence=95)


def test_stops_when_the_interval_is_narrow_enough():
    options = SideBySide(min_rounds=4, max_rounds=50, target_width=0.05, time_budget_s=None)
    result = run({"baseline": 2e-3, "fast": 1e-3}, options, noise=0.005)
    assert result.stopped_because == NARROW_ENOUGH
    assert result.rounds == 4  # noise this low: narrow at the first chance
    noisy = run({"baseline": 2e-3, "fast": 1e-3}, options, noise=0.05)
    assert noisy.stopped_because == NARROW_ENOUGH and 4 < noisy.rounds < 50
    assert noisy.speedup_of("fast").relative_width <= 0.05


def test_stops_when_the_time_budget_is_spent_or_at_max_rounds():
    rng = np.random.default_rng(0)

    def slow_timer(name: str) -> float:
        time.sleep(0.01)
        return 1e-3 * (1.0 + 0.5 * rng.random())  # continuous noise: the interval never shrinks to 0.1%

    options = SideBySide(min_rounds=2, max_rounds=1000, target_width=0.001, time_budget_s=0.2)
    result = options.run({"baseline": "baseline", "other": "other"}, "baseline", progress=False, timer=slow_timer)
    assert result.stopped_because == BUDGET_SPENT
    assert 0.2 <= result.elapsed_s < 1.0 and 2 <= result.rounds < 20
    capped = run({"baseline": 1e-3, "other": 1e-3}, SideBySide(min_rounds=3, max_rounds=3), noise=0.2)
    assert capped.stopped_because == MAX_ROUNDS and capped.rounds == 3


def test_rounds_alternate_the_order_of_the_contenders():
    order = []

    def timer(name: str) -> float:
        order.append(name)
        return 1e-3

    options = SideBySide(min_rounds=3, max_rounds=3)
    options.run({"a": "a", "b": "b", "c": "c"}, "a", progress=False, timer=timer)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_rounds": 1}, r"`min_rounds` must be an int >= 2, got 1"),
        ({"min_rounds": 5, "max_rounds": 4}, r"`max_rounds` must be an int >= `min_rounds` \(5\), got 4"),
        ({"target_width": 0}, r"`target_width` must be None or a number > 0, got 0"),
        ({"time_budget_s": -1.0}, r"`time_budget_s` must be None or a number > 0, got -1.0"),
        ({"iters": 0}, r"`iters` must be an int >= 1, got 0"),
        ({"confidence": 1.0}, r"`confidence` must be in \(0, 1\)"),
        ({"busy_threshold": 0.0}, r"`busy_threshold` must be in \(0, 1\]"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SideBySide(**kwargs)


def test_run_rejects_a_single_contender_or_an_unknown_baseline():
    with pytest.raises(ValueError, match="at least two calls to compare"):
        SideBySide().run({"a": lambda: None}, "a")
    with pytest.raises(ValueError, match=r"`baseline` must be one of the contenders \['a', 'b'\], got 'c'"):
        SideBySide().run({"a": lambda: None, "b": lambda: None}, "c")


def busy_loop_process(seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"]
    )


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc (Linux)")
def test_load_monitor_sees_a_competing_process_and_flags_the_machine_busy():
    monitor = LoadMonitor(busy_threshold=0.2).start()
    competitor = busy_loop_process(0.8)
    competitor.wait()
    load = monitor.stop()
    assert load.other_cpu_s is not None and load.other_cpu_s >= 0.4
    assert load.other_cpu_share >= 0.4 / (load.wall_s * load.cpu_count)
    assert load.busy and load.summary().startswith("BUSY")
    assert load.own_cpu_s < 0.3  # waiting is not working
    assert MachineLoad.from_dict(json.loads(json.dumps(load.to_dict()))) == load


def test_a_busy_measurement_is_flagged_in_the_report():
    options = SideBySide(min_rounds=2, max_rounds=2, busy_threshold=0.01)
    competitor = busy_loop_process(1.0)
    try:

        def timer(name: str) -> float:
            time.sleep(0.2)
            return 1e-3

        result = options.run({"baseline": "b", "other": "o"}, "baseline", progress=False, timer=timer)
    finally:
        competitor.wait()
    report = SideBySideReport([result])
    assert report.busy and result.load.busy
    assert "**Measured on a busy machine** (1 of 1 settings)" in report.to_markdown()
    assert SideBySideReport.from_dict(json.loads(json.dumps(report.to_dict()))).to_dict() == report.to_dict()


class Wide(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).mean(dim=(2, 3)))


def test_compare_models_measures_every_setting_and_leaves_the_models_as_they_were():
    torch.manual_seed(0)
    small, large = Wide(4), Wide(64).train()
    norm_before = {k: v.clone() for k, v in large.norm.state_dict().items()}
    options = SideBySide(warmup=1, iters=3, min_rounds=3, max_rounds=3)
    report = compare_models(
        {"large": large, "small": small}, (3, 16, 16), "large", batch_sizes=(1, 4), threads=(1,), options=options,
        progress=False,
    )  # fmt: skip
    settings = [(r.setting["batch_size"], r.setting["mode"]) for r in report.results]
    assert settings == [(1, "inference"), (1, "train"), (4, "inference"), (4, "train")]
    for result in report.results:
        assert result.setting["threads"] == 1 and result.setting["device"] == "cpu" and result.rounds == 3
        speedup = result.speedup_of("small")
        assert speedup.low <= speedup.estimate <= speedup.high
    assert report.find("small", batch_size=4, mode="train").estimate > 1.0  # 16x fewer channels
    assert large.training and small.training  # modes as they were (both built in train mode)
    assert all(torch.equal(v, norm_before[k]) for k, v in large.norm.state_dict().items())
    assert all(p.grad is None for p in large.parameters())
    markdown = report.to_markdown()
    assert "| speedup [95% CI] | verdict |" in markdown and "x [" in markdown
    with pytest.raises(ValueError, match=r"`baseline` must be one of \['large', 'small'\], got 'x'"):
        compare_models({"large": large, "small": small}, (3, 16, 16), "x")
    with pytest.raises(ValueError, match=r"`modes` must be a non-empty list of \['inference', 'train'\]"):
        compare_models({"large": large, "small": small}, (3, 16, 16), "large", modes=("eval",))
