"""W&B from YAML through `cli.py fit`: offline with no account, never waiting for the network, and
the offline run holds the keys a dashboard needs (compression and profile)."""

import json
import os

import pytest
import yaml
from helpers import REPO, run_python


@pytest.mark.slow  # a real CLI fit in a new process plus W&B's offline service: ~30 s
def test_cli_fit_with_wandb_logger_runs_offline_and_logs_dashboard_keys(tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "limit_train_batches": 3,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "pytorch_lightning.loggers.WandbLogger",
                "init_args": {"project": "compresslight-test", "save_dir": str(tmp_path)},
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
            "init_args": {"num_classes": 4, "input_shape": [3, 16, 16], "num_samples": 64, "batch_size": 16},
        },
    }
    config_path = tmp_path / "fit.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB")}
    env.update(OMP_NUM_THREADS="1", HOME=str(tmp_path), WANDB_SILENT="true")  # no account, no netrc
    result = run_python(REPO / "cli.py", "fit", "--config", config_path, cwd=tmp_path, env=env)
    assert "W&B runs are written offline" in result.stderr + result.stdout, (result.stderr[:2000], result.stdout[:500])
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    # The offline run's transaction log, read with W&B's own inspector (`wandb leet inspect`).
    records = run_python(
        "-m", "wandb", "leet", "inspect", "--json", run_dirs[0], cwd=tmp_path, env=env, timeout=120
    ).stdout.splitlines()
    logged: dict = {}
    for line in records:
        record = json.loads(line)
        if record.get("type") == "history":
            logged.update(record["history"]["item"])
    for key in (
        "compression/params",
        "compression/macs",
        "compression/channels/layer1.0.conv1",
        "profile/params",
        "profile/theoretical_speedup",
        "profile/inference_latency_ms/bs1_t1_torch",
        "val/top1",
    ):
        assert key in logged, key
    assert logged["compression/channels/layer1.0.conv1"] == 12
    assert logged["profile/theoretical_speedup"] > 1.5
    assert list(run_dirs[0].glob("files/media/table/profile/table_*.table.json"))
