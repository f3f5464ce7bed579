"""Installs compresslight.

`callbacks/` and `datamodules/` live at the top of the repository (DESIGN.md) but install as
`compresslight.callbacks` and `compresslight.datamodules`: users add our callbacks to their own
Lightning projects, which often have a `callbacks.py` or `datamodules/` of their own that
top-level packages with those names would shadow.
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def read_requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# Optional parts; `compresslight.optional.EXTRAS` names the modules each provides (its errors name the extra).
ONNX = ["onnx>=1.23,<2", "onnxscript>=0.7,<1", "onnxruntime>=1.31,<2"]  # int8 export, ONNX Runtime latency
# psycopg: the PostgreSQL driver of sweeps shared across machines (postgresql+psycopg:// URLs).
SWEEP = ["optuna>=5,<6", "psycopg[binary]>=3.3,<4"]  # `cli.py sweep`
WANDB = ["wandb>=0.31,<1"]  # WandbLogger
EXTRAS = {
    "onnx": ONNX,
    "sweep": SWEEP,
    "wandb": WANDB,
    "all": ONNX + SWEEP + WANDB,
    # Both Lightning namespaces: the suite runs the Trainer-level tests under each.
    # The tests also run a PostgreSQL study (psycopg).
    # ruff: CI checks lint and formatting with the version pinned in constraints.txt.
    "test": [
        "pytest>=9,<10",
        "pytest-timeout>=2.4,<3",
        "lightning>=2.6,<3",
        "psycopg[binary]>=3.3,<4",
        "ruff>=0.17,<1",
    ],
}

setup(
    name="compresslight",
    version="0.1.0",
    description="Keras-style training on PyTorch Lightning where model compression is a callback, "
    "with measured (not promised) speedups.",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "compresslight",
        "compresslight.models",
        "compresslight.compression",
        "compresslight.profiling",
        "compresslight.sweep",
        "compresslight.callbacks",
        "compresslight.datamodules",
    ],
    package_dir={
        "compresslight": "compresslight",
        "compresslight.callbacks": "callbacks",
        "compresslight.datamodules": "datamodules",
    },
    install_requires=read_requirements(),
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["compresslight = compresslight.cli:main"]},
)
