"""Test-wide settings: one thread (two threads on a busy 2-core machine slow small ops a lot)
and W&B offline and quiet, never waiting for the network."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

from compresslight.lightning_compat import NAMESPACES  # noqa: E402


@pytest.fixture(params=[namespace.__name__ for namespace in NAMESPACES])
def lightning_namespace(request: pytest.FixtureRequest) -> str:
    """The import name of each installed Lightning namespace ("pytorch_lightning", "lightning.pytorch"):
    Trainer-level tests that take it run once per namespace a user may bring."""
    return request.param
