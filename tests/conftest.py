"""Test-wide settings: one thread (two threads on a busy 2-core machine slow small ops a lot)
and W&B offline and quiet, never waiting for the network."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

import torch  # noqa: E402

torch.set_num_threads(1)
