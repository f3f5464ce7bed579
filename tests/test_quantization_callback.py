"""QuantizationCallback in real Trainer runs: post-training simulated quantization at fit end and at
test start (float vs simulated accuracy, batches through the datamodule's transform), the int8 ONNX
model reloaded in a new process, QAT in the last epochs with a checkpoint that reloads, and bad input."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from compresslight.callbacks.quantization import QuantizationCallback
from compresslight.datamodules.base import VisionDataModule
from helpers import INPUT_SHAPE, TESTS_DIR, classifier, run_ddp_script, run_python, tiny_loaders, tiny_trainer
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from compresslight.classifier import ImageClassifier
from compresslight.compression.quantization import ActivationQuantizer, FakeQuantConv2d
from compresslight.evaluation import evaluate_top1

FAST = dict(calibration_batches=2, int8=False, latency_batch_sizes=[])


class TinyImageDataModule(VisionDataModule):
    """32 raw uint8 images, normalized (and, for training, flipped) by the base batch transform:
    the model never sees them unless they went through `on_after_batch_transfer`."""

    num_classes = 4
    input_shape = INPUT_SHAPE
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self) -> None:
        super().__init__(
            batch_size=8, eval_batch_size=8, num_workers=0, pin_memory=False, shuffle=True, drop_last=False,
            augment=True, seed=0,
        )  # fmt: skip
        self.stages: list[str | None] = []

    def setup(self, stage: str | None = None) -> None:
        self.stages.append(stage)
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 4, (32,), generator=generator)
        noise = torch.rand(32, *INPUT_SHAPE, generator=generator) * 100
        self.images = (noise + 50 * self.labels.view(-1, 1, 1, 1)).to(torch.uint8)

    def train_dataloader(self):
        return self._tensor_loader(self.images, self.labels, train=True)

    def val_dataloader(self):
        return self._tensor_loader(self.images, self.labels, train=False)

    def test_dataloader(self):
        return self.val_dataloader()


def fake_quant_layers(module: nn.Module) -> list[str]:
    return [name for name, layer in module.named_modules() if isinstance(layer, FakeQuantConv2d)]


def test_fit_end_logs_float_and_simulated_accuracy_and_keeps_the_model_float(tmp_path):
    quantization = QuantizationCallback(bits=8, **FAST)
    model = classifier()
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=1.0, callbacks=[quantization], logger=logger)
    trainer.fit(model, datamodule=TinyImageDataModule())  # uint8 batches: calibration must normalize them

    results = quantization.results
    assert set(results) == {"quant/val_top1_float", "quant/val_top1_sim8", "quant/val_top1_drop_sim8"}
    assert 0 <= results["quant/val_top1_sim8"] <= 1
    # 8 bits barely moves a model's predictions; the drop is what the key says.
    assert abs(results["quant/val_top1_drop_sim8"]) <= 0.1
    assert results["quant/val_top1_drop_sim8"] == pytest.approx(
        results["quant/val_top1_float"] - results["quant/val_top1_sim8"]
    )
    # The float accuracy is the model's own on the validation set, batches as the Trainer makes them.
    val_top1 = trainer.validate(model, datamodule=TinyImageDataModule(), verbose=False)[0]["val/top1"]
    assert results["quant/val_top1_float"] == pytest.approx(val_top1)
    # Post-training quantization works on a copy: the trained model stays float and trainable.
    assert not fake_quant_layers(model) and model.compression_records == []
    assert model.training and all(p.requires_grad for p in model.parameters())
    report = json.loads((Path(logger.log_dir) / "quantization.json").read_text())
    assert report["metrics"] == results and report["qat"] is False and report["calibration_images"] == 16
    logged = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "quant/val_top1_float" in logged and "quant/val_top1_sim8" in logged


def test_test_start_quantizes_with_training_calibration_and_matches_test_metrics(tmp_path):
    quantization = QuantizationCallback(bits=4, per_channel=True, stages=["test"], **FAST)
    datamodule = TinyImageDataModule()
    trainer = tiny_trainer(tmp_path, callbacks=[quantization])
    test_top1 = trainer.test(classifier(), datamodule=datamodule, verbose=False)[0]["test/top1"]
    assert "fit" in datamodule.stages  # calibration needs the training split, which `test` does not set up
    assert quantization.results["quant/test_top1_float"] == pytest.approx(test_top1)
    assert "quant/test_top1_sim4" in quantization.results


def test_without_training_data_in_test_the_error_says_what_is_missing(tmp_path):
    _, val = tiny_loaders()
    trainer = tiny_trainer(tmp_path, callbacks=[QuantizationCallback(**FAST)])
    with pytest.raises(ValueError, match="calibrates on training batches but the Trainer has no train dataloader"):
        trainer.test(classifier(), val, verbose=False)


def test_stages_select_when_to_report(tmp_path):
    quantization = QuantizationCallback(stages=["test"], **FAST)
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[quantization])
    trainer.fit(classifier(), *tiny_loaders())
    assert quantization.results == {}


def test_qat_in_last_epoch_trains_fake_quant_and_checkpoint_reloads(tmp_path):
    class Watcher(Callback):
        # After the QuantizationCallback in the list: sees the model right after the swap.
        fake_quant_per_epoch: list[int] = []
        quantizing_in_qat_epoch = False

        def on_train_epoch_start(self, trainer, pl_module):
            self.weight_at_start = pl_module.model.layer1[0].conv1.weight.detach().clone()
            quantizers = [m for m in pl_module.modules() if isinstance(m, ActivationQuantizer)]
            self.quantizing_in_qat_epoch = bool(quantizers) and all(q.fake_quant_enabled for q in quantizers)

        def on_train_epoch_end(self, trainer, pl_module):
            self.fake_quant_per_epoch = [*self.fake_quant_per_epoch, len(fake_quant_layers(pl_module.model))]
            self.moved = not torch.equal(self.weight_at_start, pl_module.model.layer1[0].conv1.weight)

    quantization = QuantizationCallback(qat_epochs=1, **FAST)
    watcher = Watcher()
    model = classifier()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[quantization, watcher])
    trainer.fit(model, *tiny_loaders())

    # Epoch 0 float, epoch 1 (= max_epochs - qat_epochs) with every conv fake-quantized.
    convs = sum(isinstance(m, nn.Conv2d) for m in classifier().modules())
    assert watcher.fake_quant_per_epoch == [0, convs]
    assert watcher.quantizing_in_qat_epoch and watcher.moved  # the QAT epoch trained the fake-quant model
    assert [record.kind for record in model.compression_records] == ["fake_quant"]
    # The same parameter objects: the optimizer kept stepping them through the swap.
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in model.parameters()}
    # Frozen at fit end: ranges observed during QAT, no longer updated.
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    assert quantizers and all(q.is_calibrated and q.fake_quant_enabled and not q.observer_enabled for q in quantizers)
    assert "quant/val_top1_sim8" in quantization.results

    checkpoint = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(checkpoint)
    loaded = ImageClassifier.load_from_checkpoint(checkpoint).eval()
    assert len(fake_quant_layers(loaded.model)) == convs
    x = torch.randn(8, *INPUT_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_invalid_layers_for_int8_are_named_before_training(tmp_path):
    arch = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 2), nn.Flatten(), nn.Linear(4 * 15 * 15, 4))
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[QuantizationCallback(int8=True, latency_batch_sizes=[])])
    with pytest.raises(ValueError, match=r"cannot quantize these layers of the model: \['1 \(ConvTranspose2d\)'\]"):
        trainer.fit(classifier(arch=arch), *tiny_loaders())
    assert trainer.global_step == 0


def test_qat_needs_enough_epochs(tmp_path):
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[QuantizationCallback(qat_epochs=3, **FAST)])
    with pytest.raises(ValueError, match=r"`qat_epochs` \(3\) .* needs `trainer.max_epochs` >= 3, got 2"):
        trainer.fit(classifier(), *tiny_loaders())


@pytest.mark.parametrize("bits", [1, 17, 8.0, True])
def test_bits_outside_2_to_16_are_rejected(bits):
    with pytest.raises(ValueError, match=r"`bits` must be an integer in \[2, 16\], got"):
        QuantizationCallback(bits=bits)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(calibration_batches=0), "`calibration_batches` must be an int >= 1, got 0"),
        (dict(stages=["fit", "predict"]), r"`stages` must be a list of \['fit', 'test'\]"),
        (dict(qat_epochs=-1), "`qat_epochs` must be an int >= 0, got -1"),
        (dict(qat_averaging_constant=0.0), r"`qat_averaging_constant` must be in \(0, 1\], got 0.0"),
        (dict(latency_batch_sizes=[1, 0]), "`latency_batch_sizes` must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationCallback(**kwargs)


def test_evaluate_top1_counts_each_model_on_the_same_batches():
    batches = [(torch.eye(4), torch.tensor([0, 1, 2, 3])), (torch.eye(4)[:2], torch.tensor([3, 1]))]
    models = {"identity": nn.Identity(), "reversed": nn.Linear(4, 4, bias=False)}
    with torch.no_grad():
        models["reversed"].weight.copy_(torch.eye(4).flip(0))
    assert evaluate_top1(models, batches) == {"identity": 5 / 6, "reversed": 1 / 6}
    with pytest.raises(ValueError, match="`batches` is empty"):
        evaluate_top1(models, [])


@pytest.mark.slow
def test_int8_model_is_written_measured_and_reloads_in_a_new_process(tmp_path):
    quantization = QuantizationCallback(
        calibration_batches=2, latency_batch_sizes=[1, 4], latency_warmup=1, latency_iters=3
    )
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[quantization])
    trainer.fit(classifier(), datamodule=TinyImageDataModule())
    results = quantization.results
    path = tmp_path / "model_int8.onnx"
    assert path.is_file() and (tmp_path / "model_float.onnx").is_file()
    assert results["quant/size_bytes/onnx_int8"] == path.stat().st_size
    assert results["quant/size_bytes/onnx_int8"] < results["quant/size_bytes/onnx_float"] / 2.5
    for name in ("torch_float", "torch_sim8", "ort_float", "ort_int8"):
        assert results[f"quant/latency_ms/{name}/bs1"] > 0 and results[f"quant/latency_ms/{name}/bs4"] > 0
    # Measured side by side: a paired speedup per round, with its interval.
    for size in (1, 4):
        low, high = results[f"quant/int8_speedup_low/bs{size}"], results[f"quant/int8_speedup_high/bs{size}"]
        assert 0 < low <= results[f"quant/int8_speedup/bs{size}"] <= high
    report = json.loads((tmp_path / "quantization.json").read_text())
    paired = {s["candidate"]: s for s in report["speedups"]["4"]}
    assert set(paired) == {"torch_float", "torch_sim8", "ort_int8"} and paired["ort_int8"]["baseline"] == "ort_float"
    assert paired["ort_int8"]["rounds"] == 5 and report["latency"]["ort_int8"]["4"]["iters"] == 3 * 5

    # A new process with nothing but the file (and the same validation batches) gets the logged accuracy.
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        import torch
        from test_quantization_callback import TinyImageDataModule
        from compresslight.compression.quantization_onnx import OnnxRuntimeModel
        datamodule = TinyImageDataModule()
        datamodule.setup("fit")
        int8 = OnnxRuntimeModel({str(path)!r})
        correct = total = 0
        for images, labels in datamodule.val_dataloader():
            predictions = int8(datamodule.transform_batch(images, train=False)).argmax(1)
            correct += int((predictions == labels).sum())
            total += len(labels)
        print(correct / total)
        """
    )
    result = run_python("-c", script, cwd=tmp_path)
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(results["quant/val_top1_int8"])


# Each rank writes `rank{N}.json`: whether every quantizer quantized during the QAT epoch, a hash
# of its parameters after fit, and (rank 0) the report. Lightning's DDP launcher re-executes the
# script for rank 1, so it must be a real file.
DDP_QAT_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    from pathlib import Path
    sys.path.insert(0, {tests_dir!r})
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback, ModelCheckpoint
    from helpers import classifier, tiny_loaders
    from compresslight.callbacks.quantization import QuantizationCallback
    from compresslight.compression.quantization import ActivationQuantizer

    out_dir = Path(sys.argv[1])

    class Watcher(Callback):
        quantizing = None

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                quantizers = [m for m in pl_module.modules() if isinstance(m, ActivationQuantizer)]
                self.quantizing = bool(quantizers) and all(
                    q.fake_quant_enabled and q.observer_enabled for q in quantizers
                )

    pl.seed_everything(0)
    quantization = QuantizationCallback(qat_epochs=1, calibration_batches=1, int8=False, latency_batch_sizes=[])
    watcher = Watcher()
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(out_dir),
        callbacks=[quantization, watcher, ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True)],
    )
    model = classifier()
    trainer.fit(model, *tiny_loaders())
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode() + param.detach().contiguous().numpy().tobytes())
    report = dict(
        quantizing=watcher.quantizing, hash=digest.hexdigest(), results=quantization.results,
        records=[record.kind for record in model.compression_records],
    )
    (out_dir / f"rank{{trainer.global_rank}}.json").write_text(json.dumps(report))
    """
)


@pytest.mark.slow
def test_ddp_qat_quantizes_on_every_rank_and_checkpoint_reloads(tmp_path):
    reports = run_ddp_script(tmp_path, DDP_QAT_SCRIPT.format(tests_dir=str(TESTS_DIR)))
    # Rank 1 rebuilt the fake-quant layers from rank 0's record and quantized too.
    assert all(r["quantizing"] for r in reports)
    assert all(r["records"] == ["fake_quant"] for r in reports)
    assert reports[0]["hash"] == reports[1]["hash"]
    # Only rank 0 evaluates.
    assert "quant/val_top1_sim8" in reports[0]["results"] and reports[1]["results"] == {}
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert [record.kind for record in loaded.compression_records] == ["fake_quant"]
    assert loaded.eval()(torch.randn(2, *INPUT_SHAPE)).shape == (2, 4)
