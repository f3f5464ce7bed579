"""Where a profile was measured: device, threads, library versions, host.

Latency only means something together with the machine it was measured on, so every
`ModelProfile` carries an `Environment`, and `compare` refuses to divide numbers from two
different ones unless told to (and then says so loudly).
"""

from __future__ import annotations

import dataclasses
import platform
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from compresslight.profiling.backends import backend_version


@dataclasses.dataclass
class Environment:
    """The machine and software one profile ran on.

    Attributes:
        device: the torch device string, e.g. "cpu" or "cuda:0".
        device_name: the CPU model (from /proc/cpuinfo) or the CUDA device name.
        threads: intra-op threads used for the measurement (torch and ONNX Runtime alike).
        torch_version: `torch.__version__`.
        backend_versions: version of every backend measured, e.g. {"torch": "2.13.0", ...}.
        hostname: the machine's network name.
        platform: `platform.platform()`, e.g. "Linux-6.8-x86_64-with-glibc2.36".
        python_version: `platform.python_version()`.
        cuda_version: `torch.version.cuda` for CUDA devices, else None.
    """

    device: str
    device_name: str
    threads: int
    torch_version: str
    backend_versions: dict[str, str]
    hostname: str
    platform: str
    python_version: str
    cuda_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Environment:
        return cls(**data)

    @property
    def label(self) -> str:
        """A column header such as "AMD EPYC (cpu, 1 thread)"."""
        plural = "" if self.threads == 1 else "s"
        return f"{self.device_name} ({self.device}, {self.threads} thread{plural})"

    def differences(self, other: Environment) -> list[str]:
        """What differs between two environments in ways that change measured latency.

        Python version and platform string are left out: they do not change kernel speed on
        their own, and the hostname already separates machines.
        """
        fields = ("hostname", "device", "device_name", "threads", "torch_version", "cuda_version")
        diffs = [
            f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}"
            for name in fields
            if getattr(self, name) != getattr(other, name)
        ]
        for backend in sorted(set(self.backend_versions) & set(other.backend_versions)):
            mine, theirs = self.backend_versions[backend], other.backend_versions[backend]
            if mine != theirs:
                diffs.append(f"{backend} version: {mine!r} vs {theirs!r}")
        return diffs


def resolve_device(device: str | torch.device) -> torch.device:
    """Parses `device` and checks that it exists on this machine.

    Args:
        device: "cpu", "cuda", "cuda:1", "mps" or a `torch.device`.

    Returns:
        The device, with the current CUDA index filled in for a bare "cuda".

    Raises:
        ValueError: if `device` does not parse, is of an unsupported type, or does not exist here.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"`device` must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({error})."
        ) from error
    if parsed.type == "cpu":
        return torch.device("cpu")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`device` {device!r} asks for CUDA, but no CUDA device is available on this machine.")
        index = torch.cuda.current_device() if parsed.index is None else parsed.index
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"`device` {device!r} does not exist: this machine has {count} CUDA device(s).")
        return torch.device("cuda", index)
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"`device` {device!r} asks for MPS, but MPS is not available on this machine.")
        return parsed
    raise ValueError(f"`device` must be of type 'cpu', 'cuda' or 'mps', got {device!r}.")


def device_name(device: torch.device) -> str:
    """A human-readable name of the processor behind `device`."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return cpu_model_name()


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo on Linux, else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def collect_environment(device: torch.device, threads: int, backends: Sequence[str]) -> Environment:
    """Describes this process's machine for a measurement on `device` with `threads` threads."""
    versions = {backend: backend_version(backend) for backend in backends}
    return Environment(
        device=str(device),
        device_name=str(device_name(device)),
        threads=int(threads),
        # Plain str, not TorchVersion: profiles live in checkpoints read with `weights_only=True`.
        torch_version=str(torch.__version__),
        backend_versions=versions,
        hostname=socket.gethostname(),
        platform=platform.platform(),
        python_version=platform.python_version(),
        cuda_version=str(torch.version.cuda) if device.type == "cuda" else None,
    )
