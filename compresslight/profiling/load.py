"""What else loaded the machine while something was measured.

A latency measured while other processes competed for the CPU is slower than the model; a
comparison is safe from that only if both sides saw the same load, and a reader should know
either way. `LoadMonitor` samples, at the start and the end of a measurement:

- the load average (`os.getloadavg`, where the platform has one);
- the machine's busy CPU time from `/proc/stat` (Linux) minus this process's own CPU time
  (`os.times`, all its threads): what every *other* process used, readable or not; and the
  hypervisor's steal time (a VM's neighbours);
- the CPU time of each other process whose `/proc/<pid>/stat` is readable, to name the busiest.

Hand-written rather than `psutil`: psutil is not a dependency of this project, and the three
numbers needed are two short files of `/proc`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from compresslight.checks import check_ratio

PROC = Path("/proc")
BUSY_THRESHOLD = 0.10
"""Other processes (plus steal) using at least this share of the machine's CPU time: busy."""


@dataclasses.dataclass
class ProcessLoad:
    """CPU time one other process used during a measurement."""

    pid: int
    name: str
    cpu_s: float


@dataclasses.dataclass
class MachineLoad:
    """The load on the machine during one measurement.

    Attributes:
        wall_s: how long the measurement took.
        cpu_count: logical CPUs.
        load_average_start: 1/5/15-minute load averages at the start ([] where unknown).
        load_average_end: the same at the end.
        own_cpu_s: CPU time of this process (all threads) during the measurement.
        other_cpu_s: CPU time of every other process, from `/proc/stat`; None where unreadable.
        steal_s: CPU time the hypervisor gave to other guests; None where unreadable.
        other_cpu_share: `(other_cpu_s + steal_s) / (wall_s * cpu_count)`: the share of the
            machine the measurement did not have; None where unknown.
        busiest_others: the other processes (readable ones) that used the most CPU time.
        busy: whether the measurement was taken on a busy machine (`other_cpu_share` at least
            `BUSY_THRESHOLD`; where unknown, a 1-minute load average above the CPU count).
    """

    wall_s: float
    cpu_count: int
    load_average_start: list[float]
    load_average_end: list[float]
    own_cpu_s: float
    other_cpu_s: float | None
    steal_s: float | None
    other_cpu_share: float | None
    busiest_others: list[ProcessLoad]
    busy: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MachineLoad:
        return cls(**{**data, "busiest_others": [ProcessLoad(**p) for p in data.get("busiest_others", [])]})

    def summary(self) -> str:
        """One line such as "busy: other processes used 38% of 2 CPUs (python 6.1 s); load 1.9"."""
        state = "BUSY" if self.busy else "idle"
        parts = []
        if self.other_cpu_share is not None:
            parts.append(f"other processes used {self.other_cpu_share:.0%} of {self.cpu_count} CPUs")
        if self.busiest_others:
            parts.append(", ".join(f"{p.name}[{p.pid}] {p.cpu_s:.1f} s" for p in self.busiest_others))
        if self.load_average_end:
            parts.append(f"load average {self.load_average_end[0]:.2f}")
        return f"{state}: " + "; ".join(parts) if parts else state


@dataclasses.dataclass
class _Sample:
    time_s: float
    own_cpu_s: float
    busy_s: float | None
    steal_s: float | None
    processes: dict[int, tuple[str, float]]
    load_average: list[float]


class LoadMonitor:
    """Records the machine's load between `start()` and `stop()`.

    Example:
        >>> monitor = LoadMonitor().start()
        >>> ...  # measure
        >>> load = monitor.stop()
    """

    def __init__(self, busy_threshold: float = BUSY_THRESHOLD, top: int = 3) -> None:
        check_ratio("busy_threshold", busy_threshold)
        self.busy_threshold = busy_threshold
        self.top = top
        self._start: _Sample | None = None

    def start(self) -> LoadMonitor:
        self._start = _sample()
        return self

    def stop(self) -> MachineLoad:
        """The load since `start()`.

        Raises:
            RuntimeError: if `start()` was not called.
        """
        if self._start is None:
            raise RuntimeError("LoadMonitor.stop() called before start().")
        start, end = self._start, _sample()
        wall = max(end.time_s - start.time_s, 1e-9)
        cpus = os.cpu_count() or 1
        own = max(end.own_cpu_s - start.own_cpu_s, 0.0)
        other = steal = share = None
        if start.busy_s is not None and end.busy_s is not None:
            other = max(end.busy_s - start.busy_s - own, 0.0)
            steal = max((end.steal_s or 0.0) - (start.steal_s or 0.0), 0.0)
            share = min((other + steal) / (wall * cpus), 1.0)
        others = [
            ProcessLoad(pid=pid, name=name, cpu_s=round(cpu - start.processes[pid][1], 3))
            for pid, (name, cpu) in end.processes.items()
            if pid in start.processes and cpu - start.processes[pid][1] > 0
        ]
        others.sort(key=lambda p: p.cpu_s, reverse=True)
        if share is not None:
            busy = share >= self.busy_threshold
        else:
            busy = bool(end.load_average) and end.load_average[0] > cpus
        return MachineLoad(
            wall_s=wall,
            cpu_count=cpus,
            load_average_start=start.load_average,
            load_average_end=end.load_average,
            own_cpu_s=own,
            other_cpu_s=other,
            steal_s=steal,
            other_cpu_share=share,
            busiest_others=others[: self.top],
            busy=busy,
        )


def _sample() -> _Sample:
    times = os.times()
    busy, steal = _system_cpu_s()
    return _Sample(
        time_s=time.monotonic(),
        own_cpu_s=times.user + times.system,
        busy_s=busy,
        steal_s=steal,
        processes=_other_processes(),
        load_average=_load_average(),
    )


def _load_average() -> list[float]:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def _ticks_per_s() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100.0


def _system_cpu_s() -> tuple[float | None, float | None]:
    """(busy, steal) CPU seconds of the whole machine since boot, from the first line of /proc/stat."""
    try:
        fields = (PROC / "stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None, None
    if fields[0] != "cpu" or len(fields) < 8:
        return None, None
    values = [int(v) for v in fields[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = values[:7]
    steal = values[7] if len(values) > 7 else 0
    ticks = _ticks_per_s()
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def _other_processes() -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds so far) of every readable process but this one."""
    own = os.getpid()
    ticks = _ticks_per_s()
    processes = {}
    try:
        entries = [entry for entry in PROC.iterdir() if entry.name.isdigit()]
    except OSError:
        return {}
    for entry in entries:
        pid = int(entry.name)
        if pid == own:
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # gone, or not ours to read
            continue
        # The name is in parentheses and may contain spaces; the numbers follow the last ")".
        name = text[text.find("(") + 1 : text.rfind(")")]
        rest = text[text.rfind(")") + 2 :].split()
        try:
            processes[pid] = (name, (int(rest[11]) + int(rest[12])) / ticks)  # utime, stime
        except (IndexError, ValueError):
            continue
    return processes
