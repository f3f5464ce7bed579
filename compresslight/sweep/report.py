"""A sweep's reports, rewritten after every trial in its output folder.

- `results.csv`, `results.md`: one row per trial: number, state, parameters, objectives, top-1, params,
  duration, error;
- `pareto.csv`, `pareto.md`: the Pareto front (`study.best_trials`; the best trial for one objective);
- `top1_vs_latency.png`: validation top-1 against measured latency, Pareto front joined, base schedule marked.

`results.md` starts with the base schedule's objectives next to the best found for each.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from compresslight.sweep.spec import SweepSpec

log = logging.getLogger(__name__)

PLOT_NAME = "top1_vs_latency.png"
ACCURACY_KEY = "val/top1"
# User attribute of the trial that ran the base config's own values.
BASE_ATTR = "base_schedule"
_INFO_KEYS = ("val/top1", "compression/params", "compression/macs")


def write_reports(study: optuna.Study, spec: SweepSpec) -> list[Path]:
    """Writes the tables and the plot into `spec.output_dir`; returns the files written."""
    out = spec.output_dir
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    header, rows = results_table(trials, spec)
    written = [_write_csv(out / "results.csv", header, rows)]
    summary = _summary(trials, spec)
    (out / "results.md").write_text(f"# Sweep `{spec.study_name}`\n\n{summary}\n## Trials\n\n{_markdown(header, rows)}")
    written.append(out / "results.md")
    front = pareto_front(study)
    front_header, front_rows = results_table(front, spec)
    written.append(_write_csv(out / "pareto.csv", front_header, front_rows))
    (out / "pareto.md").write_text(f"# Pareto front of `{spec.study_name}`\n\n{_markdown(front_header, front_rows)}")
    written.append(out / "pareto.md")
    plot = plot_accuracy_vs_latency(trials, front, spec, out / PLOT_NAME)
    if plot is not None:
        written.append(plot)
    return written


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The completed trials no other trial beats on every objective (the best one for a single objective)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return sorted(study.best_trials, key=lambda t: t.number)


def results_table(trials: Sequence[FrozenTrial], spec: SweepSpec) -> tuple[list[str], list[list[Any]]]:
    """The rows of `results.csv`: one per trial, with a header."""
    info_keys = [key for key in _INFO_KEYS if key not in {o.name for o in spec.objectives}]
    header = (
        ["trial", "state", "base"]
        + [p.label for p in spec.parameters]
        + [o.name for o in spec.objectives]
        + info_keys
        + ["duration_s", "error"]
    )
    rows = []
    for trial in trials:
        metrics = trial.user_attrs.get("metrics", {})
        values = trial.values if trial.state == TrialState.COMPLETE and trial.values else [None] * len(spec.objectives)
        error = (trial.user_attrs.get("error") or "").strip().splitlines()
        rows.append(
            [trial.number, trial.state.name, "yes" if trial.user_attrs.get(BASE_ATTR) else ""]
            + [trial.params.get(p.path) for p in spec.parameters]
            + list(values)
            + [metrics.get(key) for key in info_keys]
            + [trial.user_attrs.get("duration_s"), error[0][:200] if error else ""]
        )
    return header, rows


def plot_accuracy_vs_latency(
    trials: Sequence[FrozenTrial], front: Sequence[FrozenTrial], spec: SweepSpec, path: Path
) -> Path | None:
    """Plots validation top-1 against latency for every trial that has both; None if none has.

    The latency is the first objective whose name says latency, else the trials' first
    `profile/inference_latency_ms/...` key.
    """
    latency_key = _latency_key(trials, spec)
    points = [
        (t, t.user_attrs.get("metrics", {}))
        for t in trials
        if latency_key is not None and {latency_key, ACCURACY_KEY} <= set(t.user_attrs.get("metrics", {}))
    ]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: sweeps run on machines without a display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    ordinary = [(t, m) for t, m in points if not t.user_attrs.get(BASE_ATTR)]
    axes.scatter(
        [m[latency_key] for _, m in ordinary], [100 * m[ACCURACY_KEY] for _, m in ordinary],
        color="tab:blue", alpha=0.6, label="trials",
    )  # fmt: skip
    front_numbers = {t.number for t in front}
    front_points = sorted((m[latency_key], 100 * m[ACCURACY_KEY]) for t, m in points if t.number in front_numbers)
    if front_points:
        axes.plot(
            *zip(*front_points),
            color="tab:red",
            marker="o",
            label="Pareto front" if len(spec.objectives) > 1 else "best",
        )
    for trial, metrics in points:
        if trial.user_attrs.get(BASE_ATTR):
            axes.scatter(
                [metrics[latency_key]], [100 * metrics[ACCURACY_KEY]], marker="*", s=250, color="gold",
                edgecolors="black", zorder=5, label="base schedule",
            )  # fmt: skip
    axes.set_xlabel(f"{latency_key} (lower is better)")
    axes.set_ylabel("validation top-1 (%)")
    axes.set_title(f"Sweep {spec.study_name}: {len(points)} trials")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _latency_key(trials: Sequence[FrozenTrial], spec: SweepSpec) -> str | None:
    for objective in spec.objectives:
        if "latency" in objective.name and "*" not in objective.name:
            return objective.name
    keys = sorted(
        {
            key
            for t in trials
            for key in t.user_attrs.get("metrics", {})
            if key.startswith("profile/inference_latency_ms/")
        }
    )
    return keys[0] if keys else None


def _summary(trials: Sequence[FrozenTrial], spec: SweepSpec) -> str:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    counts = {state.name: sum(1 for t in trials if t.state == state) for state in TrialState}
    lines = [
        f"Base config `{spec.base_config}` {' '.join(spec.base_args)}; storage `{spec.storage}`.",
        "",
        "Trials: " + ", ".join(f"{count} {name}" for name, count in counts.items() if count) + ".",
        "",
    ]
    durations = [t.user_attrs["duration_s"] for t in trials if "duration_s" in t.user_attrs]
    if durations:
        lines += [
            f"Time per trial: median {sorted(durations)[len(durations) // 2]:.1f} s, total {sum(durations):.0f} s.",
            "",
        ]
    if not complete:
        return "\n".join(lines)
    base = next((t for t in complete if t.user_attrs.get(BASE_ATTR)), None)
    lines += [
        "| objective | direction | base schedule | best | best trial | best vs base |",
        "|---|---|---|---|---|---|",
    ]
    for position, objective in enumerate(spec.objectives):
        pick = max if objective.direction == "maximize" else min
        best = pick(complete, key=lambda t: t.values[position])
        base_value = base.values[position] if base is not None else None
        change = (
            f"{100 * (best.values[position] - base_value) / abs(base_value):+.1f}%"
            if base_value not in (None, 0) else ""
        )  # fmt: skip
        lines.append(
            f"| {objective.name} | {objective.direction} | {_format(base_value)} | {_format(best.values[position])} "
            f"| {best.number} | {change} |"
        )
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows([["" if value is None else value for value in row] for row in rows])
    return path


def _markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_format(value).replace("|", "\\|") for value in row) + " |")
    return "\n".join(lines) + "\n"


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value.is_integer() and abs(value) >= 1000:
            return f"{int(value):,}"
        return f"{value:.4g}"
    return str(value)
