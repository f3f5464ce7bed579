"""Low-rank factorization of linear and convolutional layers (paper 003, section 1.2).

A linear layer's `out x in` weight `W = U V^T` (rank `r`) runs as two linears: `in -> r` with
`V^T` and no bias, then `r -> out` with `U` and the original bias.

A convolution's `n x c x kh x kw` weight is reshaped with paper 003's **scheme 2** into an
`(n kh) x (c kw)` matrix `M[(o, i), (ch, j)] = W[o, ch, i, j]` (rows: output channel and kernel
row; columns: input channel and kernel column). A rank-`r` factorization `M = U V^T` runs as two
convolutions, exactly equal to the dense one at full rank:

| module | kernel | channels | stride / padding / dilation | weight |
|---|---|---|---|---|
| `v` | `1 x kw` | `c -> r` | width part only (height: 1 / 0 / 1) | `V^T` reshaped `r x c x 1 x kw`, no bias |
| `u` | `kh x 1` | `r -> n` | height part only (width: 1 / 0 / 1) | `U` reshaped `n x r x kh x 1`, original bias |

Why this pairing: `v` mixes input channels along kernel columns (the matrix's column index
`(ch, j)`), `u` mixes its `r` channels along kernel rows (the row index `(o, i)`), so
`y[o] = sum_{i, j, ch} (sum_k U[(o, i), k] V[(ch, j), k]) x[ch, row + i, col + j]`, the dense conv.
Padding the height only in `u` is exact because `v` has no bias and works row by row, so a padded
row of `x` gives a padded row of `v`'s output (zeros, or the same reflection / replication).

The factorized layer is an `nn.Sequential` with children named `v` (first) and `u` (second);
state_dict keys are `<layer>.v.weight`, `<layer>.u.weight` and `<layer>.u.bias` (if biased).

Compressible layers: `nn.Linear` and `nn.Conv2d` with `groups == 1` (any kernel size; a `1 x 1`
conv is a per-pixel linear layer and factorizes into two `1 x 1` convs). Grouped / depthwise
convolutions are not compressible by this scheme and are skipped.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from compresslight.compression.record import CompressionRecord, register_record

LowRankLayer = nn.Linear | nn.Conv2d

__all__ = [
    "LowRankRecord",
    "compressible_layers",
    "config_differences",
    "factorize_conv",
    "factorize_layer",
    "factorize_linear",
    "factorize_model",
    "factorized_structure",
    "from_matrix",
    "is_compressible",
    "layer_config",
    "layer_io_shapes",
    "low_rank_weights",
    "max_rank",
    "set_submodule",
    "to_matrix",
]


def is_compressible(module: nn.Module) -> bool:
    """Whether `module` has a low-rank form here: `nn.Linear`, or `nn.Conv2d` with `groups == 1`."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def compressible_layers(model: nn.Module) -> dict[str, LowRankLayer]:
    """Every compressible layer of `model` by qualified name, in module order."""
    return {name: module for name, module in model.named_modules() if name and is_compressible(module)}


def layer_io_shapes(
    model: nn.Module, example_inputs: torch.Tensor | tuple[Any, ...], names: list[str] | None = None
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shapes of the named layers (default: all compressible) on `example_inputs`.

    Runs one forward pass under `torch.no_grad()` with forward hooks; the model is not changed.

    Raises:
        ValueError: if a named layer did not run in that forward pass.
    """
    names = list(compressible_layers(model)) if names is None else list(names)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            shapes.setdefault(name, (tuple(inputs[0].shape), tuple(output.shape)))

        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name)) for name in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs) if isinstance(example_inputs, tuple) else model(example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in shapes]
    if missing:
        raise ValueError(
            f"Layers {missing} did not run in the forward pass of `example_inputs`; cannot know their input shapes."
        )
    return shapes


def to_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The matrix that low-rank compression approximates: a linear weight as is (`out x in`),
    a conv weight `n x c x kh x kw` reshaped by scheme 2 to `(n kh) x (c kw)`.

    Raises:
        ValueError: if `weight` is neither 2-D nor 4-D.
    """
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4:
        n, c, kh, kw = weight.shape
        return weight.permute(0, 2, 1, 3).reshape(n * kh, c * kw)
    raise ValueError(f"`weight` must be 2-D (linear) or 4-D (conv), got shape {tuple(weight.shape)}.")


def from_matrix(matrix: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_matrix`: the matrix back in the layer's weight `shape`.

    Raises:
        ValueError: if `shape` is neither 2-D nor 4-D or does not match the matrix.
    """
    shape = tuple(shape)
    if len(shape) == 2:
        if tuple(matrix.shape) != shape:
            raise ValueError(f"`matrix` must have shape {shape}, got {tuple(matrix.shape)}.")
        return matrix
    if len(shape) == 4:
        n, c, kh, kw = shape
        if tuple(matrix.shape) != (n * kh, c * kw):
            raise ValueError(
                f"`matrix` must have shape {(n * kh, c * kw)} for weight shape {shape}, got {tuple(matrix.shape)}."
            )
        return matrix.reshape(n, kh, c, kw).permute(0, 2, 1, 3).contiguous()
    raise ValueError(f"`shape` must be 2-D (linear) or 4-D (conv), got {shape}.")


def max_rank(layer: LowRankLayer) -> int:
    """Full rank of the layer's (scheme-2) matrix: `min(out, in)` or `min(n kh, c kw)`."""
    if isinstance(layer, nn.Linear):
        return min(layer.out_features, layer.in_features)
    kh, kw = layer.kernel_size
    return min(layer.out_channels * kh, layer.in_channels * kw)


def low_rank_weights(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-`rank` approximation (Frobenius norm) of `weight`, in the weight's own shape.

    Conv weights are truncated in their scheme-2 matrix form (`to_matrix`).

    Raises:
        ValueError: if `rank` is outside [0, full rank].
    """
    matrix = to_matrix(weight.detach())
    full = min(matrix.shape)
    if not 0 <= rank <= full:
        raise ValueError(f"`rank` must be in [0, {full}] for weight shape {tuple(weight.shape)}, got {rank!r}.")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return from_matrix(truncated, weight.shape)


def layer_config(layer: LowRankLayer) -> dict[str, Any]:
    """The layer's hyperparameters as JSON-able data (what a record stores and checks)."""
    if isinstance(layer, nn.Linear):
        return {
            "type": "linear",
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
        }
    if isinstance(layer, nn.Conv2d):
        return {
            "type": "conv2d",
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": list(layer.kernel_size),
            "stride": list(layer.stride),
            "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding),
            "dilation": list(layer.dilation),
            "groups": layer.groups,
            "bias": layer.bias is not None,
            "padding_mode": layer.padding_mode,
        }
    raise ValueError(f"`layer` must be nn.Linear or nn.Conv2d, got {type(layer).__name__}.")


def config_differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields of two `layer_config`s that differ: field -> (expected, found)."""
    keys = sorted(expected.keys() | found.keys())
    return {key: (expected.get(key), found.get(key)) for key in keys if expected.get(key) != found.get(key)}


def factorized_structure(layer: LowRankLayer, rank: int) -> nn.Sequential:
    """The rank-`rank` factorized form of `layer` with freshly initialized weights.

    Same device and dtype as `layer`. Used where only the structure matters (latency
    measurements, replaying a record before its weights load).

    Raises:
        ValueError: if `layer` is not compressible or `rank` is outside [1, full rank].
    """
    if not is_compressible(layer):
        raise ValueError(
            f"`layer` must be nn.Linear or nn.Conv2d with groups=1, got {type(layer).__name__}"
            + (f" with groups={layer.groups}" if isinstance(layer, nn.Conv2d) else "")
            + "."
        )
    full = max_rank(layer)
    # Rank 0 has no PyTorch conv (0 output channels is an error), so a factorized layer has r >= 1.
    if not 1 <= rank <= full:
        raise ValueError(f"`rank` must be in [1, {full}] for {_describe(layer)}, got {rank!r}.")
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        first: nn.Module = nn.Linear(layer.in_features, rank, bias=False, **factory)
        second: nn.Module = nn.Linear(rank, layer.out_features, bias=bias, **factory)
    else:
        kh, kw = layer.kernel_size
        sh, sw = layer.stride
        dh, dw = layer.dilation
        if isinstance(layer.padding, str):
            # "valid" / "same" resolve per axis, and each conv has extent 1 along the other axis.
            pad_first: str | tuple[int, int] = layer.padding
            pad_second: str | tuple[int, int] = layer.padding
        else:
            ph, pw = layer.padding
            pad_first, pad_second = (0, pw), (ph, 0)
        first = nn.Conv2d(
            layer.in_channels, rank, (1, kw), stride=(1, sw), padding=pad_first, dilation=(1, dw),
            bias=False, padding_mode=layer.padding_mode, **factory,
        )  # fmt: skip
        second = nn.Conv2d(
            rank, layer.out_channels, (kh, 1), stride=(sh, 1), padding=pad_second, dilation=(dh, 1),
            bias=bias, padding_mode=layer.padding_mode, **factory,
        )  # fmt: skip
    return nn.Sequential(collections.OrderedDict([("v", first), ("u", second)]))


def factorize_layer(layer: LowRankLayer, rank: int, weight: torch.Tensor | None = None) -> nn.Sequential:
    """`factorize_linear` or `factorize_conv`, whichever fits `layer`.

    Args:
        layer: the dense layer; its bias is copied to the second factor.
        rank: rank of the factorization, in [1, full rank].
        weight: the weight to factorize instead of `layer.weight` (same shape), e.g. the LC
            algorithm's low-rank Theta. Its truncated SVD gives the factors.

    Raises:
        ValueError: if `layer` is not compressible, `rank` is out of range or `weight` has
            another shape.
    """
    module = factorized_structure(layer, rank)
    source = layer.weight if weight is None else weight
    if tuple(source.shape) != tuple(layer.weight.shape):
        raise ValueError(f"`weight` must have shape {tuple(layer.weight.shape)}, got {tuple(source.shape)}.")
    matrix = to_matrix(source.detach().to(device=layer.weight.device, dtype=torch.float64))
    # SVD in float64: the factors of a near-degenerate spectrum are then stable to float32 precision.
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()  # split singular values evenly so both factors have similar scale
    left = u[:, :rank] * root  # (out [kh]) x r
    right = vh[:rank].T * root  # (in [kw]) x r
    dtype = layer.weight.dtype
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            module.v.weight.copy_(right.T.to(dtype))
            module.u.weight.copy_(left.to(dtype))
        else:
            n, c, kh, kw = layer.weight.shape
            # rows of `right` are (ch, j); v's weight is r x c x 1 x kw.
            module.v.weight.copy_(right.T.reshape(rank, c, 1, kw).to(dtype))
            # rows of `left` are (o, i); u's weight is n x r x kh x 1.
            module.u.weight.copy_(left.reshape(n, kh, rank).permute(0, 2, 1).unsqueeze(-1).to(dtype))
        if layer.bias is not None:
            module.u.bias.copy_(layer.bias)
    module.train(layer.training)
    return module


def factorize_linear(linear: nn.Linear, rank: int, weight: torch.Tensor | None = None) -> nn.Sequential:
    """`W = U V^T` as `Sequential(v=Linear(in, r, bias=False), u=Linear(r, out))` (truncated SVD).

    Exact (up to float error) at full rank `min(in, out)`.

    Args:
        linear: the dense layer.
        rank: in [1, min(in, out)].
        weight: factorize this `out x in` weight instead of `linear.weight`.

    Raises:
        ValueError: if `rank` is out of range or `weight` has another shape.
    """
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"`linear` must be nn.Linear, got {type(linear).__name__}.")
    return factorize_layer(linear, rank, weight)


def factorize_conv(conv: nn.Conv2d, rank: int, weight: torch.Tensor | None = None) -> nn.Sequential:
    """Scheme-2 factorization: `Sequential(v=Conv2d(c, r, 1 x kw), u=Conv2d(r, n, kh x 1))`.

    See the module docstring for the reshape and why it pairs with this conv order. Exact (up
    to float error) at full rank `min(n kh, c kw)`.

    Args:
        conv: the dense conv, `groups == 1`.
        rank: in [1, min(n kh, c kw)].
        weight: factorize this weight instead of `conv.weight`.

    Raises:
        ValueError: if `conv` is grouped, `rank` is out of range or `weight` has another shape.
    """
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"`conv` must be nn.Conv2d, got {type(conv).__name__}.")
    return factorize_layer(conv, rank, weight)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replaces the submodule at dotted `name` by `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        return f"{type(layer).__name__} with weight shape {tuple(layer.weight.shape)}"
    return type(layer).__name__


@register_record
@dataclasses.dataclass
class LowRankRecord(CompressionRecord):
    """Layers replaced by their rank-r factorized form (`factorize_layer`).

    Attributes:
        ranks: layer name -> rank of its factorization.
        layers: layer name -> the original layer's hyperparameters (`layer_config`), checked on
            replay so a record never edits a different architecture.
    """

    kind = "lowrank"
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_layers(cls, model: nn.Module, ranks: Mapping[str, int]) -> LowRankRecord:
        """The record that factorizes `model`'s layers `ranks` (name -> rank).

        Raises:
            ValueError: if a name is not a compressible layer of `model` or a rank is out of range.
        """
        layers = {}
        for name, rank in ranks.items():
            layer = _find_layer(model, name)
            _check_rank(name, layer, rank)
            layers[name] = layer_config(layer)
        return cls(ranks=dict(ranks), layers=layers)

    def validate(self, model: nn.Module) -> None:
        """Checks that every named layer exists with the recorded hyperparameters and rank range.

        Raises:
            ValueError: naming the first layer that is missing, of another type or shape, or
                whose rank is out of range.
        """
        if set(self.ranks) != set(self.layers):
            raise ValueError(
                f"LowRankRecord `ranks` and `layers` must name the same layers, got {sorted(self.ranks)} "
                f"and {sorted(self.layers)}."
            )
        for name, rank in self.ranks.items():
            layer = _find_layer(model, name)
            found = layer_config(layer)
            expected = self.layers[name]
            if found != expected:
                raise ValueError(
                    f"LowRankRecord: layer {name!r} does not match the recorded one "
                    f"(field: (recorded, found)): {config_differences(expected, found)}."
                )
            _check_rank(name, layer, rank)

    def apply(self, model: nn.Module) -> None:
        """Replaces each named layer by its factorized structure (fresh weights; load them after).

        Validates every layer first, so a bad record leaves `model` untouched.

        Raises:
            ValueError: see `validate`.
        """
        self.validate(model)
        for name, rank in self.ranks.items():
            set_submodule(model, name, factorized_structure(model.get_submodule(name), rank))


def _find_layer(model: nn.Module, name: str) -> LowRankLayer:
    try:
        layer = model.get_submodule(name) if name else None
    except AttributeError:
        layer = None
    if layer is None:
        raise ValueError(
            f"Layer {name!r} not found in the model; compressible layers: {list(compressible_layers(model))}."
        )
    if not is_compressible(layer):
        raise ValueError(
            f"Layer {name!r} must be nn.Linear or nn.Conv2d with groups=1 to factorize, got {_describe(layer)}."
        )
    return layer


def _check_rank(name: str, layer: LowRankLayer, rank: int) -> None:
    full = max_rank(layer)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(f"Rank of layer {name!r} must be an int in [1, {full}] for {_describe(layer)}, got {rank!r}.")


def factorize_model(
    model: nn.Module, ranks: Mapping[str, int], weights: Mapping[str, torch.Tensor] | None = None
) -> LowRankRecord:
    """Replaces `model`'s named layers by their factorized forms (SVD factors) and returns the record.

    Args:
        model: edited in place.
        ranks: layer name -> rank.
        weights: optional layer name -> weight to factorize instead of the layer's own.

    Raises:
        ValueError: for an unknown layer, a rank out of range, or a weight of another shape;
            raised before any edit.
    """
    weights = dict(weights or {})
    record = LowRankRecord.from_layers(model, ranks)
    unknown = set(weights) - set(ranks)
    if unknown:
        raise ValueError(f"`weights` names layers without a rank: {sorted(unknown)}.")
    for name, weight in weights.items():
        expected = tuple(model.get_submodule(name).weight.shape)
        if tuple(weight.shape) != expected:
            raise ValueError(f"`weights[{name!r}]` must have shape {expected}, got {tuple(weight.shape)}.")
    replacements = {
        name: factorize_layer(model.get_submodule(name), rank, weights.get(name)) for name, rank in ranks.items()
    }
    for name, module in replacements.items():
        set_submodule(model, name, module)
    return record
