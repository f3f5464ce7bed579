"""Small builders shared by the tests: tiny data, a tiny Trainer, a tiny classifier, a fresh
Python process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from compresslight.classifier import ImageClassifier

INPUT_SHAPE = (3, 16, 16)
TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


def tiny_loaders(num_classes: int = 4, samples: int = 32, batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    """Learnable random images: the class shifts the mean."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, num_classes, (samples,), generator=generator)
    images = torch.randn(samples, *INPUT_SHAPE, generator=generator) + targets.view(-1, 1, 1, 1)
    dataset = TensorDataset(images, targets)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True), DataLoader(dataset, batch_size=batch_size)


def tiny_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def tiny_convnet() -> torch.nn.Module:
    """Two convs and a head, for INPUT_SHAPE and 4 classes: real Trainer runs in well under a second."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


def conv_widths(module: torch.nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d, by name: what pruning changes."""
    return {name: layer.out_channels for name, layer in module.named_modules() if isinstance(layer, torch.nn.Conv2d)}


def classifier(**kwargs) -> ImageClassifier:
    options = dict(arch="resnet20", num_classes=4, input_shape=INPUT_SHAPE, lr=0.05)
    options.update(kwargs)
    return ImageClassifier(**options)


def run_python(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Runs `python *args` (this interpreter: `-c CODE`, or a script and its arguments) in a new process.

    `cwd` has no default: `python -c` puts the working folder first on `sys.path`, and from the
    repository root its own `compresslight/` would shadow the installed package (which alone has
    `compresslight.callbacks`, from `callbacks/`): pass `tmp_path` unless the test runs the repo's
    `cli.py` on purpose. With `check`, asserts the exit status is 0 and shows the stderr's tail.

    Args:
        env: the whole environment; default this one's with `OMP_NUM_THREADS=1`.
    """
    result = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"} if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_ddp_script(tmp_path: Path, script_text: str, *args: str, timeout: int = 300) -> list[dict]:
    """Runs a 2-process DDP script (it launches its own ranks) in a fresh interpreter and returns
    the `rank0.json`, `rank1.json` reports it wrote to `tmp_path`, its first argument.

    A subprocess because a DDP launch inside pytest would fork the test runner itself.
    """
    script = tmp_path / "ddp_script.py"
    script.write_text(script_text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    run_python(script, tmp_path, *args, cwd=tmp_path, timeout=timeout, env=env)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
