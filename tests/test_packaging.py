"""Packaging: ranges in the package, exact pins in constraints.txt, and a clear error for a missing extra."""

import sys
from importlib import metadata
from pathlib import Path

import pytest
from compresslight.callbacks import QuantizationCallback
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from compresslight.cli import sweep_command
from compresslight.optional import EXTRAS, require_extra

ROOT = Path(__file__).parents[1]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            pins[canonicalize_name(requirement.name)] = str(requirement.specifier).removeprefix("==")
    return pins


def declared() -> list[Requirement]:
    """compresslight's requirements as installed (install_requires and every extra)."""
    return [Requirement(text) for text in metadata.requires("compresslight")]


def test_every_dependency_is_a_range_and_its_pin_lies_in_it():
    pins = constraints()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert any(spec.operator == "<" for spec in requirement.specifier), f"{requirement} has no upper bound"
        assert any(spec.operator == ">=" for spec in requirement.specifier), f"{requirement} has no lower bound"
        assert name in pins, f"constraints.txt does not pin {name}"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"


def test_this_environment_has_the_pinned_versions():
    # The suite's numbers are for these versions: CI installs with `-c constraints.txt`.
    for name, version in constraints().items():
        assert metadata.version(name).split("+")[0] == version, name


def test_extras_install_the_modules_the_code_checks_for():
    extras = {}
    for requirement in declared():
        for extra in EXTRAS:
            if requirement.marker is not None and requirement.marker.evaluate({"extra": extra}):
                extras.setdefault(extra, set()).add(canonicalize_name(requirement.name))
    # Each module the code checks for comes with its extra (an extra may bring more, e.g. psycopg).
    for extra, modules in EXTRAS.items():
        assert set(map(canonicalize_name, modules)) <= extras[extra], extra
    assert {"lightning", "pytorch-lightning"} <= {canonicalize_name(r.name) for r in declared()}


@pytest.mark.parametrize("module", ["onnxruntime", "onnx"])
def test_int8_quantization_without_the_onnx_extra_fails_before_training(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # what Python does for a module that is not installed
    with pytest.raises(ImportError, match=rf"QuantizationCallback\(int8=True\).*needs {module}.*compresslight\[onnx\]"):
        QuantizationCallback()
    assert QuantizationCallback(int8=False).int8 is False


def test_sweep_without_optuna_names_the_sweep_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(
        ImportError, match=r"`cli.py sweep` needs optuna, which is not installed.*compresslight\[sweep\]"
    ):
        sweep_command(["--config", "configs/sweeps/resnet56_distiller_latency.yaml"])


def test_require_extra_passes_when_installed():
    for extra in EXTRAS:
        require_extra(extra, "this test")
