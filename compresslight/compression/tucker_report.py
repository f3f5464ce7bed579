"""The Tucker decomposition report: one row per considered layer, model totals, Markdown.

`decompose_model` fills a plain-data row per layer (`layer_row`, `keep_layer`) into its
`TuckerRecord`; `TuckerReport` adds the model's params and MACs before and after (counted with
the one MAC counter, `compresslight.profiling.counting.count_macs`) and renders it all
(`to_dict()` is `tucker_report.json`, `to_markdown()` is `tucker_report.md`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from compresslight.profiling.counting import count_macs
from compresslight.profiling.side_by_side import FASTER, format_speedup

log = logging.getLogger("compresslight.compression.tucker")

__all__ = ["ModelCost", "TuckerReport", "keep_layer", "layer_macs", "layer_row", "model_cost"]


def layer_row(name: str, layer: nn.Module) -> dict[str, Any]:
    """The report row of a considered layer, before any decision.

    `name`, `type`, `method`, `ranks`, `params_before`/`_after`, `macs_before`/`_after` (batch 1;
    None without example inputs), `latency` (rows of `RuntimeCheck.measure`, [] when not
    runtime-aware), `decision` ("decomposed" / "kept") and `reason`.
    """
    return {
        "name": name,
        "type": "linear" if isinstance(layer, nn.Linear) else "conv2d",
        "method": None,
        "ranks": None,
        "params_before": num_params(layer),
        "params_after": None,
        "macs_before": None,
        "macs_after": None,
        "latency": [],
        "decision": None,
        "reason": None,
    }


def keep_layer(row: dict[str, Any], reason: str) -> None:
    """Marks the row's layer as kept (not decomposed), with the reason."""
    row["decision"], row["reason"] = "kept", reason
    log.info("Tucker: keeping %s: %s.", row["name"], reason)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_macs(layer: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward of `layer` at batch 1 of `input_shape` (eval mode, no grad)."""
    parameter = next(layer.parameters(), None)
    example = torch.zeros(
        (1, *input_shape[1:]),
        device=parameter.device if parameter is not None else None,
        dtype=parameter.dtype if parameter is not None else None,
    )
    return model_cost(layer, example).macs


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Parameters and forward MACs at batch 1."""

    params: int
    macs: int


def model_cost(module: nn.Module, inputs: torch.Tensor) -> ModelCost:
    """Parameters and forward MACs at batch 1 of `module` on `inputs[:1]` (run in eval mode)."""
    was_training = module.training
    module.eval()  # a train-mode forward would move BatchNorm's running statistics
    try:
        macs = count_macs(module, inputs[:1])[0]
    finally:
        module.train(was_training)
    return ModelCost(params=num_params(module), macs=macs)


@dataclasses.dataclass
class TuckerReport:
    """A decomposition: its settings, model totals before/after and the rows of its record.

    Attributes:
        rank_method: as given to `decompose_model`.
        runtime_check: the `RuntimeCheck` settings (`RuntimeCheck.settings()`), None if not runtime-aware.
        seconds: how long the decomposition took.
        before, after: the model's params and MACs (batch 1).
        decomposed: the names of the replaced layers.
        layers: `TuckerRecord.report`: one row per considered layer.
        whole_model: `TuckerRecord.whole_model`: the whole-model checks.
        callback: who made it (`tucker_report.json` names the callback), or None.
        epoch: the training epoch it was made at, or None.
    """

    rank_method: Any
    runtime_check: dict[str, Any] | None
    seconds: float
    before: ModelCost
    after: ModelCost
    decomposed: list[str]
    layers: list[dict[str, Any]]
    whole_model: list[dict[str, Any]]
    callback: str | None = None
    epoch: int | None = None

    @property
    def theoretical_speedup(self) -> float:
        """MACs before / after."""
        return self.before.macs / max(self.after.macs, 1)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form (`tucker_report.json`)."""
        return {
            "callback": self.callback,
            "epoch": self.epoch,
            "rank_method": self.rank_method,
            "runtime_check": self.runtime_check,
            "seconds": self.seconds,
            "params_before": self.before.params,
            "params_after": self.after.params,
            "macs_before": self.before.macs,
            "macs_after": self.after.macs,
            "theoretical_speedup": self.theoretical_speedup,
            "decomposed": self.decomposed,
            "layers": self.layers,
            "whole_model": self.whole_model,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TuckerReport:
        """Reads `to_dict()`'s form back (e.g. a `tucker_report.json`)."""
        return cls(
            rank_method=data["rank_method"],
            runtime_check=data.get("runtime_check"),
            seconds=data["seconds"],
            before=ModelCost(data["params_before"], data["macs_before"]),
            after=ModelCost(data["params_after"], data["macs_after"]),
            decomposed=list(data["decomposed"]),
            layers=list(data["layers"]),
            whole_model=list(data.get("whole_model") or []),
            callback=data.get("callback"),
            epoch=data.get("epoch"),
        )

    def to_markdown(self) -> str:
        """Totals, then one row per considered layer, then the whole-model checks."""
        lines = [f"# Tucker-2 decomposition (rank method: {self.rank_method})", ""]
        check = self.runtime_check
        if check:
            threads = ", ".join("current" if t is None else str(t) for t in check["threads"])
            lines += [
                f"Runtime-aware on `{check['device']}`: batch sizes {check['batch_sizes']}, threads [{threads}], "
                f"{'inference and train step' if check['train'] else 'inference'}; a factorization must be "
                f"{check['margin']:.0%} faster in every setting.",
                "",
            ]
        lines += [
            f"Decomposed {len(self.decomposed)} layers in {self.seconds:.2f} s.",
            "",
            "| | params | MACs (batch 1) |",
            "|---|---:|---:|",
            f"| before | {self.before.params:,} | {self.before.macs:,} |",
            f"| after | {self.after.params:,} | {self.after.macs:,} |",
            f"| ratio | {self.before.params / max(self.after.params, 1):.2f}x | {self.theoretical_speedup:.2f}x |",
            "",
        ]
        lines += _layer_table(self.layers)
        if self.whole_model:
            lines += _whole_model_table(self.whole_model)
        return "\n".join(lines) + "\n"


def _settings(rows: Any) -> list[tuple[str, int, Any]]:
    """The distinct (mode, batch size, threads) of latency rows, in order of appearance."""
    return list(dict.fromkeys((row["mode"], row["batch_size"], row["threads"]) for row in rows))


def _layer_table(layers: list[dict[str, Any]]) -> list[str]:
    settings = _settings(row for layer in layers for row in layer["latency"])
    header = ["layer", "method", "ranks", "params", "MACs"]
    header += [f"{mode} bs{batch} t{threads} ms" for mode, batch, threads in settings]
    header += ["decision", "reason"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for layer in layers:
        ranks = "-" if layer["ranks"] is None else "x".join(str(rank) for rank in layer["ranks"])
        cells = [
            layer["name"],
            layer["method"] or "-",
            ranks,
            _before_after(layer["params_before"], layer["params_after"]),
            _before_after(layer["macs_before"], layer["macs_after"]),
        ]
        measured = {(row["mode"], row["batch_size"], row["threads"]): row for row in layer["latency"]}
        for setting in settings:
            cells.append(_latency_cell(measured.get(setting), digits=3))
        cells += [layer["decision"] or "-", layer["reason"] or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _latency_cell(row: dict[str, Any] | None, digits: int) -> str:
    """`original -> factorized` median ms and the speedup of one setting, or "-" when it was not measured."""
    if row is None:
        return "-"
    before, after = row["original"]["median_s"] * 1e3, row["factorized"]["median_s"] * 1e3
    return f"{before:.{digits}f} -> {after:.{digits}f} ({_speedup(row)})"


def _whole_model_table(checks: list[dict[str, Any]]) -> list[str]:
    lines = ["", "Whole-model checks (original -> decomposed, median ms, side-by-side speedup [interval]):", ""]
    settings = _settings(r for c in checks for r in c["rows"])
    header = ["check"] + [f"{mode} bs{batch} t{threads}" for mode, batch, threads in settings] + ["then"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for number, check in enumerate(checks, 1):
        measured = {(r["mode"], r["batch_size"], r["threads"]): r for r in check["rows"]}
        cells = [str(number)]
        for setting in settings:
            cells.append(_latency_cell(measured.get(setting), digits=2))
        if check["reverted"] is not None:
            cells.append(f"revert {check['reverted']}")
        else:
            cells.append("done" if check is checks[-1] else "time every setting again")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _speedup(row: Mapping[str, Any]) -> str:
    """`1.23x [1.15, 1.31] slower` (the verdict only when it is not "faster"), or `1.23x` for old reports."""
    if row.get("low") is None:
        return f"{row['speedup']:.2f}x"
    text = format_speedup(row["speedup"], row["low"], row["high"])
    return text if row.get("verdict") == FASTER else f"{text} {row.get('verdict')}"


def _before_after(before: int | None, after: int | None) -> str:
    if before is None:
        return "-"
    return f"{before:,}" if after is None else f"{before:,} -> {after:,}"
