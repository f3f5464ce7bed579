"""The pure quantization report (`quantization_report`) on a bare module, without a Trainer."""

import importlib
import json
import re

import pytest
import torch
from helpers import REPO
from test_quantization import batches, tiny_net

from compresslight.compression import quantization, quantization_onnx
from compresslight.compression.quantization_report import (
    QuantizationReport,
    QuantizationReportOptions,
    has_fake_quant,
    quantization_report,
)

FAST = QuantizationReportOptions(int8=False, latency_batch_sizes=(1, 2), latency_warmup=0, latency_iters=2)


def labelled(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches labelled with the float model's own predictions: its top-1 is exactly 1."""
    with torch.no_grad():
        return [(x, model.eval()(x).argmax(1)) for x in batches(3, seed=5)]


def test_report_of_a_bare_module_measures_float_and_simulated_and_leaves_it_as_it_was(tmp_path):
    model = tiny_net()
    eval_batches = labelled(model)
    model.train()
    report = quantization_report(model, batches(2), eval_batches, tmp_path, FAST, split="test")
    assert model.training and not has_fake_quant(model)  # flags put back, no fake-quant layer left
    metrics = report.metrics
    assert metrics["quant/test_top1_float"] == 1.0
    assert 0.0 <= metrics["quant/test_top1_sim8"] <= 1.0
    assert metrics["quant/test_top1_drop_sim8"] == pytest.approx(1.0 - metrics["quant/test_top1_sim8"])
    assert {key for key in metrics if key.startswith("quant/latency_ms/")} == {
        f"quant/latency_ms/{name}/bs{size}" for name in ("torch_float", "torch_sim8") for size in (1, 2)
    }
    assert all(metrics[key] > 0 for key in metrics if key.startswith("quant/latency_ms/"))
    assert report.calibration_batches == 2 and report.calibration_images == 32 and report.files == {}
    assert report.top1() == {"float": 1.0, "sim8": metrics["quant/test_top1_sim8"]}
    assert json.loads(json.dumps(report.to_dict()))["metrics"] == metrics
    markdown = report.to_markdown()
    assert "| float | 1.0000 |" in markdown and "| torch_sim8 |" in markdown
    assert "post-training, 8 bits" in markdown
    # The two models alternated in rounds; the simulated one's speedup is paired over the float one.
    assert [s["candidate"] for s in report.speedups[2]] == ["torch_sim8"]
    assert report.speedups[2][0]["baseline"] == "torch_float" and report.speedups[2][0]["rounds"] == FAST.latency_rounds
    assert "bs2, paired speedup over torch_float: torch_sim8 " in markdown


def test_report_refuses_empty_calibration_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="`calibration_batches` is empty"):
        quantization_report(tiny_net(), [], labelled(tiny_net()), tmp_path, FAST)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bits=17), r"`bits` must be an integer in \[2, 16\], got 17"),
        (dict(latency_batch_sizes=(1, 0)), "`latency_batch_sizes` must be an int >= 1, got 0"),
        (dict(threads=0), "`threads` must be an int >= 1, got 0"),
    ],
)
def test_options_are_checked_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationReportOptions(**kwargs)


def test_markdown_of_a_report_read_back_from_its_numbers():
    report = QuantizationReport(
        split="val", bits=4, per_channel=True, qat=True, calibration_batches=1, calibration_images=8,
        eval_batches=None, metrics={"quant/val_top1_float": 0.5, "quant/val_top1_sim4": 0.25,
        "quant/val_top1_drop_sim4": 0.25}, latency={}, threads=1, files={}, seconds=0.5,
    )  # fmt: skip
    markdown = report.to_markdown()
    assert markdown.startswith("# Quantization (QAT, 4 bits, per channel)")
    assert "| float | 0.5000 |" in markdown and "| sim4 | 0.2500 |" in markdown
    assert "drop" not in markdown and "latency" not in markdown


def test_the_readme_reload_path_of_the_onnx_runtime_model_imports():
    readme = (REPO / "README.md").read_text()
    documented = re.search(r"`(compresslight\.[\w.]+)\.OnnxRuntimeModel\(path\)`", readme)
    assert documented is not None, "the README no longer says how to reload the ONNX files"
    assert importlib.import_module(documented.group(1)).OnnxRuntimeModel is quantization_onnx.OnnxRuntimeModel
    with pytest.raises(AttributeError, match="has no attribute 'export_onnx'"):
        quantization.export_onnx  # noqa: B018  (one exporter: profiling.backends.export_onnx)
