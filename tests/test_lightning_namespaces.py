"""compresslight with the Lightning a user brings: `lightning.pytorch` and `pytorch_lightning`.

The `lightning_namespace` fixture (conftest) runs each Trainer-level test once per installed
namespace, with that namespace's Trainer, loggers, callbacks, LightningModule and LightningCLI.
The 2-process DDP run is in test_ddp.py (slow), under both namespaces too.
"""

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from compresslight.callbacks import (
    DistillationCallback,
    LCCallback,
    ProfileCallback,
    PruningCallback,
    QuantizationCallback,
    TuckerVBMFCallback,
)
from compresslight.datamodules import CIFAR10DataModule, SyntheticDataModule
from helpers import INPUT_SHAPE, classifier, tiny_loaders
from lightning_utilities.core.overrides import is_overridden
from torch import nn
from torch.nn import functional as F

from compresslight import ImageClassifier, compare, create_model, lightning_compat, load_compressed_checkpoint, profile
from compresslight.atomic_io import AtomicCheckpointIO
from compresslight.cli import build_from_config, cli_class, config_namespace

CALLBACKS = (
    DistillationCallback,
    LCCallback,
    ProfileCallback,
    PruningCallback,
    QuantizationCallback,
    TuckerVBMFCallback,
)


@pytest.fixture
def pl(lightning_namespace: str) -> ModuleType:
    return importlib.import_module(lightning_namespace)


def trainer_of(pl: ModuleType, tmp_path: Path, **kwargs) -> "pl.Trainer":
    options = {
        "max_epochs": 2, "limit_train_batches": 4, "limit_val_batches": 2, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path,
    }  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(**options)


def user_module_class(pl: ModuleType) -> type:
    """A user's own LightningModule on `pl`, nothing from compresslight in it; no `model`
    attribute, so compression callbacks edit the whole LightningModule."""

    class UserModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )  # fmt: skip
            self.head = nn.Linear(32, 4)
            self.example_input_array = torch.zeros(1, *INPUT_SHAPE)

        def forward(self, images):
            return self.head(self.features(images))

        def training_step(self, batch, batch_idx):
            images, targets = batch
            return F.cross_entropy(self(images), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return UserModule


def optimizer_holds_module_parameters(trainer, module: nn.Module) -> bool:
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    return held == {id(p) for p in module.parameters()}


# --- types -----------------------------------------------------------------------------------


@pytest.mark.parametrize("callback_class", CALLBACKS, ids=lambda c: c.__name__)
def test_compresslight_classes_belong_to_every_installed_namespace(callback_class):
    for namespace in lightning_compat.NAMESPACES:
        assert issubclass(callback_class, namespace.Callback)
        assert issubclass(ImageClassifier, namespace.LightningModule)
        assert issubclass(CIFAR10DataModule, namespace.LightningDataModule)


# Every hook a 2.6 Trainer asks `is_overridden` about (grep of lightning/pytorch), except
# `optimizer_step` and `lr_scheduler_step` (real defaults whose code differs between namespaces,
# documented in lightning_compat).
QUERIED_MODULE_HOOKS = (
    "training_step", "validation_step", "test_step", "predict_step", "forward", "configure_optimizers",
    "configure_sharded_model", "configure_model", "prepare_data", "train_dataloader", "val_dataloader",
    "test_dataloader", "predict_dataloader", "transfer_batch_to_device", "on_before_batch_transfer",
    "on_after_batch_transfer", "on_validation_epoch_end", "on_test_epoch_end", "optimizer_zero_grad",
    "backward", "configure_gradient_clipping",
)  # fmt: skip
QUERIED_DATAMODULE_HOOKS = (
    "prepare_data", "train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader",
    "transfer_batch_to_device", "on_before_batch_transfer", "on_after_batch_transfer",
)  # fmt: skip


def own_hooks(cls: type, base: type) -> set[str]:
    """Names defined by `cls` and its bases up to (not including) compresslight's `base`."""
    mro = cls.__mro__
    return {name for klass in mro[: mro.index(base)] for name in vars(klass)}


@pytest.mark.parametrize(
    ("instance", "base", "hooks"),
    [
        (classifier(), lightning_compat.LightningModule, QUERIED_MODULE_HOOKS),
        (SyntheticDataModule(input_shape=INPUT_SHAPE), lightning_compat.LightningDataModule, QUERIED_DATAMODULE_HOOKS),
        (ProfileCallback(), lightning_compat.Callback, ("state_dict",)),
        (PruningCallback(amount=0.5), lightning_compat.Callback, ("state_dict",)),
    ],
    ids=["ImageClassifier", "SyntheticDataModule", "ProfileCallback", "PruningCallback"],
)
def test_each_namespace_sees_exactly_the_hooks_our_classes_override(lightning_namespace, instance, base, hooks):
    # A hook inherited from Lightning that one namespace's Trainer reads as overridden gets called
    # or refused there (`val_dataloader` raised at fit without validation data; `configure_model`
    # plus `configure_sharded_model` refused the module).
    namespace = importlib.import_module(lightning_namespace)
    parent = next(c for c in (namespace.LightningModule, namespace.LightningDataModule, namespace.Callback)
                  if isinstance(instance, c))  # fmt: skip
    overridden = own_hooks(type(instance), base)
    answers = {hook: is_overridden(hook, instance, parent) for hook in hooks}
    assert answers == {hook: hook in overridden for hook in hooks}


def test_checks_by_behaviour_accept_both_namespaces(tmp_path):
    for namespace in lightning_compat.NAMESPACES:
        csv = namespace.loggers.CSVLogger(tmp_path, name="run", version=3)
        assert lightning_compat.logger_log_dir(csv) == str(tmp_path / "run" / "version_3")
        wandb = namespace.loggers.WandbLogger(save_dir=str(tmp_path), offline=True)
        assert lightning_compat.is_wandb_logger(wandb) and not lightning_compat.is_wandb_logger(csv)
        assert lightning_compat.is_ddp_strategy(namespace.strategies.DDPStrategy())
        assert not lightning_compat.is_ddp_strategy(namespace.strategies.SingleDeviceStrategy("cpu"))
        assert lightning_compat.is_lightning_module(user_module_class(namespace)())
    assert not lightning_compat.is_lightning_module(nn.Linear(2, 2))


def test_import_namespace_fails_clearly():
    with pytest.raises(ValueError, match=r"namespace must be one of .*got 'lightning_pytorch'"):
        lightning_compat.import_namespace("lightning_pytorch")


def test_flat_public_imports_are_the_real_objects():
    from compresslight.callbacks.pruning import PruningCallback as deep_pruning

    from compresslight.checkpoint import load_compressed_checkpoint as deep_loader
    from compresslight.profiling.compare import compare as deep_compare
    from compresslight.registry import create_model as deep_create

    assert PruningCallback is deep_pruning and load_compressed_checkpoint is deep_loader
    assert compare is deep_compare and create_model is deep_create and callable(profile)


# --- Trainer runs ----------------------------------------------------------------------------


def test_fit_with_pruning_and_profile_on_a_user_module(tmp_path, pl):
    # The user's own module and logger from their namespace; the edit lands mid-fit.
    module = user_module_class(pl)()
    logger = pl.loggers.CSVLogger(tmp_path, name="run", version=0)
    profiler = ProfileCallback(batch_sizes=[1], warmup=1, iters=2)
    trainer = trainer_of(pl, tmp_path, logger=logger, callbacks=[PruningCallback(amount=0.5, epochs=[1]), profiler])
    trainer.fit(module, tiny_loaders()[0])
    assert module.features[0].out_channels == 8
    assert optimizer_holds_module_parameters(trainer, module)
    log_dir = Path(logger.log_dir)
    assert json.loads((log_dir / "compression_log.jsonl").read_text())["after"]["channels"]["features.0"] == 8
    assert (log_dir / "profile.md").is_file() and profiler.reports


@pytest.mark.slow  # three callbacks' reports (Tucker ranks, quantized evaluation, teacher copy): ~6 s
def test_tucker_quantization_and_distillation_in_one_fit(tmp_path, pl):
    tucker = TuckerVBMFCallback(rank_method=0.5, layers=["layer1.*"])
    quantization = QuantizationCallback(calibration_batches=1, eval_batches=1, int8=False, latency_batch_sizes=[])
    distillation = DistillationCallback("self", alpha=0.5)
    model = classifier()
    trainer = trainer_of(
        pl,
        tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[distillation, tucker, quantization],
    )
    trainer.fit(model, *tiny_loaders())
    assert tucker.report and optimizer_holds_module_parameters(trainer, model)
    # The quantization report ran its evaluation stage on this namespace's Trainer.
    assert {"quant/val_top1_float", "quant/val_top1_sim8"} <= set(quantization.results)


def test_lc_log_lands_in_the_loggers_version_dir(tmp_path, pl):
    lc = LCCallback(lam=1.0, cost="flops", steps=1, mu_init=1e-2, epochs_per_step=1)
    logger = pl.loggers.CSVLogger(tmp_path, name="run", version=0)
    trainer = trainer_of(pl, tmp_path, max_epochs=2, limit_train_batches=2, logger=logger, callbacks=[lc])
    trainer.fit(classifier(), *tiny_loaders())
    assert (Path(logger.log_dir) / "lc_log.jsonl").is_file()
    assert not (tmp_path / "run" / "lc_log.jsonl").exists()


def test_resume_after_a_one_shot_edit_of_the_whole_module(tmp_path, pl):
    # One-shot (epoch 0, in `setup`) on the LightningModule itself: the resume guard snapshots
    # the module's structure, which must not deep-copy the Trainer it holds.
    module_class = user_module_class(pl)
    trainer = trainer_of(pl, tmp_path, max_epochs=1, callbacks=[PruningCallback(amount=0.5, epochs=[0])])
    module = module_class()
    trainer.fit(module, tiny_loaders()[0])
    assert module.features[0].out_channels == 8
    path = tmp_path / "one_shot.ckpt"
    trainer.save_checkpoint(path)

    resumed = module_class()
    trainer = trainer_of(pl, tmp_path, max_epochs=2, callbacks=[PruningCallback(amount=0.5, epochs=[0])])
    trainer.fit(resumed, tiny_loaders()[0], ckpt_path=path)
    assert resumed.features[0].out_channels == 8  # replayed once, not pruned again
    assert trainer.global_step == 8 and optimizer_holds_module_parameters(trainer, resumed)
    loaded = load_compressed_checkpoint(module_class(), path)
    assert loaded.features[0].out_channels == 8


def test_image_classifier_fits_without_validation_data_and_tests(tmp_path, pl):
    trainer = trainer_of(pl, tmp_path, max_epochs=1)
    model = classifier()
    trainer.fit(model, tiny_loaders()[0])
    assert trainer.global_step == 4
    assert "test/top1" in trainer.test(model, tiny_loaders()[1], verbose=False)[0]


@pytest.mark.slow  # W&B's offline service starts in a process of its own: ~10 s
def test_wandb_logger_gets_the_profile_table_and_plot(tmp_path, pl):
    logger = pl.loggers.WandbLogger(save_dir=str(tmp_path), offline=True, project="compat")
    profiler = ProfileCallback(batch_sizes=[1], warmup=1, iters=2)
    trainer = trainer_of(pl, tmp_path, logger=logger, callbacks=[PruningCallback(amount=0.5, epochs=[1]), profiler])
    trainer.fit(user_module_class(pl)(), tiny_loaders()[0])
    run_dir = Path(logger.experiment.dir)
    logger.experiment.finish()
    assert list(run_dir.glob("media/table/profile/table_*.table.json"))
    assert list(run_dir.glob("media/images/profile/plot_*.png"))


# --- CLI -------------------------------------------------------------------------------------


def cli_config(tmp_path: Path, namespace: str) -> Path:
    """A fit config with our callbacks by their flat path and Lightning's by `namespace`'s path."""
    config = {
        "trainer": {
            "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "logger": {"class_path": f"{namespace}.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [
                {"class_path": "compresslight.callbacks.PruningCallback", "init_args": {"amount": 0.25, "epochs": [0]}},
                {"class_path": f"{namespace}.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
            ],
        },
        "model": {"arch": "resnet20", "lr": 0.05},
        "data": {
            "class_path": "compresslight.datamodules.SyntheticDataModule",
            "init_args": {"input_shape": list(INPUT_SHAPE), "num_classes": 4, "num_samples": 16, "batch_size": 8},
        },
    }  # fmt: skip
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_builds_the_trainer_of_the_namespace_the_config_names(tmp_path, lightning_namespace):
    namespace = importlib.import_module(lightning_namespace)
    config = cli_config(tmp_path, lightning_namespace)
    assert config_namespace(["--config", str(config)]) == lightning_namespace
    model, datamodule, trainer = build_from_config(["--config", str(config)])
    assert type(trainer) is namespace.Trainer
    assert isinstance(trainer.logger, namespace.loggers.CSVLogger)
    assert any(isinstance(c, PruningCallback) for c in trainer.callbacks)
    assert isinstance(model, ImageClassifier) and isinstance(datamodule, SyntheticDataModule)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # the CLI's default writer


def test_the_namespaces_own_lightning_cli_accepts_our_classes_by_class_path(tmp_path, lightning_namespace):
    # A user's own `LightningCLI` (not ours): our callbacks, model and datamodule pass its type checks.
    lightning_cli = importlib.import_module(f"{lightning_namespace}.cli").LightningCLI
    config = cli_config(tmp_path, lightning_namespace)
    text = yaml.safe_load(config.read_text())
    text["model"] = {
        "class_path": "compresslight.ImageClassifier",
        "init_args": {"num_classes": 4, "input_shape": list(INPUT_SHAPE)},
    }
    config.write_text(yaml.safe_dump(text))
    cli = lightning_cli(args=["--config", str(config)], run=False, subclass_mode_model=True, subclass_mode_data=True)
    assert isinstance(cli.model, ImageClassifier)
    assert [type(c) for c in cli.trainer.callbacks if isinstance(c, PruningCallback)] == [PruningCallback]


def test_cli_config_with_short_lightning_names_runs_under_either_namespace(tmp_path, lightning_namespace):
    # `ModelCheckpoint`, `CSVLogger`: resolved among the subclasses of the CLI's namespace.
    config = cli_config(tmp_path, lightning_namespace)
    text = config.read_text()
    config.write_text(
        text.replace(f"{lightning_namespace}.callbacks.", "").replace(f"{lightning_namespace}.loggers.", "")
    )
    assert config_namespace(["--config", str(config)]) == lightning_compat.NAMESPACES[0].__name__
    cli = cli_class(lightning_namespace)(args=["--config", str(config)], run=False)
    namespace = importlib.import_module(lightning_namespace)
    assert type(cli.trainer) is namespace.Trainer and isinstance(cli.trainer.logger, namespace.loggers.CSVLogger)


def test_cli_refuses_a_config_that_mixes_the_namespaces(tmp_path):
    config = cli_config(tmp_path, "lightning.pytorch")
    mixed = ["--config", str(config), "--trainer.callbacks+=pytorch_lightning.callbacks.LearningRateMonitor"]
    with pytest.raises(ValueError, match=r"both Lightning namespaces \(lightning\.pytorch and pytorch_lightning\)"):
        config_namespace(mixed)
    # A namespace named only in a comment does not count.
    config.write_text("# made with pytorch_lightning.cli\n" + config.read_text())
    assert config_namespace(["--config", str(config)]) == "lightning.pytorch"
