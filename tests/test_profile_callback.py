"""ProfileCallback in real tiny fits: files in the log dir, logged keys, W&B, resume, restoring, errors."""

import csv
import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from compresslight.callbacks.profile import ProfileCallback
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compresslight.profiling import read_report

INPUT_SHAPE = (3, 8, 8)
FAST = dict(warmup=1, iters=2, threads=1, min_rounds=3, max_rounds=3)


class TinyModule(pl.LightningModule):
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return F.cross_entropy(self(images), targets)

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        self.log("val_loss", F.cross_entropy(self(images), targets))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyDataModule(pl.LightningDataModule):
    input_shape = INPUT_SHAPE

    def train_dataloader(self) -> DataLoader:
        return loader()

    def val_dataloader(self) -> DataLoader:
        return loader()


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, *INPUT_SHAPE, generator=generator)
    dataset = TensorDataset(images, torch.randint(0, 3, (16,), generator=generator))
    return DataLoader(dataset, batch_size=4)


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=CSVLogger(tmp_path),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def test_fit_writes_reports_and_logs_keys(tmp_path) -> None:
    callback = ProfileCallback(batch_sizes=(1, 2), input_shape=INPUT_SHAPE, **FAST)
    fit = trainer(tmp_path, [callback])
    fit.fit(TinyModule(), loader(), loader())

    log_dir = tmp_path / "lightning_logs" / "version_0"
    baselines, current, reports = read_report(log_dir / "profile.json")
    assert [p.name for p in baselines] == ["baseline"] and [p.name for p in current] == ["after fit"]
    assert reports[0].theoretical_speedup == pytest.approx(1.0)  # nothing was compressed
    assert {(s.mode, s.batch_size) for s in reports[0].speedups} == {
        ("inference", 1), ("train", 1), ("inference", 2), ("train", 2),
    }  # fmt: skip
    assert "Compression ratios and speedup" in (log_dir / "profile.md").read_text()
    assert (log_dir / "profile.png").read_bytes()[:4] == b"\x89PNG"

    with open(log_dir / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    columns = set(rows[0])
    for key in (
        "profile/params", "profile/macs", "profile/flops", "profile/theoretical_speedup",
        "profile/params_compression", "profile/memory_compression/bs2",
        "profile/inference_latency_ms/bs1_t1_torch", "profile/train_latency_ms/bs2_t1_torch",
        "profile/inference_images_per_s/bs2_t1_torch", "profile/memory_estimate_bytes/train/bs2",
        "profile/memory_measured_bytes/inference/bs1",
        "profile/observed_speedup/inference/bs1_t1_torch", "profile/observed_speedup/train/bs2_t1_torch",
        "profile/observed_over_theoretical/train/bs1_t1_torch",
        "profile/observed_speedup_low/inference/bs1_t1_torch", "profile/observed_speedup_high/train/bs2_t1_torch",
        "profile/observed_speedup_verdict/inference/bs2_t1_torch",
    ):  # fmt: skip
        assert key in columns, key
    # Measured side by side against the frozen baseline copy: every speedup has an interval.
    assert reports[0].method == "side-by-side"
    for s in reports[0].speedups:
        assert s.method == "side-by-side" and s.rounds == 3 and s.low <= s.observed <= s.high
    [row] = [r for r in rows if r["profile/observed_speedup_low/inference/bs1_t1_torch"]]
    bs1 = reports[0].speedup("inference", 1)
    assert float(row["profile/observed_speedup_low/inference/bs1_t1_torch"]) == pytest.approx(bs1.low)
    assert float(row["profile/observed_speedup_high/inference/bs1_t1_torch"]) == pytest.approx(bs1.high)
    macs = [float(row["profile/macs"]) for row in rows if row["profile/macs"]]
    assert macs == [baselines[0].macs, current[0].macs]  # logged at fit start and at fit end
    assert callback.state_dict()["baseline"] == [baselines[0].to_dict()]


class Shrinks(pl.Callback):
    """Replaces the 32-channel conv by a 4-channel one at the start of epoch 1 (a stand-in for a
    structural compression: the side-by-side comparison must see the model as it is at fit end)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            pl_module.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            pl_module.head = nn.Linear(4, 3)
            trainer.strategy.setup_optimizers(trainer)


def test_a_compressed_fit_writes_the_side_by_side_interval_and_verdict(tmp_path) -> None:
    callback = ProfileCallback(
        batch_sizes=(8,), input_shape=(3, 16, 16), warmup=1, iters=3, threads=1, min_rounds=6, max_rounds=6
    )
    trainer(tmp_path, [callback, Shrinks()], max_epochs=2).fit(TinyModule(channels=32), loader(), loader())
    log_dir = tmp_path / "lightning_logs" / "version_0"
    data = json.loads((log_dir / "profile.json").read_text())
    [comparison] = data["comparisons"]
    assert comparison["method"] == "side-by-side" and comparison["theoretical_speedup"] > 5
    for speedup in comparison["speedups"]:
        assert speedup["rounds"] == 6 and speedup["low"] <= speedup["observed"] <= speedup["high"]
        assert speedup["verdict"] in ("faster", "not distinguishable", "slower")
    side_by_side = comparison["side_by_side"]["results"]
    assert [r["setting"]["mode"] for r in side_by_side] == ["inference", "train"]
    assert all(set(r["round_latencies_s"]) == {"baseline", "after fit"} for r in side_by_side)
    assert all("other_cpu_share" in r["load"] and "busy" in r["load"] for r in side_by_side)
    markdown = (log_dir / "profile.md").read_text()
    train = next(s for s in comparison["speedups"] if s["mode"] == "train")
    assert f"{train['observed']:.2f}x [{train['low']:.2f}, {train['high']:.2f}]" in markdown
    assert "## Side-by-side measurement" in markdown and "Two-time" not in markdown
    # The baseline copy is the model from fit start: 32 channels, on the CPU, not the trained one.
    assert callback.baseline_model.features[0].out_channels == 32


def test_two_time_fallback_is_labelled(tmp_path) -> None:
    callback = ProfileCallback(input_shape=INPUT_SHAPE, side_by_side=False, **FAST)
    trainer(tmp_path, [callback], logger=False).fit(TinyModule(), loader())
    assert callback.baseline_model is None  # nothing kept twice
    [report] = callback.reports
    assert report.method == "two-time" and all(s.low is None and s.verdict is None for s in report.speedups)
    assert "**Two-time comparison**" in (tmp_path / "profile.md").read_text()


def test_input_shape_from_datamodule_or_example_input(tmp_path) -> None:
    from_datamodule = ProfileCallback(on_fit_end=False, **FAST)
    trainer(tmp_path / "dm", [from_datamodule], logger=False).fit(TinyModule(), datamodule=TinyDataModule())
    assert from_datamodule.baseline[0].input_shape == list(INPUT_SHAPE)

    module = TinyModule()
    module.example_input_array = torch.zeros(2, 3, 6, 6)
    from_example = ProfileCallback(on_fit_end=False, **FAST)
    trainer(tmp_path / "ex", [from_example], logger=False).fit(module, loader())
    assert from_example.baseline[0].input_shape == [3, 6, 6]
    assert (tmp_path / "ex" / "profile.json").is_file()  # no logger: default_root_dir


def test_missing_input_shape_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="ProfileCallback needs an input shape"):
        trainer(tmp_path, [ProfileCallback(**FAST)], logger=False).fit(TinyModule(), loader())


def test_on_compression_reprofiles_and_restores_the_module(tmp_path) -> None:
    callback = ProfileCallback(
        input_shape=INPUT_SHAPE, on_fit_end=False, after_compression=True, output_dir=tmp_path / "out", **FAST
    )
    module = TinyModule()
    fit = trainer(tmp_path, [callback], logger=False)
    fit.fit(module, loader())

    module.train()
    module.features[1].eval()
    module.head.weight.grad = torch.full_like(module.head.weight, 3.0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.features[0] = nn.Conv2d(3, 4, 1)  # a "compression" edit
    callback.on_compression(fit, module)

    assert callback.latest[0].name.startswith("after compression")
    expected = callback.baseline[0].flops / callback.latest[0].flops
    assert callback.reports[0].theoretical_speedup == pytest.approx(expected)
    assert callback.reports[0].theoretical_speedup > 1
    assert module.training and not module.features[1].training
    assert torch.equal(module.head.weight.grad, torch.full_like(module.head.weight, 3.0))
    assert module.features[0].weight.grad is None
    after = module.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("features.0"))
    _, current, _ = read_report(tmp_path / "out")
    assert current[0].name == callback.latest[0].name


def test_disabled_callback_does_nothing(tmp_path) -> None:
    callback = ProfileCallback(
        input_shape=INPUT_SHAPE, on_fit_start=False, on_fit_end=False, output_dir=tmp_path / "out"
    )
    module = TinyModule()
    callback.on_compression(trainer(tmp_path, [callback], logger=False), module)  # after_compression=False
    trainer(tmp_path, [callback], logger=False).fit(module, loader())
    assert callback.baseline == [] and callback.latest == []
    assert not (tmp_path / "out").exists()


def test_resumed_run_keeps_the_original_baseline(tmp_path) -> None:
    first = ProfileCallback(input_shape=INPUT_SHAPE, on_fit_end=False, **FAST)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [first, checkpoint], logger=False, enable_checkpointing=True).fit(TinyModule(), loader())

    resumed = ProfileCallback(input_shape=INPUT_SHAPE, on_fit_end=False, **FAST)
    resumed_trainer = trainer(tmp_path, [resumed], logger=False, max_epochs=2)
    resumed_trainer.fit(TinyModule(), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.baseline == first.baseline  # restored, not re-measured (latencies would differ)
    # The checkpoint holds the baseline's profile, not its weights: the comparison is two-time, and says so.
    assert resumed.baseline_model is None
    resumed.profile_on_fit_end = True
    resumed.on_fit_end(resumed_trainer, resumed_trainer.lightning_module)
    assert resumed.reports[0].method == "two-time"
    # Plain data: loads with weights_only=True and survives JSON unchanged.
    stored = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert json.loads(json.dumps(stored)) == stored


@pytest.mark.slow  # W&B's offline service alone takes ~4 s to start
def test_wandb_logger_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="compresslight-test")
    callback = ProfileCallback(input_shape=INPUT_SHAPE, **FAST)
    trainer(tmp_path, [callback], logger=logger).fit(TinyModule(), loader())
    run_dir = logger.experiment.dir
    logger.experiment.finish()
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1 and str(run_dirs[0]) in run_dir
    assert read_report(tmp_path)[2]  # profile.json with a comparison in the logger's save_dir
    images = list(run_dirs[0].glob("files/media/images/profile/plot_*.png"))
    tables = list(run_dirs[0].glob("files/media/table/profile/table_*.table.json"))
    assert images and tables


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_sizes": [1, 0]}, "`batch_sizes` must be a non-empty list of ints > 0"),
        ({"batch_sizes": []}, "`batch_sizes` must be a non-empty list"),
        ({"backends": ["torch", "tvm"]}, "unknown backend 'tvm'"),
        ({"devices": ["foo"]}, "`device` must be a torch device.*'foo'"),
        ({"devices": "cuda" if not torch.cuda.is_available() else "cuda:99"}, "`device` 'cuda"),
        ({"threads": [1, 0]}, "`threads` must be an int >= 1"),
        ({"warmup": -1}, "`warmup` must be >= 0"),
        ({"min_rounds": 1}, "`min_rounds` must be an int >= 2, got 1"),
        ({"time_budget_s": 0}, "`time_budget_s` must be None or a number > 0, got 0"),
        ({"iters": 0}, "`iters` must be >= 1"),
        ({"input_shape": [3, -8, 8]}, "`input_shape` must be positive ints"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProfileCallback(**kwargs)


@pytest.mark.slow
def test_ddp_two_processes_profile_on_rank_zero_only(tmp_path) -> None:
    callback = ProfileCallback(input_shape=INPUT_SHAPE, **FAST)
    fit = trainer(tmp_path, [callback], strategy="ddp_spawn", accelerator="cpu", devices=2)
    fit.fit(TinyModule(), loader(), loader())
    baselines, current, reports = read_report(tmp_path / "lightning_logs" / "version_0")
    assert len(baselines) == len(current) == len(reports) == 1


def test_baseline_is_profiled_before_a_one_shot_edit_whatever_the_callback_order(tmp_path):
    """A one-shot prune happens in `setup`, before `on_fit_start`: the baseline must still be the
    unpruned model, even with the ProfileCallback listed after the pruning callback."""
    from compresslight.callbacks.pruning import PruningCallback
    from helpers import classifier, tiny_loaders, tiny_trainer

    profiler = ProfileCallback(batch_sizes=[1], warmup=0, iters=1, output_dir=tmp_path / "profile")
    model = classifier()
    unpruned_params = sum(p.numel() for p in model.parameters())
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[PruningCallback(amount=0.25), profiler])
    trainer.fit(model, *tiny_loaders())
    assert profiler.baseline[0].params.total == unpruned_params
    assert profiler.latest[0].params.total == sum(p.numel() for p in model.parameters()) < unpruned_params
    assert profiler.reports[0].theoretical_speedup > 1.5
