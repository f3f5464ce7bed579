"""TuckerVBMFCallback in real Trainer runs: one-shot in `setup`, mid-fit with optimizer rebuild,
runtime-aware decisions, layer selection, resume, reload in a new process without the callback, and
bad input."""

import csv
import json
import textwrap
from pathlib import Path

import pytest
import torch
from compresslight.callbacks.tucker import TuckerVBMFCallback
from helpers import INPUT_SHAPE, TESTS_DIR, classifier, run_ddp_script, run_python, tiny_loaders, tiny_trainer
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from compresslight.classifier import ImageClassifier
from compresslight.compression.tucker import SVDSplit, TuckerConv2d, TuckerRecord


def layer_types(module: nn.Module) -> dict[str, type]:
    """The type of every original conv position (factorized layers count as one)."""
    types = {}
    for name, layer in module.named_modules():
        if isinstance(layer, (TuckerConv2d, SVDSplit)):
            types[name] = type(layer)
        elif isinstance(layer, nn.Conv2d) and not any(name.startswith(f"{outer}.") for outer in types):
            types[name] = nn.Conv2d
    return types


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def assert_untouched(module: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == snapshot.keys()
    assert all(torch.equal(state[key], snapshot[key]) for key in snapshot)
    assert not any(isinstance(m, (TuckerConv2d, SVDSplit)) for m in module.modules())


class BeforeCompressionWatcher(Callback):
    """Implements `before_compression`, which `apply_edit` calls before the edit (as `ProfileCallback` does)."""

    def __init__(self) -> None:
        self.params_seen: list[int] = []

    def before_compression(self, trainer, pl_module):
        self.params_seen.append(sum(p.numel() for p in pl_module.parameters()))


def test_one_shot_decomposes_in_setup_logs_ranks_and_writes_the_report(tmp_path):
    watcher = BeforeCompressionWatcher()
    model = classifier()
    params_before = sum(p.numel() for p in model.parameters())
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = tiny_trainer(tmp_path, max_epochs=1, logger=logger, callbacks=[watcher, TuckerVBMFCallback()])
    trainer.fit(model, *tiny_loaders())

    types = layer_types(model.model)
    assert types["conv1"] is nn.Conv2d  # skip_first_conv
    assert types["layer1.0.conv1"] is TuckerConv2d and types["layer3.2.conv2"] is TuckerConv2d
    assert types["layer2.0.shortcut.0"] is SVDSplit  # 1x1 projection: SVD split
    assert isinstance(model.model.fc, nn.Linear)  # convolutions only, as paper 000
    [record] = model.compression_records
    assert isinstance(record, TuckerRecord) and len(record.methods) == 20
    # The hook saw the model before the edit; the optimizer holds exactly the decomposed model's.
    assert watcher.params_seen == [params_before]
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in model.parameters()}

    report = json.loads((Path(logger.log_dir) / "tucker_report.json").read_text())
    assert report["params_before"] == params_before
    assert report["params_after"] == sum(p.numel() for p in model.parameters())
    assert report["macs_after"] < report["macs_before"]
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["conv1"]["decision"] == "kept" and "first conv" in rows["conv1"]["reason"]
    assert rows["layer1.0.conv1"]["decision"] == "decomposed"
    assert rows["layer1.0.conv1"]["ranks"] == list(model.model.layer1[0].conv1.ranks)
    assert rows["layer1.0.conv1"]["macs_after"] < rows["layer1.0.conv1"]["macs_before"]
    markdown = (Path(logger.log_dir) / "tucker_report.md").read_text()
    assert "| layer1.0.conv1 | tucker2 |" in markdown and "decomposed" in markdown

    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    assert "compression/rank/layer1.0.conv1/out" in columns
    assert "compression/rank/layer1.0.conv1/in" in columns
    assert "compression/rank/layer2.0.shortcut.0" in columns
    assert "compression/params" in columns and "compression/macs" in columns


class EpochStartWatcher(Callback):
    """After the Tucker callback in the list: sees the model right after a mid-fit edit."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.at_start: dict[str, torch.Tensor] = {}
        self.lr_at_start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            self.at_start = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
            self.lr_at_start = trainer.optimizers[0].param_groups[0]["lr"]


def test_mid_fit_decomposition_rebuilds_the_optimizer_which_steps_the_factors(tmp_path):
    tucker = TuckerVBMFCallback(rank_method=0.5, epoch=1, layers=["layer1.*"])
    watcher = EpochStartWatcher(epoch=1)
    model = classifier(lr_schedule="multistep", milestones=(0.5,), gamma=0.1)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[tucker, watcher])
    trainer.fit(model, *tiny_loaders())

    assert isinstance(model.model.layer1[0].conv1, TuckerConv2d)
    assert model.model.layer1[0].conv1.ranks == (8, 8)  # half of 16 channels
    assert "model.layer1.0.conv1.core.weight" in watcher.at_start  # the edit came before the watcher
    # The schedule kept its position: epoch 1 runs at lr x0.1 (milestone round(0.5 * 2) = 1).
    assert watcher.lr_at_start == pytest.approx(0.05 * 0.1)
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in model.parameters()}
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), watcher.at_start[name])}
    for factor in ("in_proj", "core", "out_proj"):
        assert f"model.layer1.0.conv1.{factor}.weight" in moved
    assert (tmp_path / "tucker_report.json").is_file()
    assert tucker.state_dict()["decomposed"] is True


def test_runtime_aware_reports_measurements_and_keeps_layers_that_are_not_faster(tmp_path):
    # A 99% margin: no factorization of these tiny layers is 100x faster, so all are kept, with
    # their measurements in the report.
    tucker = TuckerVBMFCallback(
        layers=["layer1.0.*", "layer2.0.shortcut.0"], runtime_aware=True, batch_sizes=[1, 2], threads=[1],
        margin=0.99, train=True, warmup=0, iters=1, rounds=2,
    )  # fmt: skip
    model = classifier()
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[tucker])
    trainer.fit(model, *tiny_loaders())

    assert not any(isinstance(m, (TuckerConv2d, SVDSplit)) for m in model.modules())
    report = json.loads((tmp_path / "tucker_report.json").read_text())
    assert report["runtime_check"]["batch_sizes"] == [1, 2] and report["runtime_check"]["device"] == "cpu"
    rows = {row["name"]: row for row in report["layers"]}
    assert set(rows) == {"layer1.0.conv1", "layer1.0.conv2", "layer2.0.shortcut.0"}
    for row in rows.values():
        assert row["decision"] == "kept" and "not faster by 99%" in row["reason"]
        settings = {(m["mode"], m["batch_size"], m["threads"]) for m in row["latency"]}
        assert settings == {(mode, batch, 1) for mode in ("inference", "train") for batch in (1, 2)}
        assert all(m["original"]["median_s"] > 0 and m["factorized"]["median_s"] > 0 for m in row["latency"])
    markdown = (tmp_path / "tucker_report.md").read_text()
    assert "Runtime-aware on `cpu`" in markdown and "| inference bs1 t1 ms |" in markdown


def test_runtime_aware_with_no_margin_decomposes_what_is_faster(tmp_path):
    tucker = TuckerVBMFCallback(
        layers=["layer3.0.conv2"], runtime_aware=True, batch_sizes=[1], threads=[1], margin=0.0, train=False,
        warmup=1, iters=3, rounds=2,
    )  # fmt: skip
    model = classifier()
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[tucker])
    trainer.fit(model, *tiny_loaders())
    report = json.loads((tmp_path / "tucker_report.json").read_text())
    [row] = report["layers"]
    [measured] = row["latency"]
    faster = measured["speedup"] >= 1.0
    if not faster:
        assert row["decision"] == "kept" and report["whole_model"] == []
    else:  # then the whole model decides
        [check] = report["whole_model"]
        [whole] = check["rows"]
        assert (whole["batch_size"], whole["threads"], whole["mode"]) == (1, 1, "inference")
        kept_whole = whole["verdict"] != "slower"  # reverted only when significantly slower
        assert check["reverted"] == (None if kept_whole else "layer3.0.conv2")
        assert row["decision"] == ("decomposed" if kept_whole else "kept")
        assert "Whole-model checks" in (tmp_path / "tucker_report.md").read_text()
    decomposed = row["decision"] == "decomposed"
    assert isinstance(model.model.layer3[0].conv2, TuckerConv2d if decomposed else nn.Conv2d)


def test_layer_patterns_and_explicit_ranks_select_layers(tmp_path):
    model = classifier()
    tucker = TuckerVBMFCallback(layers=["layer2.*.conv1"])
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[tucker]).fit(
        model, *tiny_loaders()
    )
    factorized = {name for name, kind in layer_types(model.model).items() if kind is not nn.Conv2d}
    assert factorized == {"layer2.0.conv1", "layer2.1.conv1", "layer2.2.conv1"}

    model = classifier()
    tucker = TuckerVBMFCallback(rank_method={"layer1.0.conv1": [4, 8], "layer2.0.shortcut.0": 3})
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[tucker]).fit(
        model, *tiny_loaders()
    )
    assert model.model.layer1[0].conv1.ranks == (4, 8)
    assert model.model.layer2[0].shortcut[0].v.out_channels == 3
    assert set(model.compression_records[0].methods) == {"layer1.0.conv1", "layer2.0.shortcut.0"}


def test_resume_does_not_decompose_again(tmp_path):
    model = classifier()
    trainer = tiny_trainer(tmp_path / "first", max_epochs=1, callbacks=[TuckerVBMFCallback(rank_method=0.5)])
    trainer.fit(model, *tiny_loaders())
    path = tmp_path / "decomposed.ckpt"
    trainer.save_checkpoint(path)

    resumed_tucker = TuckerVBMFCallback(rank_method=0.5)
    resumed = classifier()
    trainer = tiny_trainer(tmp_path / "resumed", max_epochs=2, callbacks=[resumed_tucker])
    trainer.fit(resumed, *tiny_loaders(), ckpt_path=path)
    assert len(resumed.compression_records) == 1  # the checkpoint's, not a second decomposition
    assert resumed_tucker.decomposed
    assert isinstance(resumed.model.layer1[0].conv1, TuckerConv2d)
    # The setup edit of the resumed process was undone: it published no report.
    assert not (tmp_path / "resumed" / "tucker_report.json").exists()


def test_resume_from_a_checkpoint_made_without_the_callback_leaves_the_model_as_it_was(tmp_path, caplog):
    model = classifier()
    trainer = tiny_trainer(tmp_path / "baseline", max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, *tiny_loaders())
    path = tmp_path / "baseline.ckpt"
    trainer.save_checkpoint(path)

    tucker = TuckerVBMFCallback()
    resumed = classifier()
    trainer = tiny_trainer(
        tmp_path / "resumed", max_epochs=2, limit_train_batches=1, limit_val_batches=1, callbacks=[tucker]
    )
    with caplog.at_level("WARNING"):
        trainer.fit(resumed, *tiny_loaders(), ckpt_path=path)
    assert "start a new fit from its weights (`--model.init_from`)" in caplog.text
    assert not tucker.decomposed and tucker.report is None
    assert not any(isinstance(m, (TuckerConv2d, SVDSplit)) for m in resumed.modules())
    assert not (tmp_path / "resumed" / "tucker_report.json").exists()


def test_checkpoint_reloads_without_the_callback(tmp_path):
    model = classifier()
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[TuckerVBMFCallback(layers=["layer3.*"])])
    trainer.fit(model, *tiny_loaders())
    path = tmp_path / "tucker.ckpt"
    trainer.save_checkpoint(path)
    inputs = torch.randn(2, *INPUT_SHAPE)
    loaded = ImageClassifier.load_from_checkpoint(path).eval()
    assert isinstance(loaded.model.layer3[2].conv2, TuckerConv2d)
    assert loaded.model.layer3[2].conv2.ranks == model.model.layer3[2].conv2.ranks
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), model.eval()(inputs))


@pytest.mark.slow  # a new Python process: ~10 s of imports on a busy 2-core machine
def test_checkpoint_reloads_in_a_new_process_without_the_callback(tmp_path):
    model = classifier()
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[TuckerVBMFCallback(rank_method=0.5, epoch=0)])
    trainer.fit(model, *tiny_loaders())
    path = tmp_path / "tucker.ckpt"
    trainer.save_checkpoint(path)
    inputs = torch.randn(2, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(inputs)
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "io.pt")

    script = textwrap.dedent(
        f"""
        import json, torch
        from compresslight.classifier import ImageClassifier
        loaded = ImageClassifier.load_from_checkpoint({str(path)!r}).eval()
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            error = (loaded(io["inputs"]) - io["expected"]).abs().max().item()
        print(json.dumps(dict(error=error, layer=type(loaded.model.layer1[0].conv1).__name__)))
        """
    )
    result = run_python("-c", script, cwd=tmp_path)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["layer"] == "TuckerConv2d"
    assert report["error"] < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank_method={"layer1.0.conv1": [100, 8]}), r"must be ints in \[1, 16\] x \[1, 16\].*got \(100, 8\)"),
        (dict(rank_method={"layer2.0.shortcut.0": 64}), r"must be an int in \[1, 16\].*got 64"),
        (dict(layers=["layer9.*"]), r"`layer_patterns` entry 'layer9.\*' matches no decomposable layer"),
        (dict(layers=["fc"]), r"names 'fc', which is a Linear; only nn.Conv2d"),
        (dict(layers=["layer1.0.bn1"]), r"names 'layer1.0.bn1', which is a BatchNorm2d"),
        (dict(layers=["layer1.*"], rank_method={"layer2.0.conv1": [2, 2]}), r"not selected decomposable layers"),
        (dict(layers=["layer9.*"], epoch=1), r"matches no decomposable layer"),
    ],
)
def test_bad_layers_or_ranks_fail_in_setup_and_leave_the_model_untouched(tmp_path, kwargs, message):
    model = classifier()
    snapshot = state_snapshot(model)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[TuckerVBMFCallback(**kwargs)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, *tiny_loaders())
    assert trainer.global_step == 0  # failed before any training, whatever the epoch
    assert_untouched(model, snapshot)
    assert model.compression_records == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank_method="svd"), r"`rank_method` must be 'vbmf', a fraction in \(0, 1\] or a dict of ranks"),
        (dict(rank_method=1.5), r"`rank_method` as a fraction must be in \(0, 1\], got 1.5"),
        (dict(rank_method=0.0), r"`rank_method` as a fraction must be in \(0, 1\], got 0.0"),
        (dict(rank_method={}), r"non-empty dict of ranks, got \{\}"),
        (dict(epoch=-1), r"`epoch` must be an int >= 0"),
        (dict(layers=[]), r"`layers` must be a non-empty list"),
        (dict(min_rank=0), r"`min_rank` must be an int >= 1, got 0"),
        (dict(zero_rank="drop"), r"`zero_rank` must be 'min_rank' or 'skip', got 'drop'"),
        (dict(pointwise="tucker"), r"`pointwise` must be 'svd' or 'skip', got 'tucker'"),
        (dict(n_iter_max=-1), r"`n_iter_max` must be an int >= 0, got -1"),
        (dict(runtime_aware=True, margin=1.0), r"`margin` must be in \[0, 1\), got 1.0"),
        (dict(runtime_aware=True, batch_sizes=[0]), r"`batch_sizes` must be a non-empty sequence of ints >= 1"),
        (dict(runtime_aware=True, threads=[0]), r"`threads` must be a non-empty sequence of ints >= 1"),
        (dict(runtime_aware=True, iters=0), r"`iters` must be an int >= 1, got 0"),
        (dict(runtime_aware=True, device="tpu:x"), r"`device` must be a torch device string"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TuckerVBMFCallback(**kwargs)


# Each rank writes `rank{N}.json` after fit. Under DDP only rank 0 decomposes (runtime-aware
# decisions may differ between processes); the others replay its record, whose factor weights are
# fresh until DDP's wrapper broadcasts rank 0's.
DDP_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    from pathlib import Path
    sys.path.insert(0, {tests_dir!r})
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback, ModelCheckpoint
    from helpers import classifier, tiny_loaders
    from compresslight.callbacks.tucker import TuckerVBMFCallback

    out_dir = Path(sys.argv[1])
    epoch = int(sys.argv[2])

    def parameter_hash(module):
        digest = hashlib.sha256()
        for name, param in module.named_parameters():
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    class Watcher(Callback):
        hash_after_edit = None

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == epoch:
                self.hash_after_edit = parameter_hash(pl_module)

    watcher = Watcher()
    tucker = TuckerVBMFCallback(
        epoch=epoch, layers=["layer2.*", "layer3.*"], runtime_aware=True, batch_sizes=[1], threads=[1],
        margin=0.0, train=False, warmup=0, iters=2, rounds=2,
    )
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False, limit_train_batches=2,
        limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out_dir),
        callbacks=[tucker, watcher, ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True)],
    )
    model = classifier()
    trainer.fit(model, *tiny_loaders())
    optimizer_params = {{id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}}
    (out_dir / f"rank{{trainer.global_rank}}.json").write_text(json.dumps(dict(
        types={{name: type(m).__name__ for name, m in model.model.named_modules()}},
        hash_after_edit=watcher.hash_after_edit,
        hash_after_fit=parameter_hash(model),
        optimizer_holds_module_params=optimizer_params == {{id(p) for p in model.parameters()}},
        records=len(model.compression_records),
    )))
    """
)


@pytest.mark.slow  # two processes under DDP
@pytest.mark.parametrize("epoch", [1, 0], ids=["mid_fit", "one_shot"])
def test_ddp_ranks_end_with_rank_zeros_decomposition(tmp_path, epoch):
    reports = run_ddp_script(tmp_path, DDP_SCRIPT.format(tests_dir=str(TESTS_DIR)), str(epoch))
    assert reports[0]["types"] == reports[1]["types"]
    assert all(r["records"] == 1 and r["optimizer_holds_module_params"] for r in reports)
    assert reports[0]["hash_after_edit"] == reports[1]["hash_after_edit"]
    assert reports[0]["hash_after_fit"] == reports[1]["hash_after_fit"]
    report = json.loads((tmp_path / "tucker_report.json").read_text())
    decomposed = set(report["decomposed"])
    assert {name for name, kind in reports[0]["types"].items() if kind in ("TuckerConv2d", "SVDSplit")} == decomposed
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert len(loaded.compression_records) == 1
    assert set(loaded.compression_records[0].methods) == decomposed
