"""Pruning schedules: at which epochs to prune, and how far toward the final target each step goes.

Pure arithmetic beside `prune_filters`; `PruningCallback` only decides when to call them.

- `PruningSchedule(epoch)` is the cumulative fraction of the final target to reach at the start
  of `epoch` (None: no pruning then). Built from a list of epochs with explicit `targets`, or
  Distiller-style from `start_epoch` / `end_epoch` / `frequency` with a ramp.
- Ramps: `constant_ramp` (equal increments) and `agp_ramp` (the cubic automated-gradual-pruning
  ramp of Zhu & Gupta 2017, fast first).
- `final_group_ratios` fixes each coupled group's original width and final ratio at the first
  step; `step_ratios_toward` turns a step's fraction into ratios of the *current* widths.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from compresslight.compression.pruning import match_ratios
from compresslight.compression.pruning_graph import out_channels

__all__ = ["RAMPS", "PruningSchedule", "agp_ramp", "constant_ramp", "final_group_ratios", "step_ratios_toward"]


def constant_ramp(steps: int) -> list[float]:
    """Equal increments: step k of n reaches (k + 1) / n of the final target."""
    return [(step + 1) / steps for step in range(steps)]


def agp_ramp(steps: int) -> list[float]:
    """Zhu & Gupta's cubic ramp: step k of n reaches 1 - (1 - (k + 1) / n) ** 3 (most pruning early)."""
    return [1 - (1 - (step + 1) / steps) ** 3 for step in range(steps)]


RAMPS: dict[str, Callable[[int], list[float]]] = {"constant": constant_ramp, "agp": agp_ramp}


@dataclasses.dataclass(frozen=True)
class PruningSchedule:
    """The pruning epochs and the cumulative fraction of the final target reached at each.

    Build it with `PruningSchedule.build`, which validates; call it with an epoch.
    """

    epochs: list[int]
    targets: list[float]

    @classmethod
    def build(
        cls,
        epochs: Sequence[int] | None = None,
        targets: Sequence[float] | None = None,
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        frequency: int = 1,
        ramp: str = "constant",
    ) -> PruningSchedule:
        """`epochs` (default `[0]`: once, before training) or `start_epoch`..`end_epoch` every
        `frequency` epochs; `targets` per epoch, or the `ramp`'s.

        Raises:
            ValueError: for both kinds of epochs, epochs not increasing or negative, a bad range or
                frequency, targets not one increasing fraction in (0, 1] per epoch, or an unknown ramp.
        """
        schedule_epochs = _schedule_epochs(epochs, start_epoch, end_epoch, frequency)
        return cls(schedule_epochs, _schedule_targets(schedule_epochs, targets, ramp))

    def __call__(self, epoch: int) -> float | None:
        """The fraction of the final target to reach at the start of `epoch`, None if it is not a pruning epoch."""
        return self.targets[self.epochs.index(epoch)] if epoch in self.epochs else None


def _schedule_epochs(
    epochs: Sequence[int] | None, start_epoch: int | None, end_epoch: int | None, frequency: int
) -> list[int]:
    if start_epoch is not None or end_epoch is not None:
        if epochs is not None:
            raise ValueError("Give either `epochs` or `start_epoch`/`end_epoch`, not both.")
        if start_epoch is None or end_epoch is None or not 0 <= start_epoch <= end_epoch:
            raise ValueError(
                "`start_epoch` and `end_epoch` must satisfy 0 <= start_epoch <= end_epoch, "
                f"got {start_epoch!r} and {end_epoch!r}."
            )
        if frequency < 1:
            raise ValueError(f"`frequency` must be >= 1, got {frequency!r}.")
        return list(range(start_epoch, end_epoch + 1, frequency))
    epochs = [0] if epochs is None else list(epochs)
    if not epochs or any(e < 0 for e in epochs) or epochs != sorted(set(epochs)):
        raise ValueError(f"`epochs` must be increasing epochs >= 0, got {epochs!r}.")
    return epochs


def _schedule_targets(epochs: list[int], targets: Sequence[float] | None, ramp: str) -> list[float]:
    steps = len(epochs)
    if targets is not None:
        targets = list(targets)
        if len(targets) != steps or any(not 0 < t <= 1 for t in targets) or targets != sorted(targets):
            raise ValueError(
                f"`targets` must be {steps} increasing fractions in (0, 1], one per pruning epoch {epochs}, "
                f"got {targets!r}."
            )
        return targets
    if ramp not in RAMPS:
        raise ValueError(f"`ramp` must be 'constant' or 'agp', got {ramp!r}.")
    return RAMPS[ramp](steps)


def final_group_ratios(
    model: nn.Module, groups: Sequence[Sequence[str]], ratios: Mapping[str, float], amount: float | None
) -> dict[str, tuple[int, float]]:
    """Each coupled group's root (from `prunable_groups`): its original width and the group's final
    ratio (last matching pattern wins, then `amount`); groups left at 0 are omitted.

    One ratio per group, as `prune_filters` applies them: per-layer ratios of the current widths
    would differ between coupled layers of different widths.

    Raises:
        ValueError: for a pattern that matches no prunable layer, or two different ratios on the
            layers of one coupled group.
    """
    match_ratios(ratios, [name for group in groups for name in group])
    layers = dict(model.named_modules())
    final = {}
    for group in groups:
        given = {}
        for name in group:
            for pattern, pattern_ratio in ratios.items():
                if fnmatch.fnmatchcase(name, pattern):
                    given[name] = pattern_ratio
        if len(set(given.values())) > 1:
            raise ValueError(
                f"Layers {list(group)} are coupled (they share channels, e.g. through a residual add) and must be "
                f"pruned together, but `ratios` gives them different ratios {given}."
            )
        ratio = next(iter(given.values())) if given else (amount or 0.0)
        if ratio > 0:
            final[group[0]] = (out_channels(layers[group[0]]), ratio)
    return final


def step_ratios_toward(model: nn.Module, final: Mapping[str, tuple[int, float]], goal: float) -> dict[str, float]:
    """Per-layer fractions of the *current* channels that bring each group root of `final` to
    `goal` x its final ratio of the *original* channels (roots already there are omitted).

    Counting against the original widths keeps a multi-step schedule from drifting by a rounding
    error per step.
    """
    layers = dict(model.named_modules())
    ratios = {}
    for name, (original, final_ratio) in final.items():
        current = out_channels(layers[name])
        keep = int(original * (1 - final_ratio * goal))  # torch-pruning's rounding
        if keep < current:
            # torch-pruning keeps int(current * (1 - ratio)) channels; the half channel makes that
            # land on `keep` despite floating-point error.
            ratios[name] = 1 - (keep + 0.5) / current
    return ratios
