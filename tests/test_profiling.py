"""compresslight.profiling: counts against formulas, comparison math, JSON, restoring the model, errors."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compresslight.profiling import (
    Environment,
    LatencyEntry,
    LatencyStats,
    MemoryProfile,
    ModelProfile,
    ParameterCount,
    SideBySide,
    SideBySideReport,
    SpeedupReport,
    compare,
    counting,
    num_threads,
    profile,
    profile_and_report,
    read_report,
)

INPUT_SHAPE = (3, 8, 8)
FAST = dict(warmup=1, iters=3)


def tiny_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False),
        nn.Conv2d(8, 6, 1, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


class FunctionalHead(nn.Module):
    """A parent whose own forward does a matmul (MACs outside any leaf module)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.weight = nn.Parameter(torch.randn(7, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.conv(x).mean(dim=(2, 3)), self.weight)


def formula_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs per Conv2d/Linear by the textbook formula, from output shapes seen by forward hooks."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                macs[name] = output.numel() * module.in_channels // module.groups * kh * kw
            else:
                macs[name] = output.numel() * module.in_features

        return record

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for handle in handles:
        handle.remove()
    return macs


def test_macs_match_the_conv_and_linear_formula() -> None:
    model = tiny_net()
    result = profile(model, INPUT_SHAPE, measure_memory=False, **FAST)
    expected = formula_macs(model, INPUT_SHAPE)
    assert result.macs == sum(expected.values())
    assert result.flops == 2 * result.macs
    per_layer = {layer.name: layer.macs for layer in result.layers if layer.macs}
    assert per_layer == expected
    assert result.unattributed_macs == 0
    conv = next(layer for layer in result.layers if layer.name == "4")
    assert (conv.type, conv.params, conv.output_shape) == ("Conv2d", 8 * 6 + 6, [1, 6, 4, 4])


def test_macs_outside_leaf_modules_are_reported_as_unattributed() -> None:
    model = FunctionalHead()
    macs, layers, unattributed = counting.count_macs(model.eval(), torch.zeros(1, *INPUT_SHAPE))
    conv_macs = 4 * 6 * 6 * 3 * 3 * 3
    assert [(layer.name, layer.macs) for layer in layers] == [("conv", conv_macs)]
    assert unattributed == 4 * 7
    assert macs == conv_macs + 4 * 7


def test_parameter_counts_and_bytes() -> None:
    model = tiny_net()
    model[0].weight.requires_grad_(False)
    counts = counting.count_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    assert counts.total == total
    assert counts.trainable == total - model[0].weight.numel()
    assert counts.bytes == 4 * total
    assert counts.trainable_bytes == 4 * counts.trainable
    assert counts.buffers_bytes == 8 * 4 * 2 + 8  # running mean, running var (float32), num_batches_tracked (int64)


def test_activation_estimates_count_outputs_and_dedupe_saved_tensors() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batch = torch.randn(5, 8)
    assert counting.forward_activation_bytes(model, batch) == 4 * (5 * 16 + 5 * 16 + 5 * 4)
    # Linear saves its input and weight (excluded: input and parameter), ReLU its output; the
    # second Linear saves that same output again (one storage, counted once); sum saves nothing.
    assert counting.train_saved_bytes(model, batch, lambda out: out.sum()) == 4 * 5 * 16


def test_memory_profile_totals_and_cpu_measurement() -> None:
    model = tiny_net()
    result = profile(model, INPUT_SHAPE, batch_sizes=(2,), **FAST)
    memory = result.memory_at(2)
    static = memory.params_bytes + memory.buffers_bytes + memory.input_bytes
    assert memory.input_bytes == 2 * 3 * 8 * 8 * 4
    assert memory.inference_total_bytes == static + memory.forward_activations_bytes
    assert memory.train_total_bytes == static + memory.gradients_bytes + memory.train_saved_bytes
    assert memory.gradients_bytes == result.params.trainable_bytes
    assert memory.measured_with == "torch.profiler memory events"
    # A train step allocates at least the gradients on top of the static tensors.
    assert memory.measured_train_peak_bytes >= static + memory.gradients_bytes
    assert memory.measured_inference_peak_bytes > static


def test_latency_entries_per_batch_size_and_mode() -> None:
    result = profile(tiny_net(), INPUT_SHAPE, batch_sizes=(1, 3), threads=1, measure_memory=False, **FAST)
    keys = sorted((e.backend, e.mode, e.batch_size) for e in result.latency)
    assert keys == [("torch", "inference", 1), ("torch", "inference", 3), ("torch", "train", 1), ("torch", "train", 3)]
    entry = result.latency_of("train", 3)
    assert entry.stats.iters == 3 and entry.warmup == 1
    assert entry.stats.min_s <= entry.stats.median_s <= entry.stats.max_s
    assert entry.images_per_s == pytest.approx(3 / entry.stats.median_s)
    assert result.environment.threads == 1
    assert result.environment.backend_versions == {"torch": torch.__version__}
    assert result.environment.device == "cpu" and result.environment.device_name


def test_train_false_skips_train_measurements() -> None:
    result = profile(tiny_net(), INPUT_SHAPE, train=False, measure_memory=False, **FAST)
    assert [e.mode for e in result.latency] == ["inference"]
    assert result.memory[0].train_total_bytes is None


def test_profile_restores_the_model_and_the_rng() -> None:
    model = tiny_net()
    model.train()
    model[1].eval()  # a frozen batch norm inside a training model must stay frozen
    model[0].bias.requires_grad_(False)
    model[7].weight.grad = torch.ones_like(model[7].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)

    with num_threads(1):
        profile(model, INPUT_SHAPE, batch_sizes=(2,), threads=2, **FAST)
        assert torch.get_num_threads() == 1

    assert torch.equal(torch.rand(3), expected_draw)
    assert [m.training for m in model.modules()] == modes
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    assert torch.equal(model[7].weight.grad, torch.ones_like(model[7].weight))
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("7.weight"))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert all(p.device.type == "cpu" for p in model.parameters())


def make_profile(
    name: str,
    flops: int,
    params_bytes: int,
    train_total: int,
    latencies: dict[tuple[str, int], float],
    **environment_changes,
) -> ModelProfile:
    environment = Environment(
        device="cpu", device_name="Test CPU", threads=1, torch_version="2.13.0", backend_versions={"torch": "2.13.0"},
        hostname="host", platform="Linux", python_version="3.11.7",
    )  # fmt: skip
    memory = MemoryProfile(
        batch_size=1, params_bytes=params_bytes, buffers_bytes=0, input_bytes=0, forward_activations_bytes=0,
        train_saved_bytes=0, gradients_bytes=0, inference_total_bytes=params_bytes, train_total_bytes=train_total,
    )  # fmt: skip
    latency = [
        LatencyEntry(
            backend="torch",
            mode=mode,
            batch_size=batch_size,
            stats=LatencyStats(seconds, seconds, seconds, 3),
            warmup=1,
            images_per_s=batch_size / seconds,
        )  # fmt: skip
        for (mode, batch_size), seconds in latencies.items()
    ]
    return ModelProfile(
        name=name, input_shape=[3, 8, 8], environment=dataclasses.replace(environment, **environment_changes),
        params=ParameterCount(total=params_bytes // 4, trainable=params_bytes // 4, bytes=params_bytes,
                              trainable_bytes=params_bytes, buffers_bytes=0),
        macs=flops // 2, flops=flops, flop_counter="hand-made", layers=[], unattributed_macs=0, memory=[memory],
        latency=latency,
    )  # fmt: skip


def test_compare_computes_paper_ratios_exactly() -> None:
    baseline = make_profile("baseline", 1000, 400, 2000, {("inference", 1): 0.010, ("train", 1): 0.030})
    pruned = make_profile("pruned", 250, 100, 800, {("inference", 1): 0.004, ("train", 1): 0.015})
    report = compare(baseline, pruned)
    assert report.theoretical_speedup == 4.0
    assert report.params_compression == 4.0
    assert report.memory_at(1).train == 2.5
    assert report.memory_at(1).inference == 4.0
    inference, train = report.speedup("inference", 1), report.speedup("train", 1)
    assert inference.observed == pytest.approx(2.5)
    assert inference.observed_over_theoretical == pytest.approx(0.625)
    assert train.observed == pytest.approx(2.0)
    assert train.observed_over_theoretical == pytest.approx(0.5)
    assert report.environment_mismatch == []
    markdown = report.to_markdown()
    assert "| 1 | pruned | 4.00 | 2.50 | 4.00 | 2.50x / 2.00x |" in markdown
    assert "| 1 | pruned | 4.00 | 2.50 | 4.00 | 0.62 / 0.50 |" in markdown
    assert report.method == "two-time" and "**Two-time comparison**" in markdown
    assert "Observed speedup: Inference / Train (Test CPU (cpu, 1 thread), torch)" in markdown


def test_compare_takes_the_observed_speedup_from_the_side_by_side_measurement(tmp_path) -> None:
    # The two profiles disagree wildly (0.2x: measured at different times); the paired rounds do not.
    baseline = make_profile("baseline", 1000, 400, 2000, {("inference", 1): 0.002, ("train", 1): 0.030})
    pruned = make_profile("pruned", 250, 100, 800, {("inference", 1): 0.010, ("train", 1): 0.015})
    options = SideBySide(min_rounds=6, max_rounds=6)
    results = []
    for mode, (base_s, pruned_s) in {"inference": (2e-3, 1e-3), "train": (3e-2, 1.5e-2)}.items():
        calls = iter(range(100))
        latencies = {"baseline": base_s, "pruned": pruned_s}

        def timer(name: str, latencies=latencies, calls=calls) -> float:  # pruned 5% slower every other round
            return latencies[name] * (1.05 if name == "pruned" and next(calls) % 2 else 1.0)

        result = options.run(
            {"baseline": "baseline", "pruned": "pruned"}, "baseline", progress=False, timer=timer,
            setting={"device": "cpu", "threads": 1, "batch_size": 1, "backend": "torch", "mode": mode},
        )  # fmt: skip
        results.append(result)
    report = compare(baseline, pruned, side_by_side=SideBySideReport(results))
    assert report.method == "side-by-side"
    inference = report.speedup("inference", 1)
    assert inference.method == "side-by-side" and inference.rounds == 6
    assert inference.observed == pytest.approx(results[0].speedup_of("pruned").estimate)
    assert 1.9 < inference.low <= inference.observed <= inference.high <= 2.0 and inference.verdict == "faster"
    assert inference.observed_over_theoretical == pytest.approx(inference.observed / 4.0)
    markdown = report.to_markdown()
    assert f"{inference.label()} faster / " in markdown and "side by side" in markdown
    assert "Two-time" not in markdown
    assert SpeedupReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    assert report.plot(tmp_path / "speedup.png").read_bytes()[:4] == b"\x89PNG"  # with error bars
    # A side-by-side measurement without the setting leaves that speedup out rather than dividing two profiles.
    partial = compare(baseline, pruned, side_by_side=SideBySideReport(results[:1]))
    assert [s.mode for s in partial.speedups] == ["inference"]


def test_compare_skips_measurements_only_one_side_has_and_handles_zero_flops() -> None:
    baseline = make_profile("baseline", 1000, 400, 2000, {("inference", 1): 0.010, ("train", 1): 0.030})
    other = make_profile("other", 0, 400, 2000, {("inference", 1): 0.010})
    report = compare(baseline, other)
    assert [s.mode for s in report.speedups] == ["inference"]
    assert math.isnan(report.theoretical_speedup)
    assert "1.00x / –" in report.to_markdown()


@pytest.mark.parametrize(
    "change, difference",
    [({"threads": 2}, "threads: 1 vs 2"), ({"hostname": "elsewhere"}, "hostname"), ({"torch_version": "2.1"}, "torch")],
)
def test_compare_refuses_different_environments(change: dict, difference: str) -> None:
    baseline = make_profile("baseline", 1000, 400, 2000, {("inference", 1): 0.010})
    elsewhere = make_profile("pruned", 250, 100, 800, {("inference", 1): 0.004}, **change)
    with pytest.raises(ValueError, match=f"different environments.*{difference}.*allow_environment_mismatch"):
        compare(baseline, elsewhere)
    with pytest.warns(UserWarning, match="different environments"):
        report = compare(baseline, elsewhere, allow_environment_mismatch=True)
    assert any(difference in line for line in report.environment_mismatch)
    assert "**WARNING" in report.to_markdown()


def test_compare_refuses_different_input_shapes() -> None:
    baseline = make_profile("baseline", 1000, 400, 2000, {})
    other = dataclasses.replace(make_profile("other", 500, 400, 2000, {}), input_shape=[3, 16, 16])
    with pytest.raises(ValueError, match=r"input shape \[3, 16, 16\].*\[3, 8, 8\]"):
        compare(baseline, other)


def test_profile_and_report_json_round_trip(tmp_path) -> None:
    result = profile(tiny_net(), INPUT_SHAPE, batch_sizes=(1, 2), measure_memory=False, **FAST)
    assert ModelProfile.from_json(result.to_json()) == result
    assert ModelProfile.load(result.save(tmp_path / "p" / "profile.json")) == result
    assert json.loads(result.to_json())["flop_counter"].startswith("torch.utils.flop_counter.FlopCounterMode")
    report = compare(result, result)
    assert type(report).from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_profile_and_report_writes_the_run_files(tmp_path) -> None:
    pruned = tiny_net()
    pruned[3] = nn.Conv2d(8, 8, 1, groups=2, bias=False)
    markdown = profile_and_report(
        pruned, INPUT_SHAPE, baseline_model=tiny_net(), out_dir=tmp_path, threads=1, measure_memory=False,
        name="pruned", **FAST,
    )  # fmt: skip
    baselines, current, reports = read_report(tmp_path)
    assert [p.name for p in baselines] == ["baseline"] and [p.name for p in current] == ["pruned"]
    assert reports[0].theoretical_speedup == pytest.approx(baselines[0].flops / current[0].flops)
    assert (tmp_path / "profile.md").read_text() == markdown
    assert "Compression ratios and speedup" in markdown and "| 1 | pruned |" in markdown
    assert (tmp_path / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_profile_markdown_lists_layers_and_latency() -> None:
    result = profile(tiny_net(), INPUT_SHAPE, measure_memory=False, name="tiny", **FAST)
    markdown = result.to_markdown(max_layers=2)
    assert "FLOPs (2 x MACs)" in markdown
    assert "| torch | inference | 1 |" in markdown and "| torch | train | 1 |" in markdown
    assert markdown.count("| Conv2d |") == 2  # the two costliest layers only


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backends": ("torch", "tensorrt")}, "unknown backend 'tensorrt'"),
        ({"backends": ()}, "at least one"),
        ({"batch_sizes": (1, 0)}, r"`batch_sizes` must hold ints > 0, got 0"),
        ({"batch_sizes": (-4,)}, r"`batch_sizes` must hold ints > 0, got -4"),
        ({"device": "foo"}, "`device` must be a torch device.*'foo'"),
        ({"device": "cuda" if not torch.cuda.is_available() else "cuda:99"}, "`device` 'cuda"),
        ({"warmup": -1}, "`warmup` must be >= 0"),
        ({"iters": 0}, "`iters` must be >= 1"),
        ({"threads": 0}, "`threads` must be an int >= 1"),
    ],
)
def test_bad_arguments_are_refused_before_touching_the_model(kwargs: dict, message: str) -> None:
    model = tiny_net().train()
    with pytest.raises(ValueError, match=message):
        profile(model, INPUT_SHAPE, **kwargs)
    assert model.training


@pytest.mark.parametrize("shape", [(), (3, 0, 8), (3.0, 8, 8)])
def test_malformed_input_shape_is_refused(shape: tuple) -> None:
    with pytest.raises(ValueError, match="`input_shape` must be a non-empty sequence of positive ints"):
        profile(tiny_net(), shape)


def test_input_shape_the_model_rejects_names_shape_and_error() -> None:
    model = tiny_net().train()
    with pytest.raises(ValueError, match=r"`input_shape` \(4, 8, 8\) was rejected.*\(1, 4, 8, 8\) raised RuntimeError"):
        profile(model, (4, 8, 8))
    assert model.training


def test_num_threads_restores_on_error() -> None:
    with num_threads(1):
        with pytest.raises(RuntimeError, match="boom"), num_threads(2):
            assert torch.get_num_threads() == 2
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="`threads` must be an int >= 1"):
        with num_threads(-1):
            pass


@pytest.mark.slow
def test_onnxruntime_backend_measures_inference_only() -> None:
    result = profile(
        tiny_net(), INPUT_SHAPE, batch_sizes=(1, 2), threads=1, measure_memory=False,
        backends=("torch", "onnxruntime"), **FAST,
    )  # fmt: skip
    keys = sorted((e.backend, e.mode, e.batch_size) for e in result.latency)
    assert ("onnxruntime", "inference", 2) in keys and ("onnxruntime", "train", 1) not in keys
    assert len(keys) == 6
    assert "onnxruntime" in result.environment.backend_versions
