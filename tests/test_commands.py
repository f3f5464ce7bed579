"""The CLI end to end, in-process: `fit` with a pruning callback and a profile, then the commands
that read its checkpoint (`profile`, `sensitivity`) and `runtime-model`."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from compresslight.cli import main


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny `cli.py fit` run: ResNet20 on synthetic 16x16 data, pruned 25% at epoch 1, profiled."""
    root = tmp_path_factory.mktemp("cli")
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "limit_train_batches": 2,
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
                {
                    "class_path": "compresslight.callbacks.profile.ProfileCallback",
                    "init_args": {"warmup": 0, "iters": 2},
                },
            ],
        },
        "model": {"arch": "resnet20"},
        "data": {
            "class_path": "compresslight.datamodules.SyntheticDataModule",
            "init_args": {"num_classes": 4, "input_shape": [3, 16, 16], "num_samples": 32, "batch_size": 16},
        },
    }
    config_path = root / "fit.yaml"
    config_path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(config_path)])
    run_dir = root / "run" / "version_0"
    return config_path, run_dir, run_dir / "checkpoints" / "epoch=1-step=4.ckpt"


def test_fit_leaves_profile_reports_and_a_pruned_checkpoint(fitted):
    _, run_dir, checkpoint = fitted
    assert checkpoint.is_file()
    report = json.loads((run_dir / "profile.json").read_text())
    assert report["baseline"][0]["params"]["total"] > report["current"][0]["params"]["total"]
    assert (run_dir / "profile.md").read_text().startswith("# Profile")
    assert (run_dir / "profile.png").is_file()


def test_profile_command_compares_a_checkpoint_with_its_baseline(fitted, tmp_path, capsys):
    config_path, _, checkpoint = fitted
    main(
        [
            "profile",
            "--config",
            str(config_path),
            "--ckpt_path",
            str(checkpoint),
            "--baseline",
            "init",
            "--batch_sizes",
            "1",
            "2",
            "--threads",
            "1",
            "--warmup",
            "0",
            "--iters",
            "2",
            "--min_rounds",
            "3",
            "--max_rounds",
            "3",
            "--output_dir",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    # The console gets the speedup rows; the full tables are in profile.md.
    assert "side by side" in printed and "bs2 torch train: " in printed and "Full tables in" in printed
    assert "Compression ratios and speedup" in (tmp_path / "profile.md").read_text()
    comparison = json.loads((tmp_path / "profile.json").read_text())["comparisons"][0]
    assert comparison["theoretical_speedup"] > 1.5
    assert comparison["method"] == "side-by-side"
    assert {entry["batch_size"] for entry in comparison["speedups"]} == {1, 2}
    for entry in comparison["speedups"]:
        assert entry["rounds"] == 3 and entry["low"] <= entry["observed"] <= entry["high"]
        assert entry["verdict"] in ("faster", "not distinguishable", "slower")


def test_profile_command_compares_two_checkpoints_with_one_file_name(fitted, tmp_path):
    # Two runs' `last.ckpt` (each named by its file stem) are two models, side by side.
    config_path, _, checkpoint = fitted
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        shutil.copy(checkpoint, tmp_path / run / "last.ckpt")
    main(
        ["profile", "--config", str(config_path), "--ckpt_path", str(tmp_path / "a" / "last.ckpt")]
        + ["--baseline", str(tmp_path / "b" / "last.ckpt"), "--batch_sizes", "1", "--threads", "1", "--no_train"]
        + ["--warmup", "0", "--iters", "2", "--min_rounds", "2", "--max_rounds", "2", "--output_dir", str(tmp_path)]
    )
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["baseline"][0]["name"] == "last (baseline)" and report["current"][0]["name"] == "last"
    (speedup,) = report["comparisons"][0]["speedups"]
    assert speedup["rounds"] == 2 and speedup["low"] <= speedup["observed"] <= speedup["high"]


def test_profile_command_rejects_bad_rounds(fitted, capsys):
    config_path, _, checkpoint = fitted
    with pytest.raises(SystemExit):
        main(["profile", "--config", str(config_path), "--baseline", "init", "--min_rounds", "1"])
    assert "`min_rounds` must be an int >= 2, got 1" in capsys.readouterr().err


def test_sensitivity_command_prunes_each_layer_alone(fitted, tmp_path):
    config_path, _, checkpoint = fitted
    main(
        [
            "sensitivity",
            "--config",
            str(config_path),
            "--ckpt_path",
            str(checkpoint),
            "--layers",
            "layer1.0.conv1",
            "layer3.*.conv1",
            "--ratios",
            "0.25",
            "0.5",
            "--limit_batches",
            "1",
            "--output_dir",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert {(row["layer"], row["ratio"]) for row in report["rows"]} == {
        (layer, ratio) for layer in ("layer1.0.conv1", "layer3.*.conv1") for ratio in (0.25, 0.5)
    }
    assert all(0 <= row["metric"] <= 1 for row in report["rows"])
    assert (tmp_path / "sensitivity.md").is_file()


def test_runtime_model_command_writes_a_loadable_model(fitted, tmp_path):
    from compresslight.compression.runtime_model import RuntimeModel

    config_path, _, _ = fitted
    output = tmp_path / "rm.json"
    main(
        ["runtime-model", "--config", str(config_path), "--output", str(output), "--threads", "1", "--grid_points", "2"]
    )
    runtime_model = RuntimeModel.load(output)
    assert runtime_model.predict({}) > 0


def test_commands_need_a_config(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--ckpt_path", "x.ckpt"])
    assert "a fit config is required: --config configs/X.yaml" in capsys.readouterr().err
