"""Runtime-aware Tucker decomposition: time a factorization against the original, layer and model.

`RuntimeCheck` times one factorized layer against the original side by side
(`compresslight.profiling.side_by_side`) in every setting asked for; `check_whole_model` then
times the whole decomposed model and puts back, while it is significantly slower anywhere, the
layer that gained least alone there (`layer_to_revert`). Layer-alone timings do not add up to the
network's (see `compresslight.compression.tucker`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from compresslight.compression.lowrank import set_submodule
from compresslight.compression.tucker_layers import _is_int
from compresslight.compression.tucker_report import keep_layer
from compresslight.profiling.side_by_side import SLOWER, SideBySide
from compresslight.profiling.timing import LatencyStats, num_threads

log = logging.getLogger(__name__)

__all__ = ["RuntimeCheck", "check_whole_model", "layer_to_revert"]


@dataclasses.dataclass
class RuntimeCheck:
    """How `decompose_model` times a factorized layer against the original before replacing it.

    Each candidate layer runs on random inputs of its real input shape (captured from
    `example_inputs`), with the batch dimension set to each of `batch_sizes`, under each of
    `threads`, for inference (no grad) and, if `train`, a forward + backward (gradients of the
    input and the weights). The factorization replaces the layer only if its median latency is at
    most `(1 - margin)` times the original's in every setting.

    In each setting the two layers are measured side by side
    (`compresslight.profiling.side_by_side`): they alternate in at least `rounds` rounds (at most
    `max_rounds`, until the interval is narrower than `target_width` or `time_budget_s` is spent),
    and the speedup is the paired per-round ratio with a confidence interval and a verdict.

    With `whole_model`, the per-layer decisions are then checked on the whole model: the
    decomposed model and the original are measured the same way (copies: a train-mode forward
    moves BatchNorm statistics), and while the decomposed one is *significantly* slower in some
    setting (verdict "slower": the whole interval below 1), the replaced layer with the lowest
    layer-alone speedup in that setting is reverted. "Not distinguishable" is not slower: on a
    noisy machine a point estimate below 1 alone would revert layers on noise.

    Args:
        batch_sizes: batch sizes to time.
        threads: intra-op thread counts (`torch.set_num_threads`, restored after); None keeps the
            current setting.
        device: where to time (the layers are copied there if they live elsewhere).
        margin: the relative speedup required, in [0, 1).
        warmup: untimed calls per measurement.
        iters: timed calls per measurement (median taken).
        train: also time forward + backward.
        rounds: side-by-side rounds per setting before a stopping rule applies (>= 2).
        whole_model: check the decomposed model as a whole and revert layers until it is not
            significantly slower than the original in any setting.
        max_rounds: rounds at most per setting; None: `rounds` (a fixed number).
        target_width: stop a setting's rounds once the interval's (high - low) / estimate is
            at most this; None: no width rule.
        time_budget_s: stop a setting's rounds after this long; None: no budget.
        confidence: of the intervals and verdicts.
        progress: False: no progress bars; None: on a terminal.

    Raises:
        ValueError: for an empty or non-positive batch size / thread list, `margin` outside [0, 1),
            `warmup` < 0, `iters` < 1, `rounds` < 2, or invalid side-by-side options.
    """

    batch_sizes: Sequence[int] = (1,)
    threads: Sequence[int | None] = (None,)
    device: str = "cpu"
    margin: float = 0.05
    warmup: int = 3
    iters: int = 20
    train: bool = False
    rounds: int = 3
    whole_model: bool = True
    max_rounds: int | None = None
    target_width: float | None = None
    time_budget_s: float | None = None
    confidence: float = 0.95
    progress: bool | None = None

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(self.batch_sizes)
        self.threads = tuple(self.threads)
        if not self.batch_sizes or not all(_is_int(b) and b >= 1 for b in self.batch_sizes):
            raise ValueError(f"`batch_sizes` must be a non-empty sequence of ints >= 1, got {self.batch_sizes!r}.")
        if not self.threads or not all(t is None or (_is_int(t) and t >= 1) for t in self.threads):
            raise ValueError(f"`threads` must be a non-empty sequence of ints >= 1 or None, got {self.threads!r}.")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"`margin` must be in [0, 1), got {self.margin!r}.")
        if not _is_int(self.warmup) or self.warmup < 0:
            raise ValueError(f"`warmup` must be an int >= 0, got {self.warmup!r}.")
        if not _is_int(self.iters) or self.iters < 1:
            raise ValueError(f"`iters` must be an int >= 1, got {self.iters!r}.")
        if not _is_int(self.rounds) or self.rounds < 2:
            raise ValueError(
                f"`rounds` must be an int >= 2 (an interval needs two paired rounds), got {self.rounds!r}."
            )
        self.side_by_side = SideBySide(
            warmup=self.warmup, iters=self.iters, min_rounds=self.rounds,
            max_rounds=self.rounds if self.max_rounds is None else self.max_rounds,
            target_width=self.target_width, time_budget_s=self.time_budget_s, confidence=self.confidence,
        )  # fmt: skip
        try:
            torch.device(self.device)
        except RuntimeError as error:
            raise ValueError(
                f"`device` must be a torch device string such as 'cpu' or 'cuda:0', got {self.device!r}."
            ) from error

    def measure(
        self,
        original: nn.Module,
        factorized: nn.Module,
        input_shape: tuple[int, ...],
        settings: Collection[tuple[int, int, str]] | None = None,
    ) -> list[dict[str, Any]]:
        """Times both layers in every setting; one plain-data row per setting.

        Args:
            original: the dense layer.
            factorized: its replacement candidate.
            input_shape: the layer's input shape (any batch size; it is replaced).
            settings: only these (batch size, threads in effect, mode) settings; None: all.

        Returns:
            Rows with `batch_size`, `threads`, `mode` ("inference" / "train"), `original` and
            `factorized` latency (seconds, over the per-round medians: min, median, max; `iters`
            per round), `speedup` (paired estimate), `low` / `high` (its interval), `verdict`,
            `rounds` and `busy` (measured on a busy machine).
        """
        device = torch.device(self.device)
        original, factorized = _on_device(original, device), _on_device(factorized, device)
        dtype = next(original.parameters()).dtype
        modes = ("inference", "train") if self.train else ("inference",)
        rows = []
        for threads in self.threads:
            with num_threads(threads) as active_threads:
                for batch_size in self.batch_sizes:
                    x = torch.randn((batch_size, *input_shape[1:]), device=device, dtype=dtype)
                    for mode in modes:
                        if settings is not None and (batch_size, active_threads, mode) not in settings:
                            continue
                        setting = {"batch_size": batch_size, "threads": active_threads, "mode": mode}
                        with self._calls(original, factorized, x, mode) as calls:
                            result = self.side_by_side.run(
                                calls, "original", device=device, setting=setting, progress=self.progress
                            )
                        paired = result.speedup_of("factorized")
                        rows.append(
                            {
                                **setting,
                                "original": self._stats(result.round_latencies_s["original"]),
                                "factorized": self._stats(result.round_latencies_s["factorized"]),
                                "speedup": paired.estimate,
                                "low": paired.low,
                                "high": paired.high,
                                "verdict": paired.verdict,
                                "rounds": paired.rounds,
                                "busy": result.load.busy,
                            }
                        )
        return rows

    def summary(self) -> dict[str, Any]:
        """The settings a report shows (`TuckerReport.runtime_check`), as plain data."""
        return {
            "batch_sizes": list(self.batch_sizes),
            "threads": list(self.threads),
            "device": self.device,
            "margin": self.margin,
            "train": self.train,
            "warmup": self.warmup,
            "iters": self.iters,
            "rounds": self.rounds,
            "max_rounds": self.side_by_side.max_rounds,
            "confidence": self.confidence,
            "whole_model": self.whole_model,
        }

    def is_faster(self, rows: Sequence[Mapping[str, Any]]) -> bool:
        """Whether the factorized layer beat the original by `margin` in every measured setting."""
        return all(row["speedup"] * (1.0 - self.margin) >= 1.0 for row in rows)

    def _stats(self, round_medians: Sequence[float]) -> dict[str, Any]:
        stats = LatencyStats(
            min_s=min(round_medians), median_s=float(np.median(round_medians)), max_s=max(round_medians),
            iters=self.iters,
        )  # fmt: skip
        return stats.to_dict()

    @contextlib.contextmanager
    def _calls(
        self, original: nn.Module, factorized: nn.Module, x: torch.Tensor, mode: str
    ) -> Iterator[dict[str, Callable[[], Any]]]:
        """The two calls to time, in `mode` (as the ProfileCallback runs a whole model); modes restored after."""
        layers = {"original": original, "factorized": factorized}
        was_training = {name: layer.training for name, layer in layers.items()}
        try:
            for layer in layers.values():
                layer.train(mode == "train")
            if mode == "inference":
                with torch.inference_mode():
                    yield {name: functools.partial(layer, x) for name, layer in layers.items()}
                return
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                yield {name: self._backward_call(layer, x) for name, layer in layers.items()}
        finally:
            for name, layer in layers.items():
                layer.train(was_training[name])

    @staticmethod
    def _backward_call(layer: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
        params = [p for p in layer.parameters() if p.requires_grad]
        grad_output = torch.ones_like(layer(x))
        # autograd.grad rather than backward(): no `.grad` accumulation into the real layer's
        # parameters, and the same work as a training step's backward through this layer (the
        # gradient of its input is needed by the layers before it).
        return lambda: torch.autograd.grad(layer(x), [x, *params], grad_output)


def check_whole_model(
    model: nn.Module,
    replacements: dict[str, nn.Module],
    report: Mapping[str, dict[str, Any]],
    check: RuntimeCheck,
    example_inputs: torch.Tensor | tuple[Any, ...],
) -> list[dict[str, Any]]:
    """Times the decomposed model against `model`; reverts layers (in `replacements`, `report`)
    until it is not significantly slower in any setting.

    Returns one dict per check: `rows` (`RuntimeCheck.measure` of the original vs the decomposed
    model, in every setting or in those that were slower before) and `reverted` (the layer put
    back after it, or None).

    After a revert only the settings that were significantly slower are timed again (a whole-model train step
    at a large batch costs seconds per call); once they pass, every setting is timed again, and
    only a check of every setting ends the loop.
    """
    inputs = example_inputs[0] if isinstance(example_inputs, tuple) else example_inputs
    original = copy.deepcopy(model)  # copies: train-mode timing moves BatchNorm statistics
    checks: list[dict[str, Any]] = []
    pending: set[tuple[int, int, str]] | None = None  # None: every setting
    while replacements:
        decomposed = copy.deepcopy(model)
        for name, module in replacements.items():
            set_submodule(decomposed, name, copy.deepcopy(module))
        rows = check.measure(original, decomposed, tuple(inputs.shape), settings=pending)
        slower = [row for row in rows if row["verdict"] == SLOWER]
        if not slower:
            checks.append({"rows": rows, "reverted": None})
            if pending is None:
                worst = min(rows, key=lambda row: row["speedup"])
                log.info(
                    "Tucker: the decomposed model is not significantly slower in any setting "
                    "(worst %.2fx [%.2f, %.2f]).",
                    worst["speedup"], worst["low"], worst["high"],
                )  # fmt: skip
                break
            pending = None
            continue
        slowest = min(slower, key=lambda row: row["speedup"])
        pending = {(row["batch_size"], row["threads"], row["mode"]) for row in slower}
        setting = (slowest["batch_size"], slowest["threads"], slowest["mode"])
        reverted = layer_to_revert({name: report[name]["latency"] for name in replacements}, setting)
        checks.append({"rows": rows, "reverted": reverted})
        del replacements[reverted]
        keep_layer(
            report[reverted],
            f"reverted: the decomposed model was {slowest['speedup']:.2f}x "
            f"[{slowest['low']:.2f}, {slowest['high']:.2f}] "
            f"(significantly slower) at batch {setting[0]}, "
            f"{setting[1]} thread(s), {setting[2]}, and this layer gained least there alone",
        )
    return checks


def layer_to_revert(latency: Mapping[str, Sequence[Mapping[str, Any]]], setting: tuple[int, int, str]) -> str:
    """The layer whose layer-alone speedup in `setting` (batch size, threads, mode) is lowest.

    Args:
        latency: layer name -> its `RuntimeCheck.measure` rows.
        setting: where the whole model was slower.
    """

    def speedup(name: str) -> float:
        for row in latency[name]:
            if (row["batch_size"], row["threads"], row["mode"]) == setting:
                return row["speedup"]
        raise ValueError(
            f"Layer {name!r} has no measurement at batch {setting[0]}, {setting[1]} thread(s), {setting[2]}."
        )

    return min(latency, key=speedup)


def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
    parameter = next(module.parameters())
    if parameter.device == device or (device.type == parameter.device.type and device.index is None):
        return module
    # A copy: moving the model's own layer would move part of the model.
    return copy.deepcopy(module).to(device)
