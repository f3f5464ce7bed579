"""`cli.py fit --ckpt_path ...` through the CLI: `last` resumes the latest version of the run, a
checkpoint of another architecture is refused, the command line's hyperparameters stand, and
config-path arguments leave no temporary file behind."""

import csv
import logging
import tempfile
from pathlib import Path

import pytest
import yaml

from compresslight.checkpoint import read_checkpoint
from compresslight.cli import main

STEPS_PER_EPOCH = 2


def write_config(root: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "limit_train_batches": STEPS_PER_EPOCH,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "pytorch_lightning.loggers.CSVLogger",
                "init_args": {"save_dir": str(root), "name": "run"},
            },
            "callbacks": [
                {
                    "class_path": "compresslight.callbacks.pruning.PruningCallback",
                    "init_args": {"amount": 0.25, "epochs": [1]},
                },
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"filename": "last"}},
            ],
        },
        "model": {"arch": "resnet20", "lr": 0.05, "lr_schedule": "constant"},
        "data": {
            "class_path": "compresslight.datamodules.SyntheticDataModule",
            "init_args": {"num_classes": 4, "input_shape": [3, 16, 16], "num_samples": 32, "batch_size": 16},
        },
    }  # fmt: skip
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def logged_epochs(version_dir: Path) -> set[int]:
    with open(version_dir / "metrics.csv") as handle:
        return {int(row["epoch"]) for row in csv.DictReader(handle) if row.get("epoch")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """A finished 2-epoch run (pruned at epoch 1): runs/run/version_0/checkpoints/last.ckpt."""
    root = tmp_path_factory.mktemp("cli_resume")
    config = write_config(root)
    main(["fit", "--config", str(config)])
    assert (root / "run" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    return config


def test_ckpt_path_last_resumes_the_latest_version_of_the_run(first_run):
    root = first_run.parent
    main(["fit", "--config", str(first_run), "--ckpt_path", "last", "--trainer.max_epochs", "3"])
    resumed = root / "run" / "version_1"
    assert logged_epochs(resumed) == {2}  # before: {0, 1, 2}, trained from scratch
    saved = read_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 3 * STEPS_PER_EPOCH
    assert len(saved["compression_records"]) == 1  # the pruning of the first run, replayed once


def test_ckpt_path_last_without_an_earlier_run_is_refused(tmp_path):
    config = write_config(tmp_path)
    with pytest.raises(ValueError, match=r"`--ckpt_path last` found no last checkpoint .*run/\*/checkpoints"):
        main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert not (tmp_path / "run" / "version_0" / "metrics.csv").exists()


def test_checkpoint_of_another_architecture_is_refused(first_run, tmp_path):
    checkpoint = first_run.parent / "run" / "version_0" / "checkpoints" / "last.ckpt"
    config = write_config(tmp_path)  # a fresh log dir: nothing may be written there
    with pytest.raises(ValueError, match=r"holds a 'resnet20' model but this ImageClassifier has `arch`='resnet56'"):
        main(["fit", "--config", str(config), "--model.arch", "resnet56", "--ckpt_path", str(checkpoint)])
    assert not (tmp_path / "run" / "version_0" / "metrics.csv").exists()  # before: trained resnet20


def test_command_line_hyperparameters_stand_when_resuming(first_run, tmp_path, caplog):
    checkpoint = first_run.parent / "run" / "version_0" / "checkpoints" / "last.ckpt"
    config = write_config(tmp_path)
    args = ["fit", "--config", str(config), "--model.lr", "0.01", "--trainer.max_epochs", "3"]
    args += ["--ckpt_path", str(checkpoint)]
    with caplog.at_level(logging.WARNING, logger="compresslight.cli"):
        main(args)
    assert "lr: checkpoint 0.05, here 0.01" in caplog.text
    saved = read_checkpoint(tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt")
    assert saved["hyper_parameters"]["lr"] == 0.01  # before: 0.05, the checkpoint's
    assert saved["hyper_parameters"]["arch"] == "resnet20"


@pytest.mark.parametrize(("amount", "fails"), [(0.5, False), (1.5, True)])
def test_config_path_arguments_leave_no_temporary_config(tmp_path, monkeypatch, amount, fails):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    config = write_config(tmp_path)
    args = [
        "fit", "--config", str(config), "--trainer.limit_train_batches", "1",
        f"--trainer.callbacks[PruningCallback].init_args.amount={amount}",
    ]  # fmt: skip
    if fails:
        with pytest.raises(ValueError, match=r"`amount` must be in \[0, 1\), got 1.5"):
            main(args)
    else:
        main(args)
        saved_config = yaml.safe_load((tmp_path / "run" / "version_0" / "config.yaml").read_text())
        assert saved_config["trainer"]["callbacks"][0]["init_args"]["amount"] == amount
    assert list(temporary.iterdir()) == []  # before: one compresslight-config-*.yaml per run
