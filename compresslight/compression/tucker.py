"""Tucker-2 decomposition of convolutions with EVBMF ranks (paper 000, after Kim et al. 2016).

A convolution weight `W` (out x in x kh x kw) is approximated on its two channel modes,

    W ~= core x_0 U_out x_1 U_in,   core: r_out x r_in x kh x kw,  U_out: out x r_out,  U_in: in x r_in,

by tensorly's `partial_tucker` (modes 0 and 1), and runs as three convolutions (`TuckerConv2d`):

| child      | kernel    | channels         | stride / padding / dilation | weight                   |
|------------|-----------|------------------|-----------------------------|--------------------------|
| `in_proj`  | 1 x 1     | in -> r_in       | 1 / 0 / 1, no bias          | `U_in^T`                 |
| `core`     | kh x kw   | r_in -> r_out    | the original ones, no bias  | `core`                   |
| `out_proj` | 1 x 1     | r_out -> out     | 1 / 0 / 1, original bias    | `U_out`                  |

Exact (up to float error) at full rank `(out, in)`. Moving the padding into `core` is exact for
every padding mode: `in_proj` is a per-pixel linear map without bias, so it commutes with zero,
reflect, replicate and circular padding.

Ranks (`decompose_model(rank_method=...)`):
- `"vbmf"` (paper 000): `r_out` is the EVBMF rank (`compresslight.compression.vbmf`) of the mode-0
  unfolding (out x in*kh*kw), `r_in` that of the mode-1 unfolding (in x out*kh*kw);
- a float fraction f in (0, 1]: `round(f * out)`, `round(f * in)`;
- explicit per layer: `{name: (out_rank, in_rank)}` (an int for an SVD-split layer).

Which layers (decided here, see `decompose_model`):
- `nn.Conv2d` with a kernel larger than 1 x 1: Tucker-2.
- 1 x 1 convolutions (the ResNets' projection shortcuts): a Tucker-2 of a 1 x 1 kernel is three
  chained matrix products whose middle one is redundant (its rank is at most min(r_in, r_out)), so
  they are split by truncated SVD into two 1 x 1 convs instead (`pointwise="svd"`, VBMF rank of the
  out x in matrix), or left alone (`pointwise="skip"`).
- `nn.Linear`: SVD split into two linears, only with `include_linear=True` (paper 000 decomposes
  convolutions only).
- Grouped / depthwise convolutions are skipped (logged, and listed in the report): Tucker-2 on
  the channel modes would mix the groups.
- The model's first convolution is skipped by default (`skip_first_conv`): it has 1-3 input
  channels, so the input mode has nothing to compress, and it runs at the full input resolution,
  where the extra layers' activations cost the most.

The SVD splits reuse `compresslight.compression.lowrank.factorize_layer` (one SVD split in the
library): `Sequential(v, u)`.

Runtime-aware mode (beyond paper 000, which found Tucker-VBMF ResNet20 0.51x *slower* on a GPU at
batch 1): with `runtime_aware=RuntimeCheck(...)`, each factorized layer is timed against the
original on its real input shape at every batch size / thread count / (inference, train) setting
asked for, and replaces it only if it is faster by `margin` in every one. Layer-alone timings do
not add up to the network's (measured on ResNet20 at batch 1, 2 threads: every replaced layer 5%
faster alone, the network 0.87x), so then the whole decomposed model is timed against the original
in the same settings and, while it is slower in any, the replaced layer that gained least alone in
that setting is put back (`RuntimeCheck.whole_model`).

Modules: `tucker_layers` (the factorized layers, one-layer decompositions), `tucker_selection`
(patterns, rank dicts, rank choice), `tucker_runtime` (`RuntimeCheck`, the whole-model check),
`tucker_report` (report rows, `TuckerReport`); this one holds `decompose_model` and its record.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from compresslight.compression.lowrank import (
    factorize_layer,
    factorized_structure,
    layer_config,
    layer_io_shapes,
    set_submodule,
)
from compresslight.compression.record import CompressionRecord, register_record
from compresslight.compression.tucker_layers import (
    _OVERRIDES_FORWARD,
    DEFAULT_HOOI_ITERS,
    SVDSplit,
    TuckerConv2d,
    TuckerRanks,
    _check_tucker_ranks,
    _mode_spectra,
    _ModeSpectrum,
    _overrides_forward,
    svd_decompose_linear,
    tucker_decompose,
    vbmf_tucker_ranks,
)
from compresslight.compression.tucker_report import keep_layer, layer_macs, layer_row, num_params
from compresslight.compression.tucker_runtime import RuntimeCheck, check_whole_model, layer_to_revert
from compresslight.compression.tucker_selection import (
    RankMethod,
    _candidate_layers,
    _choose_ranks,
    _method_for,
    _validate_options,
    selected_layers,
)

log = logging.getLogger(__name__)

# The layers, the runtime check and the layer selection live beside this module; their public
# names are importable from here too, where users have always found them.
__all__ = [
    "DEFAULT_HOOI_ITERS",
    "RuntimeCheck",
    "SVDSplit",
    "TuckerConv2d",
    "TuckerRanks",
    "TuckerRecord",
    "decompose_model",
    "layer_to_revert",
    "selected_layers",
    "svd_decompose_linear",
    "tucker_decompose",
    "vbmf_tucker_ranks",
]


@register_record
@dataclasses.dataclass
class TuckerRecord(CompressionRecord):
    """Layers replaced by their Tucker-2 (`TuckerConv2d`) or SVD-split (`SVDSplit`) form.

    Attributes:
        methods: layer name -> "tucker2" or "svd".
        ranks: layer name -> [out_rank, in_rank] ("tucker2") or [rank] ("svd").
        layers: layer name -> the original layer's hyperparameters (`lowrank.layer_config`:
            type, in/out channels, kernel, stride, padding, dilation, groups, bias, padding mode),
            checked on replay so a record never edits another architecture.
        report: one plain-data row per considered layer (decomposed or kept), see
            `decompose_model`; not used by `apply`.
        whole_model: the whole-model checks of a runtime-aware decomposition, in order (see
            `decompose_model`); not used by `apply`.
    """

    kind = "tucker2"
    methods: dict[str, str] = dataclasses.field(default_factory=dict)
    ranks: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    report: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    whole_model: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def validate(self, model: nn.Module) -> None:
        """Checks every named layer exists with the recorded type, hyperparameters and rank range.

        Raises:
            ValueError: naming the first layer that is missing, of another type or configuration,
                or whose method or ranks are invalid.
        """
        self._structures(model)

    def apply(self, model: nn.Module) -> None:
        """Replaces each named layer by its factorized structure (fresh weights; load them after).

        Validates every layer first, so a bad record leaves `model` untouched.

        Raises:
            ValueError: see `validate`.
        """
        for name, module in self._structures(model).items():
            set_submodule(model, name, module)

    def _structures(self, model: nn.Module) -> dict[str, nn.Module]:
        """The factorized structure of every recorded layer, after checking each against `model`."""
        if not set(self.methods) == set(self.ranks) == set(self.layers):
            raise ValueError(
                "TuckerRecord `methods`, `ranks` and `layers` must name the same layers, got "
                f"{sorted(self.methods)}, {sorted(self.ranks)} and {sorted(self.layers)}."
            )
        structures = {}
        for name, method in self.methods.items():
            layer = _get_layer(model, name)
            found = layer_config(layer) if isinstance(layer, (nn.Conv2d, nn.Linear)) else {"type": type(layer).__name__}
            expected = self.layers[name]
            if found != expected:
                differences = {
                    key: (expected.get(key), found.get(key))
                    for key in expected.keys() | found.keys()
                    if expected.get(key) != found.get(key)
                }
                raise ValueError(
                    f"TuckerRecord: layer {name!r} does not match the recorded one "
                    f"(field: (recorded, found)): {differences}."
                )
            structures[name] = _build_structure(name, layer, method, self.ranks[name])
        return structures


def decompose_model(
    model: nn.Module,
    layer_patterns: Sequence[str] = ("*",),
    rank_method: RankMethod = "vbmf",
    *,
    skip_first_conv: bool = True,
    min_rank: int = 1,
    zero_rank: Literal["min_rank", "skip"] = "min_rank",
    pointwise: Literal["svd", "skip"] = "svd",
    include_linear: bool = False,
    require_reduction: bool = True,
    n_iter_max: int = DEFAULT_HOOI_ITERS,
    runtime_aware: RuntimeCheck | None = None,
    example_inputs: torch.Tensor | tuple[Any, ...] | None = None,
) -> TuckerRecord:
    """Tucker-2 decomposes the selected convolutions of `model` in place; returns the record.

    Validates everything first, computes every factorization, then swaps the layers in: an error
    leaves `model` untouched.

    Args:
        model: edited in place.
        layer_patterns: `fnmatch` patterns over qualified module names (`"layer1.*.conv1"`). Glob
            patterns select the decomposable layers they match; a plain name must name one.
        rank_method: `"vbmf"` (paper 000), a fraction in (0, 1] of each mode's size, or a dict
            layer name -> (out_rank, in_rank) (an int for a 1x1 conv or a linear). With a dict,
            exactly its layers (among those the patterns select) are decomposed.
        skip_first_conv: keep the model's first `nn.Conv2d` (in module order).
        min_rank: computed ranks (vbmf, fraction) below it are raised to it (capped at the mode
            size); explicit ranks are used as given.
        zero_rank: when VBMF finds rank 0 on a mode (pure noise): `"min_rank"` uses `min_rank`,
            `"skip"` keeps the layer.
        pointwise: 1x1 convs: `"svd"` splits them into two 1x1 convs, `"skip"` keeps them.
        include_linear: also SVD-split the `nn.Linear` layers the patterns select.
        require_reduction: keep a layer whose factorization has no fewer MACs (parameters without
            `example_inputs`) than the original, e.g. a VBMF rank close to full.
        n_iter_max: HOOI sweeps after the HOSVD initialization (`tucker_decompose`).
        runtime_aware: time each factorization against the original (`RuntimeCheck`) and keep the
            original unless the factorization is faster in every setting; then (its `whole_model`)
            time the whole model and revert layers while it is significantly slower anywhere. Needs
            `example_inputs`.
        example_inputs: one batch for the layers' input shapes (MACs in the report, runtime
            checks); the model runs once on it in eval mode, no grad.

    Returns:
        The record: the factorized layers, their ranks and original hyperparameters, a report row
        per considered layer (`tucker_report.layer_row`) and the whole-model checks (`check_whole_model`).

    Raises:
        ValueError: for an empty or bad pattern, a pattern matching no decomposable layer (the
            message lists them), a plain name of a layer that cannot be decomposed, a bad
            `rank_method` / rank (e.g. larger than the layer's dimension), `min_rank` < 1, an
            unknown `zero_rank` / `pointwise`, or `runtime_aware` without `example_inputs`.
    """
    _validate_options(
        layer_patterns, rank_method, min_rank, zero_rank, pointwise, n_iter_max, runtime_aware, example_inputs
    )
    candidates, first_conv = _candidate_layers(
        model, layer_patterns, rank_method, skip_first_conv, pointwise, include_linear
    )
    options = _PlanOptions(skip_first_conv=skip_first_conv, pointwise=pointwise, min_rank=min_rank, zero_rank=zero_rank)
    report = {name: layer_row(name, layer) for name, layer in candidates.items()}
    spectra: dict[str, tuple[_ModeSpectrum, _ModeSpectrum]] = {}  # computed once for VBMF and HOSVD
    plans = _plan_layers(candidates, report, spectra, first_conv, rank_method, options)
    shapes = layer_io_shapes(model, example_inputs, list(plans)) if example_inputs is not None and plans else {}
    replacements: dict[str, nn.Module] = {}
    for name, (method, ranks) in plans.items():
        factorized = _factorize(candidates[name], method, ranks, n_iter_max, spectra.pop(name, None))
        input_shape = shapes[name][0] if name in shapes else None
        if _replaces(report[name], candidates[name], factorized, input_shape, require_reduction, runtime_aware):
            replacements[name] = factorized
    whole_model_checks = []
    if runtime_aware is not None and runtime_aware.whole_model and replacements:
        whole_model_checks = check_whole_model(model, replacements, report, runtime_aware, example_inputs)

    return _swap_in(model, candidates, plans, replacements, list(report.values()), whole_model_checks)


def _swap_in(
    model: nn.Module,
    candidates: Mapping[str, nn.Module],
    plans: Mapping[str, tuple[str, list[int]]],
    replacements: Mapping[str, nn.Module],
    report: list[dict[str, Any]],
    whole_model_checks: list[dict[str, Any]],
) -> TuckerRecord:
    """The record of the replacements, then the replacements put into `model` (the only edit)."""
    record = TuckerRecord(
        methods={name: plans[name][0] for name in replacements},
        ranks={name: plans[name][1] for name in replacements},
        layers={name: layer_config(candidates[name]) for name in replacements},
        report=report,
        whole_model=whole_model_checks,
    )
    for name, module in replacements.items():
        set_submodule(model, name, module)
    return record


@dataclasses.dataclass(frozen=True)
class _PlanOptions:
    skip_first_conv: bool
    pointwise: str
    min_rank: int
    zero_rank: str


def _plan_layers(
    candidates: Mapping[str, nn.Module],
    report: Mapping[str, dict[str, Any]],
    spectra: dict[str, Any],
    first_conv: str | None,
    rank_method: Any,
    options: _PlanOptions,
) -> dict[str, tuple[str, list[int]]]:
    """Layer name -> (method, ranks) of the layers to factorize; the others' rows say why not."""
    plans: dict[str, tuple[str, list[int]]] = {}
    for name, layer in candidates.items():
        row = report[name]
        method = row["method"] = _method_for(layer)
        reason = _reason_to_keep(name, layer, method, first_conv, options)
        if reason is None:
            ranks, reason = _choose_ranks(
                name, layer, method, rank_method, options.min_rank, options.zero_rank, spectra
            )
            row["ranks"] = ranks
            if reason is None:
                plans[name] = (method, ranks)
        if reason is not None:
            keep_layer(row, reason)
    return plans


def _reason_to_keep(
    name: str, layer: nn.Module, method: str, first_conv: str | None, options: _PlanOptions
) -> str | None:
    """Why `layer` is kept whatever its ranks, or None."""
    if _overrides_forward(layer):
        reason = _OVERRIDES_FORWARD.format(kind=type(layer).__name__)
        log.warning("Tucker: keeping %s: %s.", name, reason)
        return reason
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return f"grouped conv (groups={layer.groups})"
    if options.skip_first_conv and name == first_conv:
        return "first conv (skip_first_conv=True)"
    if method == "svd" and isinstance(layer, nn.Conv2d) and options.pointwise == "skip":
        return "1x1 conv (pointwise='skip')"
    return None


def _replaces(
    row: dict[str, Any],
    layer: nn.Module,
    factorized: nn.Module,
    input_shape: tuple[int, ...] | None,
    require_reduction: bool,
    runtime_aware: RuntimeCheck | None,
) -> bool:
    """Whether `factorized` replaces `layer`: fills the row's costs, latency and decision."""
    row["params_after"] = num_params(factorized)
    if input_shape is not None:
        row["macs_before"] = layer_macs(layer, input_shape)
        row["macs_after"] = layer_macs(factorized, input_shape)
    if require_reduction:
        cost = "macs" if row["macs_after"] is not None else "params"
        if row[f"{cost}_after"] >= row[f"{cost}_before"]:
            keep_layer(row, f"no reduction: {row[f'{cost}_after']:,} {cost} factorized vs {row[f'{cost}_before']:,}")
            return False
    if runtime_aware is not None:
        assert input_shape is not None  # `_validate_options`: runtime_aware needs example inputs
        row["latency"] = runtime_aware.measure(layer, factorized, input_shape)
        if not runtime_aware.is_faster(row["latency"]):
            slowest = min(row["latency"], key=lambda r: r["speedup"])
            keep_layer(
                row,
                f"not faster by {runtime_aware.margin:.0%}: speedup {slowest['speedup']:.2f}x at batch "
                f"{slowest['batch_size']}, {slowest['threads']} thread(s), {slowest['mode']}",
            )
            return False
    row["decision"], row["reason"] = "decomposed", ""
    log.info(
        "Tucker: %s %s ranks %s, params %d -> %d.",
        row["name"], row["method"], row["ranks"], row["params_before"], row["params_after"],
    )  # fmt: skip
    return True


def _build_structure(name: str, layer: nn.Module, method: str, ranks: Sequence[int]) -> nn.Module:
    """The freshly initialized factorized structure of `layer` (record replay)."""
    if method == "tucker2":
        if not isinstance(layer, nn.Conv2d):
            raise ValueError(
                f"TuckerRecord: layer {name!r} must be nn.Conv2d for method 'tucker2', got {type(layer).__name__}."
            )
        checked = _check_tucker_ranks(ranks, layer.out_channels, layer.in_channels, f"Ranks of layer {name!r}")
        return TuckerConv2d.structure_of(layer, checked)
    if method == "svd":
        if not isinstance(ranks, (list, tuple)) or len(ranks) != 1:
            raise ValueError(f"TuckerRecord: ranks of layer {name!r} must be [rank] for method 'svd', got {ranks!r}.")
        return SVDSplit.wrap(factorized_structure(layer, ranks[0]))
    raise ValueError(f"TuckerRecord: method of layer {name!r} must be 'tucker2' or 'svd', got {method!r}.")


def _factorize(
    layer: nn.Module, method: str, ranks: list[int], n_iter_max: int, spectra: tuple[_ModeSpectrum, ...] | None
) -> nn.Module:
    if method == "tucker2":
        module = TuckerConv2d.structure_of(layer, TuckerRanks(*ranks))
        module._load_decomposition(layer, n_iter_max, spectra if spectra is not None else _mode_spectra(layer.weight))
        return module
    return SVDSplit.wrap(factorize_layer(layer, ranks[0]))


def _get_layer(model: nn.Module, name: str) -> nn.Module:
    if name:
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    raise ValueError(f"TuckerRecord: layer {name!r} not found in the model.")
