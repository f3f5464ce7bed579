"""Every config in configs/ (not configs/sweeps/) parses and instantiates through the CLI, and the
pruning configs express their papers' protocols.

Instantiating needs no data: CIFAR-10 is read in `setup`, and ImageFolder datamodules (Steelpatch,
ImageNet) only read their folders in `__init__` to count classes, which `--data.num_classes`
replaces. The real datamodule class is kept, so its keys are checked too.
"""

import fnmatch
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from compresslight.callbacks.pruning import PruningCallback
from compresslight.datamodules import ImageFolderDataModule, SyntheticDataModule
from helpers import REPO, conv_widths
from pytorch_lightning.callbacks import Callback

from compresslight.cli import build_from_config

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI warns when `sys.argv` (pytest's here) holds arguments beside `args`."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def resolve_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    module = __import__(module_name, fromlist=[name])
    return getattr(module, name)


def build(path: Path, *overrides: str) -> tuple[pl.LightningModule, pl.LightningDataModule, pl.Trainer]:
    """The config's model, datamodule and Trainer, with folder datamodules told their class count."""
    data_class = resolve_class(load_yaml(path)["data"]["class_path"])
    extra = ["--data.num_classes", "6"] if issubclass(data_class, ImageFolderDataModule) else []
    return build_from_config(["--config", str(path), *extra, *overrides])


def as_plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def test_there_are_configs():
    names = {path.name for path in CONFIGS}
    assert {"resnet20_baseline.yaml", "resnet20_prune12.yaml", "resnet56_distiller_schedule.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_instantiates_what_it_says(path, tmp_path, monkeypatch):
    # Loggers and checkpoints would go under runs/ here; `../shared` (data, published weights that
    # `init_from` reads at construction) is the repository's neighbour, as from the repository root.
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    config = load_yaml(path)
    if (REPO.parent / "shared").is_dir():
        (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    elif str(config.get("model", {}).get("init_from", "")).startswith("../shared/"):
        pytest.skip("needs ../shared next to the repository (the published weights)")
    model, datamodule, trainer = build(path)

    assert type(datamodule) is resolve_class(config["data"]["class_path"])
    # The datamodule's shape and classes reach the model (CLI links).
    assert tuple(model.hparams.input_shape) == tuple(datamodule.input_shape)
    assert model.hparams.num_classes == datamodule.num_classes
    for key, value in config.get("model", {}).items():
        assert as_plain(model.hparams[key]) == as_plain(value), key
    for key, value in config["data"].get("init_args", {}).items():
        if key in datamodule.hparams:
            assert as_plain(datamodule.hparams[key]) == as_plain(value), key
    trainer_config = config.get("trainer", {})
    if "max_epochs" in trainer_config:
        assert trainer.max_epochs == trainer_config["max_epochs"]
    entries = trainer_config.get("callbacks", [])
    for entry in entries:
        callback_class = resolve_class(entry["class_path"])
        matches = [callback for callback in trainer.callbacks if type(callback) is callback_class]
        expected = sum(resolve_class(other["class_path"]) is callback_class for other in entries)
        assert len(matches) == expected, entry["class_path"]
    logger_config = trainer_config.get("logger")
    if isinstance(logger_config, dict):
        assert type(trainer.logger) is resolve_class(logger_config["class_path"])
        assert trainer.logger.name == logger_config["init_args"]["name"]


def test_a_broken_config_fails(tmp_path, capsys):
    """What the test above relies on: a misspelt key or class path fails at parse time."""
    config = load_yaml(REPO / "configs" / "resnet20_prune12.yaml")
    pruning = next(entry for entry in config["trainer"]["callbacks"] if entry["class_path"].endswith("PruningCallback"))
    pruning["init_args"]["amout"] = pruning["init_args"].pop("amount")
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        build_from_config(["--config", str(typo)])
    assert "amout" in capsys.readouterr().err

    config["trainer"]["callbacks"][0]["class_path"] = "compresslight.callbacks.profiling.ProfileCallback"
    wrong_class = tmp_path / "wrong_class.yaml"
    wrong_class.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        build_from_config(["--config", str(wrong_class)])
    assert "compresslight.callbacks.profiling" in capsys.readouterr().err


def pruning_callback(trainer: pl.Trainer) -> PruningCallback:
    (callback,) = [callback for callback in trainer.callbacks if isinstance(callback, PruningCallback)]
    return callback


def prune_in_setup(model: pl.LightningModule, callback: Callback, tmp_path: Path) -> None:
    """Runs the config's one-shot pruning callback as `fit` does (in `setup`), with no training."""
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=0,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    data = SyntheticDataModule(
        num_classes=model.hparams.num_classes,
        input_shape=tuple(model.hparams.input_shape),
        num_samples=2,
        num_val_samples=2,
        num_test_samples=2,
        batch_size=2,
    )
    trainer.fit(model, datamodule=data)


@pytest.mark.parametrize(
    ("name", "amount", "params"),
    # Paper 000 Table I: 208K and 153K parameters.
    [("resnet20_prune12", 0.125, 208_904), ("resnet20_prune25", 0.25, 153_766)],
)
def test_resnet20_prune_configs_follow_paper_000(name, amount, params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, _, trainer = build(REPO / "configs" / f"{name}.yaml")
    callback = pruning_callback(trainer)
    options = callback.options
    assert (options.amount, options.norm, callback.schedule.epochs, options.ratios) == (amount, 2, [0], {})
    hp = model.hparams
    schedule = (trainer.max_epochs, hp.lr, hp.lr_schedule, list(hp.milestones), hp.gamma)
    assert schedule == (100, 0.01, "multistep", [0.5], 0.1)
    assert hp.init_from is None  # the user passes the baseline

    prune_in_setup(model, callback, tmp_path)
    widths = conv_widths(model.model)
    assert widths["layer1.0.conv1"] == int(16 * (1 - amount))
    assert widths["layer3.2.conv2"] == int(64 * (1 - amount))
    assert sum(p.numel() for p in model.model.parameters()) == params


@pytest.mark.parametrize("name", ["resnet18_steelpatch_prune12", "resnet18_steelpatch_prune25"])
def test_resnet18_steelpatch_prune_configs_follow_paper_000(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, datamodule, trainer = build(REPO / "configs" / f"{name}.yaml")
    callback = pruning_callback(trainer)
    amount = 0.125 if name.endswith("12") else 0.25
    assert (callback.options.amount, callback.options.norm, callback.schedule.epochs) == (amount, 2, [0])
    hp = model.hparams
    assert (trainer.max_epochs, hp.lr, hp.lr_schedule, list(hp.milestones)) == (30, 0.001, "multistep", [0.5])
    assert (hp.arch, datamodule.input_shape, datamodule.batch_size) == ("resnet18", (1, 200, 200), 32)


# Paper 002 appendix A.2 (Distiller's schedule): pruned block conv1s and their sparsity.
DISTILLER_GROUPS = {
    **{f"layer1.{block}.conv1": 0.7 for block in range(9)},
    **{f"layer2.{block}.conv1": 0.6 for block in (1, 2, 3, 4, 6, 7)},
    "layer3.1.conv1": 0.2,
    **{f"layer3.{block}.conv1": 0.4 for block in (2, 3, 5, 6, 7, 8)},
}


def test_resnet56_distiller_config_prunes_exactly_the_appendix_a2_layers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, _, trainer = build(REPO / "configs" / "resnet56_distiller_schedule.yaml")
    callback = pruning_callback(trainer)
    options = callback.options
    assert (options.amount, options.norm, options.importance, callback.schedule.epochs) == (None, 1, "filter", [0])
    # The glob patterns select exactly the listed layers, with their group's ratio.
    original = conv_widths(model.model)
    selected = {
        name: ratio
        for name in original
        for pattern, ratio in callback.options.ratios.items()
        if fnmatch.fnmatchcase(name, pattern)
    }
    assert selected == DISTILLER_GROUPS

    prune_in_setup(model, callback, tmp_path)
    expected = {name: int(width * (1 - DISTILLER_GROUPS.get(name, 0.0))) for name, width in original.items()}
    assert conv_widths(model.model) == expected
    assert expected["layer1.0.conv1"] == 4 and expected["layer3.1.conv1"] == 51 and expected["layer3.4.conv1"] == 64
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
