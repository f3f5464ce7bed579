"""Which layers `decompose_model` considers and at which ranks: patterns, rank dicts, VBMF.

Checks the options and the layer patterns against the model before anything is computed (so a
typo fails before training), and chooses each layer's ranks (`"vbmf"`, a fraction, or explicit).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from compresslight.compression.tucker_layers import (
    _OVERRIDES_FORWARD,
    DEFAULT_HOOI_ITERS,
    SVDSplit,
    TuckerConv2d,
    _check_tucker_ranks,
    _is_int,
    _mode_spectra,
    _overrides_forward,
    _vbmf_ranks,
)
from compresslight.compression.tucker_runtime import RuntimeCheck
from compresslight.compression.vbmf import estimate_rank

__all__ = ["RankMethod", "TuckerOptions", "selected_layers"]

RankMethod = Literal["vbmf"] | float | Mapping[str, "tuple[int, int] | int"]


@dataclasses.dataclass(frozen=True)
class TuckerOptions:
    """`decompose_model`'s choices of layers and ranks, checked when made (see `decompose_model`).

    Raises:
        ValueError: for empty or non-string patterns, a bad `rank_method`, `min_rank` < 1, an
            unknown `zero_rank` / `pointwise`, or `n_iter_max` < 0.
    """

    layer_patterns: Sequence[str] = ("*",)
    rank_method: RankMethod = "vbmf"
    skip_first_conv: bool = True
    min_rank: int = 1
    zero_rank: Literal["min_rank", "skip"] = "min_rank"
    pointwise: Literal["svd", "skip"] = "svd"
    include_linear: bool = False
    require_reduction: bool = True
    n_iter_max: int = DEFAULT_HOOI_ITERS

    def __post_init__(self) -> None:
        _validate_options(
            self.layer_patterns, self.rank_method, self.min_rank, self.zero_rank, self.pointwise, self.n_iter_max,
            None, None,
        )  # fmt: skip


def selected_layers(
    model: nn.Module,
    layer_patterns: Sequence[str] = ("*",),
    rank_method: RankMethod = "vbmf",
    *,
    skip_first_conv: bool = True,
    pointwise: Literal["svd", "skip"] = "svd",
    include_linear: bool = False,
) -> list[str]:
    """The layers `decompose_model` would consider with these arguments; `model` is not touched.

    Runs the same checks of the patterns and ranks against `model` as `decompose_model`, without
    computing a decomposition: for callers that must fail early, e.g. a callback that decomposes
    at a later epoch and should not train for epochs before finding a typo in a pattern.

    Returns:
        The candidate layer names, in module order (the first conv, grouped convs and, with
        `pointwise="skip"`, 1x1 convs among them are kept by `decompose_model`, with a reason).

    Raises:
        ValueError: as `decompose_model`, for the patterns, `rank_method` and `pointwise`.
    """
    _validate_options(layer_patterns, rank_method, 1, "min_rank", pointwise, DEFAULT_HOOI_ITERS, None, None)
    candidates, _ = _candidate_layers(model, layer_patterns, rank_method, skip_first_conv, pointwise, include_linear)
    return list(candidates)


def _candidate_layers(
    model: nn.Module,
    layer_patterns: Sequence[str],
    rank_method: Any,
    skip_first_conv: bool,
    pointwise: str,
    include_linear: bool,
) -> tuple[dict[str, nn.Module], str | None]:
    """(the selected decomposable layers, the model's first conv); validates a rank dict."""
    candidates = _select_layers(model, layer_patterns, include_linear)
    first_conv = next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if isinstance(rank_method, Mapping):
        candidates = _explicit_layers(candidates, rank_method, first_conv if skip_first_conv else None, pointwise)
    return candidates, first_conv


def _method_for(layer: nn.Module) -> str:
    if isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1):
        return "tucker2"
    return "svd"


def _validate_options(
    layer_patterns: Sequence[str],
    rank_method: Any,
    min_rank: int,
    zero_rank: str,
    pointwise: str,
    n_iter_max: int,
    runtime_aware: RuntimeCheck | None,
    example_inputs: Any,
) -> None:
    if (
        isinstance(layer_patterns, str)
        or not layer_patterns
        or not all(isinstance(pattern, str) and pattern for pattern in layer_patterns)
    ):
        raise ValueError(f"`layer_patterns` must be a non-empty sequence of non-empty strings, got {layer_patterns!r}.")
    if isinstance(rank_method, str):
        if rank_method != "vbmf":
            raise ValueError(
                f"`rank_method` must be 'vbmf', a fraction in (0, 1] or a dict of ranks, got {rank_method!r}."
            )
    elif isinstance(rank_method, float) or _is_int(rank_method):
        if not 0.0 < rank_method <= 1.0:
            raise ValueError(f"`rank_method` as a fraction must be in (0, 1], got {rank_method!r}.")
    elif not isinstance(rank_method, Mapping) or not rank_method:
        raise ValueError(
            f"`rank_method` must be 'vbmf', a fraction in (0, 1] or a non-empty dict of ranks, got {rank_method!r}."
        )
    if not _is_int(min_rank) or min_rank < 1:
        raise ValueError(f"`min_rank` must be an int >= 1, got {min_rank!r}.")
    if zero_rank not in ("min_rank", "skip"):
        raise ValueError(f"`zero_rank` must be 'min_rank' or 'skip', got {zero_rank!r}.")
    if pointwise not in ("svd", "skip"):
        raise ValueError(f"`pointwise` must be 'svd' or 'skip', got {pointwise!r}.")
    if not _is_int(n_iter_max) or n_iter_max < 0:
        raise ValueError(f"`n_iter_max` must be an int >= 0, got {n_iter_max!r}.")
    if runtime_aware is not None:
        if not isinstance(runtime_aware, RuntimeCheck):
            raise ValueError(f"`runtime_aware` must be a RuntimeCheck or None, got {type(runtime_aware).__name__}.")
        if example_inputs is None:
            raise ValueError(
                "`runtime_aware` needs `example_inputs` (one batch) to know each layer's input shape, got None."
            )
        device = torch.device(runtime_aware.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"`runtime_aware.device` is {runtime_aware.device!r} but CUDA is not available here.")


def _select_layers(model: nn.Module, layer_patterns: Sequence[str], include_linear: bool) -> dict[str, nn.Module]:
    """The decomposable layers the patterns select, in module order."""
    kinds = (nn.Conv2d, nn.Linear) if include_linear else (nn.Conv2d,)
    kind_names = "nn.Conv2d or nn.Linear" if include_linear else "nn.Conv2d (nn.Linear with include_linear=True)"
    modules = dict(model.named_modules())
    # Convs inside an existing factorization are its factors, not layers of the model: decomposing
    # them again would be a second, compounding approximation nobody asked for.
    inside = {
        f"{prefix}.{child}" if prefix else child
        for prefix, module in modules.items()
        if isinstance(module, (TuckerConv2d, SVDSplit))
        for child, _ in module.named_modules()
        if child
    }
    decomposable = {name: m for name, m in modules.items() if name and isinstance(m, kinds) and name not in inside}
    selected: set[str] = set()
    for pattern in layer_patterns:
        is_glob = any(c in pattern for c in "*?[")
        if not is_glob and pattern in decomposable and _overrides_forward(decomposable[pattern]):
            raise ValueError(
                f"`layer_patterns` names {pattern!r}: {_OVERRIDES_FORWARD.format(kind=type(modules[pattern]).__name__)}"
                "; leave it out of `layer_patterns` (or replace it with a plain nn.Conv2d with explicit padding)."
            )
        if not is_glob and pattern in modules and pattern not in decomposable:
            module = modules[pattern]
            why = "a factor of an already decomposed layer" if pattern in inside else f"a {type(module).__name__}"
            raise ValueError(
                f"`layer_patterns` names {pattern!r}, which is {why}; only {kind_names} layers can be decomposed."
            )
        matched = [name for name in decomposable if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(
                f"`layer_patterns` entry {pattern!r} matches no decomposable layer ({kind_names}); "
                f"the model's are: {list(decomposable)}."
            )
        selected.update(matched)
    return {name: m for name, m in decomposable.items() if name in selected}


def _explicit_layers(
    candidates: dict[str, nn.Module], ranks: Mapping[str, Any], first_conv: str | None, pointwise: str
) -> dict[str, nn.Module]:
    """The candidates a rank dict names; validates its names and ranks."""
    unknown = [name for name in ranks if name not in candidates]
    if unknown:
        raise ValueError(
            f"`rank_method` names layers {unknown} that are not selected decomposable layers; "
            f"selected: {list(candidates)}."
        )
    for name, rank in ranks.items():
        layer = candidates[name]
        if _overrides_forward(layer):
            raise ValueError(
                f"`rank_method` names {name!r}: {_OVERRIDES_FORWARD.format(kind=type(layer).__name__)}; leave it "
                "out of `rank_method` (or replace it with a plain nn.Conv2d with explicit padding)."
            )
        if name == first_conv:
            raise ValueError(
                f"`rank_method` names {name!r}, the first conv, which skip_first_conv=True keeps; "
                "pass skip_first_conv=False."
            )
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError(
                f"`rank_method` names {name!r}, a grouped conv (groups={layer.groups}), which cannot be "
                "Tucker-decomposed."
            )
        if _method_for(layer) == "tucker2":
            _check_tucker_ranks(rank, layer.out_channels, layer.in_channels, f"`rank_method[{name!r}]`")
        else:
            if isinstance(layer, nn.Conv2d) and pointwise == "skip":
                raise ValueError(
                    f"`rank_method` names {name!r}, a 1x1 conv, which pointwise='skip' keeps; pass pointwise='svd'."
                )
            full = _svd_full_rank(layer)
            if not _is_int(rank) or not 1 <= rank <= full:
                raise ValueError(
                    f"`rank_method[{name!r}]` must be an int in [1, {full}] (an SVD split of {_describe(layer)}), "
                    f"got {rank!r}."
                )
    return {name: layer for name, layer in candidates.items() if name in ranks}


def _svd_full_rank(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return min(layer.in_features, layer.out_features)
    return min(layer.in_channels, layer.out_channels)


def _describe(layer: nn.Module) -> str:
    return f"{type(layer).__name__} with weight shape {tuple(layer.weight.shape)}"


def _choose_ranks(
    name: str, layer: nn.Module, method: str, rank_method: Any, min_rank: int, zero_rank: str, spectra: dict[str, Any]
) -> tuple[list[int], str | None]:
    """(ranks, None), or (ranks found, reason to keep the layer); caches Tucker spectra in `spectra`."""
    if isinstance(rank_method, Mapping):
        rank = rank_method[name]
        return (list(rank) if method == "tucker2" else [rank]), None
    if method == "tucker2":
        sizes = [layer.out_channels, layer.in_channels]
    else:
        sizes = [_svd_full_rank(layer)]
    if rank_method == "vbmf":
        if method == "tucker2":
            spectra[name] = _mode_spectra(layer.weight)
            found = list(_vbmf_ranks(spectra[name]))
        else:
            matrix = layer.weight.detach().to("cpu", torch.float64).reshape(layer.weight.shape[0], -1)
            found = [estimate_rank(matrix.numpy())]
        if 0 in found and zero_rank == "skip":
            return found, "VBMF rank 0 (zero_rank='skip')"
    else:
        found = [round(rank_method * size) for size in sizes]
    return [min(max(rank, min_rank), size) for rank, size in zip(found, sizes)], None
