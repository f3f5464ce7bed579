"""Pruning sensitivity (paper 002 grouped ResNet56's layers by it): each layer or pattern group is
pruned alone on a copy at several ratios, without retraining, and a metric is reported per layer
and ratio, to choose per-layer ratios.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from compresslight.compression.pruning import EmptiesLayerError, match_ratios, prune_filters
from compresslight.compression.pruning_graph import (
    ROOT_TYPES,
    ExampleInputs,
    analyze_structure,
    inputs_on,
    traceable_copy,
)
from compresslight.compression.unstructured import masked_parameters

log = logging.getLogger(__name__)

__all__ = ["SensitivityReport", "SensitivityRow", "sensitivity_analysis"]


@dataclasses.dataclass
class SensitivityRow:
    """One pruned copy: `layer` (a layer or pattern) pruned alone by `ratio`."""

    layer: str
    ratio: float
    metric: float
    params: int


@dataclasses.dataclass
class SensitivityReport:
    """The metric of the model with each layer (or group) pruned alone, per ratio."""

    baseline_metric: float
    baseline_params: int
    rows: list[SensitivityRow]
    metric_name: str = "metric"
    norm: int = 2

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(row.layer for row in self.rows))

    @property
    def ratios(self) -> list[float]:
        return sorted({row.ratio for row in self.rows})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        """A table: one row per layer, one column per ratio, cells = metric."""
        ratios = self.ratios
        cells = {(row.layer, row.ratio): row.metric for row in self.rows}
        lines = [
            f"Sensitivity (L{self.norm} filter pruning, no retraining): {self.metric_name} with each layer (group) "
            "pruned alone; "
            f"unpruned {self.baseline_metric:.4g} ({self.baseline_params:,} params).",
            "",
            "| layer | " + " | ".join(f"{ratio:g}" for ratio in ratios) + " |",
            "|---|" + "---|" * len(ratios),
        ]
        for layer in self.layers:
            values = [f"{cells[layer, r]:.4g}" if (layer, r) in cells else "-" for r in ratios]
            lines.append(f"| {layer} | " + " | ".join(values) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Writes one curve per layer (metric vs ratio) and the unpruned metric to `path`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure, axes = plt.subplots(figsize=(8, 5))
        for layer in self.layers:
            rows = sorted((row for row in self.rows if row.layer == layer), key=lambda row: row.ratio)
            axes.plot([row.ratio for row in rows], [row.metric for row in rows], marker="o", label=layer)
        axes.axhline(self.baseline_metric, color="black", linestyle="--", label="unpruned")
        axes.set_xlabel("fraction of channels removed")
        axes.set_ylabel(self.metric_name)
        axes.set_title(f"Pruning sensitivity (L{self.norm}, no retraining)")
        axes.legend(fontsize="small", ncol=max(1, math.ceil(len(self.layers) / 12)), loc="best")
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)
        return path


def sensitivity_analysis(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    example_inputs: ExampleInputs,
    layer_patterns: Sequence[str] | None = None,
    ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    norm: int = 2,
    metric_name: str = "metric",
) -> SensitivityReport:
    """Prunes each layer (or each pattern's layers) alone on a copy, per ratio, and evaluates it.

    No retraining: this measures how much each layer's channels matter, to choose per-layer
    ratios (paper 002 grouped ResNet56's layers by it). `model` is never edited; each
    evaluation gets a fresh pruned deep copy.

    Args:
        model: the trained network.
        evaluate: returns the metric (e.g. validation top-1) of a model it is given.
        example_inputs: a batch for tracing.
        layer_patterns: the units to prune, each a glob pattern pruned as one (`layer1.*.conv1`);
            default: every prunable layer, one per coupled group (a residual stage's coupled
            layers are named by its first layer).
        ratios: fractions removed, each in (0, 1). A ratio that would empty a layer is skipped
            (logged).
        norm: 1 or 2, the channel-ranking norm.
        metric_name: the metric's name in the table and plot.

    Raises:
        ValueError: for a ratio outside (0, 1), a norm other than 1 or 2, a pattern matching no
            prunable layer, or a model holding unstructured pruning masks.
    """
    if not ratios:
        raise ValueError("`ratios` must hold at least one ratio, got none.")
    for ratio in ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ValueError(f"`ratios` must each be in (0, 1), got {ratio!r}.")
    if norm not in (1, 2) or isinstance(norm, bool):
        raise ValueError(f"`norm` must be 1 or 2, got {norm!r}.")
    if masked_parameters(model):
        raise ValueError("`model` holds unstructured pruning masks; call `make_pruning_permanent(model)` first.")

    work = traceable_copy(model)
    structure = analyze_structure(work, inputs_on(work, example_inputs), [])
    if layer_patterns is None:
        # One unit per coupled group (pruning any of its layers prunes all), named by its first
        # convolution / linear in module order.
        order = {name: position for position, name in enumerate(structure.names.values())}
        units = []
        for _, members in structure.groups:
            layers = [structure.names[m] for m in members if isinstance(m, ROOT_TYPES)]
            if layers:
                units.append(min(layers, key=order.__getitem__))
        units.sort(key=order.__getitem__)
    else:
        if isinstance(layer_patterns, str):
            raise ValueError(f"`layer_patterns` must be a list of patterns, got the string {layer_patterns!r}.")
        match_ratios({pattern: 0.0 for pattern in layer_patterns}, structure.prunable, "layer_patterns")
        units = list(layer_patterns)

    baseline = float(evaluate(copy.deepcopy(model)))
    rows = []
    for unit in units:
        for ratio in ratios:
            pruned = copy.deepcopy(model)
            try:
                prune_filters(pruned, ratios={unit: ratio}, norm=norm, example_inputs=example_inputs)
            except EmptiesLayerError as error:
                log.warning("Sensitivity: skipping %s at ratio %g: %s", unit, ratio, error)
                continue
            metric = float(evaluate(pruned))
            rows.append(SensitivityRow(unit, float(ratio), metric, sum(p.numel() for p in pruned.parameters())))
            log.info("Sensitivity: %s pruned by %g -> %s %.4g.", unit, ratio, metric_name, metric)
    return SensitivityReport(
        baseline_metric=baseline,
        baseline_params=sum(p.numel() for p in model.parameters()),
        rows=rows,
        metric_name=metric_name,
        norm=norm,
    )
