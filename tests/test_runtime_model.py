"""Device runtime model (paper 003 section 2): l1 fit, measurement, persistence, compatibility."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compresslight.compression.runtime_model import RuntimeModel, l1_line_fit

FAST = {"grid_points": 3, "warmup": 1, "iters": 3, "threads": 1}


def tiny_net(width: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width),  # depthwise: not modelled
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 5),
    )


@pytest.fixture(scope="module")
def runtime_model() -> RuntimeModel:
    torch.manual_seed(0)
    return RuntimeModel.build(tiny_net(), torch.randn(1, 3, 8, 8), **FAST)


def test_l1_fit_ignores_outliers() -> None:
    ranks = np.arange(1, 21, dtype=float)
    latencies = 2e-4 + 5e-6 * ranks
    noisy = latencies.copy()
    noisy[[3, 9, 15]] *= 5.0  # three measurements hit by a noisy neighbour
    intercept, slope = l1_line_fit(ranks, noisy)
    assert intercept == pytest.approx(2e-4, rel=1e-6)
    assert slope == pytest.approx(5e-6, rel=1e-6)
    # A least-squares line is pulled far off by the same outliers: the robustness is real.
    ls_slope, ls_intercept = np.polyfit(ranks, noisy, 1)
    assert abs(ls_intercept - 2e-4) > 1e-5 or abs(ls_slope - 5e-6) > 1e-6


def test_l1_fit_single_rank_and_errors() -> None:
    assert l1_line_fit([4, 4, 4], [1.0, 3.0, 2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError, match="`x` and `y` must be 1-D of the same non-zero length"):
        l1_line_fit([1, 2], [1.0])


def test_build_measures_every_compressible_layer(runtime_model: RuntimeModel) -> None:
    assert list(runtime_model.layers) == ["0", "2", "7"]
    conv = runtime_model.layers["2"]
    assert conv.max_rank == 24 and conv.ranks == [1, 12, 24]
    assert conv.input_shape == [1, 8, 8, 8]
    assert len(conv.latencies_s) == 3 and all(t > 0 for t in conv.latencies_s)
    assert conv.dense_s > 0 and runtime_model.network_dense_s > 0
    env = runtime_model.environment
    assert (env.backend, env.device, env.threads, env.batch_size) == ("torch", "cpu", 1, 1)
    assert env.torch_version == torch.__version__


def test_predict_is_the_sum_of_layer_models(runtime_model: RuntimeModel) -> None:
    layers = runtime_model.layers
    ranks = {"0": 3, "2": 10}
    expected = (
        max(layers["0"].intercept_s + 3 * layers["0"].slope_s, 0.0)
        + max(layers["2"].intercept_s + 10 * layers["2"].slope_s, 0.0)
        + layers["7"].dense_s
    )
    assert runtime_model.predict(ranks) == pytest.approx(expected)
    assert runtime_model.predict({}) == pytest.approx(sum(layer.dense_s for layer in layers.values()))
    assert runtime_model.predict_network({}) == pytest.approx(runtime_model.network_dense_s)
    with pytest.raises(ValueError, match=r"Rank of layer '2' must be in \[1, 24\], got 25"):
        runtime_model.predict({"2": 25})
    with pytest.raises(ValueError, match="does not hold: \\['9'\\]"):
        runtime_model.predict({"9": 1})


def test_layer_costs_are_milliseconds_over_all_ranks(runtime_model: RuntimeModel) -> None:
    costs = runtime_model.layer_costs("2")
    layer = runtime_model.layers["2"]
    assert costs.factorized.shape == (25,)
    assert costs.factorized[10] == pytest.approx(max(layer.intercept_s + 10 * layer.slope_s, 0) * 1e3)
    assert costs.dense == pytest.approx(layer.dense_s * 1e3)
    with pytest.raises(ValueError, match="Layer '4' is not in the runtime model"):
        runtime_model.layer_costs("4")


def test_rank_grid_and_layers_arguments() -> None:
    model = tiny_net()
    built = RuntimeModel.build(
        model, torch.randn(1, 3, 8, 8), layers=["2"], rank_grid={"2": [2, 5, 5, 20]}, statistic="min", **FAST
    )
    assert list(built.layers) == ["2"] and built.layers["2"].ranks == [2, 5, 20]
    assert built.environment.statistic == "min"
    # The fingerprint still covers the whole architecture.
    assert list(built.architecture) == ["0", "2", "7"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"rank_grid": {"2": [1, 25]}},
            r"`rank_grid\['2'\]` must hold ranks within \[1, 24\] \(the layer's dimensions\), got \[1, 25\]",
        ),
        ({"rank_grid": {"2": [0, 3]}}, r"`rank_grid\['2'\]` must hold ranks within \[1, 24\]"),
        ({"rank_grid": {"4": [1, 2]}}, "`rank_grid` names '4', which is not a modelled layer"),
        ({"layers": ["4"]}, r"`layers` must name compressible layers of the model \['0', '2', '7'\], got \['4'\]"),
        ({"grid_points": 1}, "`grid_points` must be an int >= 2"),
        ({"backend": "tvm"}, r"`backend` must be one of \['torch', 'onnxruntime'\], got 'tvm'"),
        ({"batch_size": 0}, "`batch_size` must be an int >= 1, got 0"),
        ({"threads": 0}, "`threads` must be an int >= 1 or None, got 0"),
        ({"statistic": "mean"}, r"`statistic` must be one of \['median', 'min'\], got 'mean'"),
    ],
)
def test_build_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    arguments = {**FAST, **kwargs}
    with pytest.raises(ValueError, match=message):
        RuntimeModel.build(tiny_net(), torch.randn(1, 3, 8, 8), **arguments)


def test_json_round_trip(runtime_model: RuntimeModel, tmp_path: Path) -> None:
    path = tmp_path / "rm.json"
    runtime_model.save(path)
    data = json.loads(path.read_text())
    assert data["environment"]["device_name"] == runtime_model.environment.device_name
    assert data["architecture"]["2"]["out_channels"] == 8
    loaded = RuntimeModel.load(path)
    assert loaded.to_dict() == runtime_model.to_dict()
    assert loaded.predict({"0": 2, "2": 7}) == runtime_model.predict({"0": 2, "2": 7})
    np.testing.assert_array_equal(loaded.layer_costs("2").factorized, runtime_model.layer_costs("2").factorized)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist; build one"):
        RuntimeModel.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        RuntimeModel.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"format_version": 0}))
    with pytest.raises(ValueError, match="`format_version` must be 1, got 0"):
        RuntimeModel.load(tmp_path / "old.json")


def test_check_compatible_accepts_the_measured_setting(runtime_model: RuntimeModel) -> None:
    runtime_model.check_compatible(
        tiny_net(), example_inputs=torch.randn(2, 3, 8, 8), device="cpu", threads=1, backend="torch", batch_size=1
    )


def test_check_compatible_refuses_another_architecture(runtime_model: RuntimeModel) -> None:
    with pytest.raises(ValueError, match=r"another architecture: layer '2' differs .*'out_channels': \(8, 16\)"):
        runtime_model.check_compatible(_wider_middle())
    with pytest.raises(ValueError, match=r"another architecture: layers \['7'\] are missing"):
        runtime_model.check_compatible(tiny_net()[:6])
    with pytest.raises(
        ValueError, match=r"other input shapes: layer '0' had inputs \[3, 8, 8\] per sample, got \[3, 16, 16\]"
    ):
        runtime_model.check_compatible(tiny_net(), example_inputs=torch.randn(1, 3, 16, 16))


def _wider_middle() -> nn.Sequential:
    model = tiny_net()
    model[2] = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    model[4] = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    model[7] = nn.Linear(16, 5)
    return model


def test_check_compatible_refuses_another_device_or_setting(runtime_model: RuntimeModel) -> None:
    other = RuntimeModel.from_dict(runtime_model.to_dict())
    other.environment = dataclasses.replace(other.environment, device_name="ARM Cortex-A57")
    with pytest.raises(
        ValueError, match=r"measured on device 'cpu' \(ARM Cortex-A57\), not on 'cpu' \(.+\); build one on this device"
    ):
        other.check_compatible(tiny_net(), device="cpu")
    with pytest.raises(ValueError, match="measured with threads=1, not threads=2"):
        runtime_model.check_compatible(tiny_net(), threads=2)
    with pytest.raises(ValueError, match="measured with backend='torch', not backend='onnxruntime'"):
        runtime_model.check_compatible(tiny_net(), backend="onnxruntime")
    with pytest.raises(ValueError, match="measured with batch_size=1, not batch_size=8"):
        runtime_model.check_compatible(tiny_net(), batch_size=8)


def test_evaluate_measures_random_configurations(runtime_model: RuntimeModel) -> None:
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = runtime_model.evaluate(model, n_samples=3, seed=1)
    assert len(result.configurations) == len(result.predicted_s) == len(result.measured_s) == 3
    for ranks in result.configurations:
        assert all(1 <= ranks[name] <= runtime_model.layers[name].max_rank for name in ranks)
    assert result.predicted_s[0] == pytest.approx(runtime_model.predict_network(result.configurations[0]))
    assert all(t > 0 for t in result.measured_s) and result.dense_measured_s > 0
    assert result.dense_built_s == runtime_model.network_dense_s
    assert result.mean_absolute_error_s == pytest.approx(
        np.mean(np.abs(np.subtract(result.predicted_s, result.measured_s)))
    )
    assert set(result.to_dict()) >= {"mean_absolute_error_s", "mean_relative_error", "configurations"}
    # Side by side with the dense network: paired speedups with intervals, compared with the predicted ones.
    assert len(result.measured_speedup) == 3
    for low, estimate, high in zip(result.measured_speedup_low, result.measured_speedup, result.measured_speedup_high):
        assert 0 < low <= estimate <= high
    predicted_speedup = [runtime_model.network_dense_s / p for p in result.predicted_s]
    assert result.predicted_speedup == pytest.approx(predicted_speedup)
    assert result.mean_speedup_error == pytest.approx(
        np.mean(np.abs(np.subtract(predicted_speedup, result.measured_speedup)) / result.measured_speedup)
    )
    # Same seed, same configurations; the model is not modified.
    assert runtime_model.evaluate(model, n_samples=3, seed=1).configurations == result.configurations
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[0], nn.Conv2d)
    with pytest.raises(ValueError, match="`n_samples` must be an int >= 1, got 0"):
        runtime_model.evaluate(model, n_samples=0)
    with pytest.raises(ValueError, match="`min_rounds` must be an int >= 2, got 1"):
        runtime_model.evaluate(model, n_samples=1, rounds=1)
    with pytest.raises(ValueError, match="another architecture"):
        runtime_model.evaluate(_wider_middle(), n_samples=1)


@pytest.mark.slow
def test_onnxruntime_backend() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    built = RuntimeModel.build(
        model, torch.randn(1, 3, 8, 8), backend="onnxruntime", grid_points=2, warmup=1, iters=3, threads=1
    )
    assert built.environment.backend == "onnxruntime" and built.environment.onnxruntime_version
    assert built.layers["0"].ranks == [1, 9] and built.layers["0"].dense_s > 0
