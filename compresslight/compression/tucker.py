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
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import fnmatch
import functools
import logging
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
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
from compresslight.compression.vbmf import estimate_rank, evbmf_from_singular_values
from compresslight.profiling.side_by_side import SLOWER, SideBySide
from compresslight.profiling.timing import LatencyStats, num_threads

log = logging.getLogger(__name__)

__all__ = [
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

RankMethod = Literal["vbmf"] | float | Mapping[str, "tuple[int, int] | int"]

# HOOI sweeps after the HOSVD initialization: none by default. Measured (CPU, 1 thread): with a
# decaying spectrum (what trained weights have), HOSVD's relative reconstruction error is within
# 0.2% of converged HOOI at ranks 1/16..1/4; even for random weights (a flat spectrum, the worst
# case) it is within 3% (0.920 vs 0.892 at quarter ranks on ResNet18). A sweep costs as much as
# the HOSVD again or more (two SVDs of the projected unfoldings: 0.5-0.6 s on a 512x512x3x3 conv at
# quarter ranks), and the fine-tuning that follows (paper 000: 100 epochs) moves the weights far more.
DEFAULT_HOOI_ITERS = 0


class TuckerRanks(NamedTuple):
    """Tucker-2 ranks of a conv weight, in its mode order (out x in x kh x kw)."""

    out_rank: int
    in_rank: int


class TuckerConv2d(nn.Sequential):
    """A Tucker-2 factorized `nn.Conv2d`: `in_proj` (1x1) -> `core` (kh x kw) -> `out_proj` (1x1).

    The constructor builds the structure with freshly initialized weights (what a record replays
    before weights load); `from_conv` fills it from a dense conv.

    Args:
        in_channels: input channels of the dense conv.
        out_channels: output channels of the dense conv.
        kernel_size: its kernel size.
        ranks: (out_rank, in_rank), each in [1, out_channels] / [1, in_channels].
        stride: its stride (applied by `core`).
        padding: its padding (applied by `core`).
        dilation: its dilation (applied by `core`).
        bias: whether `out_proj` has a bias (the dense conv's bias goes there).
        padding_mode: its padding mode (applied by `core`).
        device: where the parameters live.
        dtype: their dtype.

    Raises:
        ValueError: if a rank is out of range.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        ranks: tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        out_rank, in_rank = _check_tucker_ranks(ranks, out_channels, in_channels, "`ranks`")
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            collections.OrderedDict(
                [
                    ("in_proj", nn.Conv2d(in_channels, in_rank, 1, bias=False, **factory)),
                    (
                        "core",
                        nn.Conv2d(
                            in_rank,
                            out_rank,
                            kernel_size,
                            stride=stride,
                            padding=padding,
                            dilation=dilation,
                            bias=False,
                            padding_mode=padding_mode,
                            **factory,
                        ),  # fmt: skip
                    ),
                    ("out_proj", nn.Conv2d(out_rank, out_channels, 1, bias=bias, **factory)),
                ]
            )
        )
        self.ranks = TuckerRanks(out_rank, in_rank)

    # The dense conv's attributes, read by parents that used to hold it (Hugging Face's
    # MobileNetV2 pads its input from `conv.stride`, `kernel_size` and `dilation`).
    @property
    def in_channels(self) -> int:
        return self.in_proj.in_channels

    @property
    def out_channels(self) -> int:
        return self.out_proj.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.core.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.core.stride

    @property
    def padding(self) -> tuple[int, ...] | str:
        return self.core.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.core.dilation

    @property
    def groups(self) -> int:
        return 1

    @property
    def padding_mode(self) -> str:
        return self.core.padding_mode

    @classmethod
    def structure_of(cls, conv: nn.Conv2d, ranks: tuple[int, int]) -> TuckerConv2d:
        """The factorized structure of `conv` at `ranks`, freshly initialized, on its device/dtype.

        Raises:
            ValueError: if `conv` is not an ungrouped `nn.Conv2d` or a rank is out of range.
        """
        _check_tuckerable(conv)
        module = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, ranks, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        module.train(conv.training)
        return module

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: tuple[int, int], n_iter_max: int = DEFAULT_HOOI_ITERS) -> TuckerConv2d:
        """Tucker-2 decomposition of `conv` (tensorly `partial_tucker` on modes 0 and 1).

        Args:
            conv: the dense conv, `groups == 1`.
            ranks: (out_rank, in_rank).
            n_iter_max: HOOI sweeps after the HOSVD initialization (0: plain HOSVD).

        Raises:
            ValueError: if `conv` is not an ungrouped `nn.Conv2d`, a rank is out of range or
                `n_iter_max` < 0.
        """
        if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, int) or n_iter_max < 0:
            raise ValueError(f"`n_iter_max` must be an int >= 0, got {n_iter_max!r}.")
        module = cls.structure_of(conv, ranks)
        module._load_decomposition(conv, n_iter_max, _mode_spectra(conv.weight))
        return module

    def _load_decomposition(self, conv: nn.Conv2d, n_iter_max: int, spectra: tuple[_ModeSpectrum, ...]) -> None:
        core, out_factor, in_factor = _partial_tucker2(conv.weight, self.ranks, n_iter_max, spectra)
        dtype = conv.weight.dtype
        with torch.no_grad():
            self.in_proj.weight.copy_(in_factor.T[:, :, None, None].to(dtype))
            self.core.weight.copy_(core.to(dtype))
            self.out_proj.weight.copy_(out_factor[:, :, None, None].to(dtype))
            if conv.bias is not None:
                self.out_proj.bias.copy_(conv.bias)


class SVDSplit(nn.Sequential):
    """A layer split in two by truncated SVD: `lowrank.factorize_layer`'s `Sequential(v, u)`.

    The same modules and state_dict keys (`v.weight`, `u.weight`, `u.bias`); the class only marks
    them as the factors of one layer, so `decompose_model` never decomposes them again.
    """

    @classmethod
    def wrap(cls, split: nn.Sequential) -> SVDSplit:
        module = cls(collections.OrderedDict(split.named_children()))
        module.train(split.training)
        return module

    # The dense layer's attributes, for parents that read them (as `TuckerConv2d`'s). A conv's
    # split runs its width axis in `v` and its height axis in `u`.
    @property
    def in_features(self) -> int:
        return self.v.in_features

    @property
    def out_features(self) -> int:
        return self.u.out_features

    @property
    def in_channels(self) -> int:
        return self.v.in_channels

    @property
    def out_channels(self) -> int:
        return self.u.out_channels

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self._conv_pair("kernel_size")

    @property
    def stride(self) -> tuple[int, int]:
        return self._conv_pair("stride")

    @property
    def padding(self) -> tuple[int, int] | str:
        return self.v.padding if isinstance(self.v.padding, str) else self._conv_pair("padding")

    @property
    def dilation(self) -> tuple[int, int]:
        return self._conv_pair("dilation")

    def _conv_pair(self, attribute: str) -> tuple[int, int]:
        return (getattr(self.u, attribute)[0], getattr(self.v, attribute)[1])


def tucker_decompose(conv: nn.Conv2d, ranks: tuple[int, int], n_iter_max: int = DEFAULT_HOOI_ITERS) -> TuckerConv2d:
    """Tucker-2 decomposition of `conv` as `in_proj` (1x1) -> `core` (kh x kw) -> `out_proj` (1x1).

    Same as `TuckerConv2d.from_conv`; see the module docstring for the layout.

    Args:
        conv: the dense conv, `groups == 1`.
        ranks: (out_rank, in_rank): the core's output and input channels.
        n_iter_max: HOOI sweeps after the HOSVD initialization (0: plain HOSVD).

    Raises:
        ValueError: if `conv` is not an ungrouped `nn.Conv2d`, a rank is out of range or
            `n_iter_max` < 0.
    """
    return TuckerConv2d.from_conv(conv, ranks, n_iter_max=n_iter_max)


def svd_decompose_linear(linear: nn.Linear, rank: int) -> SVDSplit:
    """Truncated SVD split of `linear`: `Sequential(v=Linear(in, rank, bias=False), u=Linear(rank, out))`.

    The one SVD split of the library (`lowrank.factorize_layer`); the bias goes to `u`. Exact (up
    to float error) at full rank min(in, out).

    Raises:
        ValueError: if `linear` is not an `nn.Linear` or `rank` is not in [1, min(in, out)].
    """
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"`linear` must be nn.Linear, got {type(linear).__name__}.")
    return SVDSplit.wrap(factorize_layer(linear, rank))


def vbmf_tucker_ranks(conv: nn.Conv2d) -> TuckerRanks:
    """EVBMF ranks of `conv`'s mode-0 (out x in*kh*kw) and mode-1 (in x out*kh*kw) unfoldings.

    May be 0 (the unfolding looks like pure noise, e.g. a random initialization).

    Raises:
        ValueError: if `conv` is not an `nn.Conv2d`.
    """
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"`conv` must be nn.Conv2d, got {type(conv).__name__}.")
    return _vbmf_ranks(_mode_spectra(conv.weight))


class _ModeSpectrum(NamedTuple):
    """Left singular vectors and singular values of one unfolding of a conv weight."""

    singular_values: np.ndarray  # descending, min(shape) of them
    vectors: torch.Tensor  # rows x rows, column h is the h-th left singular vector (float64)
    shape: tuple[int, int]


def _mode_spectra(weight: torch.Tensor) -> tuple[_ModeSpectrum, _ModeSpectrum]:
    """Spectra of the mode-0 and mode-1 unfoldings of a conv weight.

    One decomposition per mode serves both VBMF (singular values) and the HOSVD initialization of
    `partial_tucker` (left singular vectors): the unfoldings are wide (e.g. 512 x 4608), and the
    eigendecomposition of their small Gram matrix `Y Y^T` is 5-10x faster on CPU than the SVD of
    `Y` that VBMF and tensorly's HOSVD would each compute (measured, 1 thread, on an unfolding of
    ResNet18's largest conv: 0.23 s vs 1.5 s for torch's SVD). Float64 keeps the Gram's squared
    spectrum accurate (to 1e-16 of the largest value, far below any noise level VBMF can see).
    """
    w = weight.detach().to(torch.float64)
    spectra = []
    for mode in (0, 1):
        unfolded = w.movedim(mode, 0).reshape(w.shape[mode], -1)  # tensorly's unfold(w, mode)
        eigenvalues, eigenvectors = torch.linalg.eigh(unfolded @ unfolded.T)
        # eigh sorts ascending; rounding can make zero eigenvalues slightly negative.
        singular_values = eigenvalues.flip(0)[: min(unfolded.shape)].clamp_min(0.0).sqrt()
        spectra.append(_ModeSpectrum(singular_values.cpu().numpy(), eigenvectors.flip(1), tuple(unfolded.shape)))
    return spectra[0], spectra[1]


def _vbmf_ranks(spectra: tuple[_ModeSpectrum, _ModeSpectrum]) -> TuckerRanks:
    return TuckerRanks(*(evbmf_from_singular_values(s.singular_values, s.shape).rank for s in spectra))


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
        example_inputs: one batch for the model's forward, used for the layers' input shapes (MACs
            in the report, runtime checks). The model runs once in eval mode, no grad.

    Returns:
        The record: the factorized layers, their ranks and original hyperparameters, and a report
        row per considered layer: `name`, `type`, `method`, `ranks`, `params_before`/`_after`,
        `macs_before`/`_after` (batch 1; None without `example_inputs`), `latency` (rows of
        `RuntimeCheck.measure`, [] when not runtime-aware), `decision` ("decomposed" / "kept") and
        `reason`. With a whole-model check, `record.whole_model` lists each check: `rows`
        (`RuntimeCheck.measure` of the original vs the decomposed model, in every setting or in
        those that were slower before) and `reverted` (the layer put back after it, or None).

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

    report: dict[str, dict[str, Any]] = {}
    plans: dict[str, tuple[str, list[int]]] = {}
    spectra: dict[str, tuple[_ModeSpectrum, _ModeSpectrum]] = {}  # computed once for VBMF and HOSVD
    for name, layer in candidates.items():
        row = _report_row(name, layer)
        report[name] = row
        method = _method_for(layer)
        row["method"] = method
        reason = None
        if _overrides_forward(layer):
            reason = _OVERRIDES_FORWARD.format(kind=type(layer).__name__)
            log.warning("Tucker: keeping %s: %s.", name, reason)
        elif isinstance(layer, nn.Conv2d) and layer.groups != 1:
            reason = f"grouped conv (groups={layer.groups})"
        elif skip_first_conv and name == first_conv:
            reason = "first conv (skip_first_conv=True)"
        elif method == "svd" and isinstance(layer, nn.Conv2d) and pointwise == "skip":
            reason = "1x1 conv (pointwise='skip')"
        if reason is None:
            ranks, reason = _choose_ranks(name, layer, method, rank_method, min_rank, zero_rank, spectra)
            row["ranks"] = ranks
            if reason is None:
                plans[name] = (method, ranks)
        if reason is not None:
            _keep(row, reason)

    shapes = layer_io_shapes(model, example_inputs, list(plans)) if example_inputs is not None and plans else {}
    replacements: dict[str, nn.Module] = {}
    for name, (method, ranks) in plans.items():
        layer, row = candidates[name], report[name]
        factorized = _factorize(layer, method, ranks, n_iter_max, spectra.pop(name, None))
        row["params_after"] = _num_params(factorized)
        if name in shapes:
            input_shape, output_shape = shapes[name]
            row["macs_before"] = _macs(layer, input_shape)
            row["macs_after"] = _macs(factorized, input_shape)
        if require_reduction:
            cost = "macs" if row["macs_after"] is not None else "params"
            if row[f"{cost}_after"] >= row[f"{cost}_before"]:
                _keep(row, f"no reduction: {row[f'{cost}_after']:,} {cost} factorized vs {row[f'{cost}_before']:,}")
                continue
        if runtime_aware is not None:
            row["latency"] = runtime_aware.measure(layer, factorized, shapes[name][0])
            if not runtime_aware.is_faster(row["latency"]):
                slowest = min(row["latency"], key=lambda r: r["speedup"])
                _keep(
                    row,
                    f"not faster by {runtime_aware.margin:.0%}: speedup {slowest['speedup']:.2f}x at batch "
                    f"{slowest['batch_size']}, {slowest['threads']} thread(s), {slowest['mode']}",
                )
                continue
        row["decision"], row["reason"] = "decomposed", ""
        replacements[name] = factorized
        log.info(
            "Tucker: %s %s ranks %s, params %d -> %d.", name, method, ranks, row["params_before"], row["params_after"]
        )

    whole_model_checks = []
    if runtime_aware is not None and runtime_aware.whole_model and replacements:
        whole_model_checks = _check_whole_model(model, replacements, report, runtime_aware, example_inputs)

    record = TuckerRecord(
        methods={name: plans[name][0] for name in replacements},
        ranks={name: plans[name][1] for name in replacements},
        layers={name: layer_config(candidates[name]) for name in replacements},
        report=list(report.values()),
        whole_model=whole_model_checks,
    )
    for name, module in replacements.items():
        set_submodule(model, name, module)
    return record


def _check_whole_model(
    model: nn.Module,
    replacements: dict[str, nn.Module],
    report: Mapping[str, dict[str, Any]],
    check: RuntimeCheck,
    example_inputs: torch.Tensor | tuple[Any, ...],
) -> list[dict[str, Any]]:
    """Times the decomposed model against `model`; reverts layers (in `replacements`, `report`)
    until it is not significantly slower in any setting. Returns the checks made (see `decompose_model`).

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
        _keep(
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_OVERRIDES_FORWARD = (
    "{kind} overrides forward (e.g. TF 'same' padding computed from the input, as timm's Conv2dSame), which the "
    "factorized layers would not reproduce"
)


def _overrides_forward(layer: nn.Module) -> bool:
    """A conv / linear subclass with its own `forward`: its output is not `F.conv2d` / `F.linear`
    of its attributes, so a factorization built from them would silently change the output."""
    base = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
    return isinstance(layer, base) and type(layer).forward is not base.forward


def _check_tuckerable(conv: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"`conv` must be nn.Conv2d, got {type(conv).__name__}.")
    if _overrides_forward(conv):
        raise ValueError(f"`conv` cannot be decomposed: {_OVERRIDES_FORWARD.format(kind=type(conv).__name__)}.")
    if conv.groups != 1:
        raise ValueError(f"`conv` must have groups=1 for a Tucker-2 decomposition, got groups={conv.groups}.")


def _check_tucker_ranks(ranks: Any, out_channels: int, in_channels: int, what: str) -> TuckerRanks:
    if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
        raise ValueError(f"{what} must be a pair (out_rank, in_rank), got {ranks!r}.")
    out_rank, in_rank = ranks
    if not (_is_int(out_rank) and 1 <= out_rank <= out_channels and _is_int(in_rank) and 1 <= in_rank <= in_channels):
        raise ValueError(
            f"{what} (out_rank, in_rank) must be ints in [1, {out_channels}] x [1, {in_channels}] "
            f"(the conv's out x in channels), got {tuple(ranks)!r}."
        )
    return TuckerRanks(out_rank, in_rank)


def _partial_tucker2(
    weight: torch.Tensor, ranks: TuckerRanks, n_iter_max: int, spectra: tuple[_ModeSpectrum, _ModeSpectrum]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(core, U_out, U_in) of `weight` by tensorly's partial_tucker on modes 0 and 1.

    The HOSVD initialization (the leading left singular vectors of each unfolding) comes from
    `spectra`, so tensorly does not recompute those SVDs; `n_iter_max` HOOI sweeps refine it.
    """
    # Imported here: tensorly.decomposition takes ~1 s to import, which every `import
    # compresslight.compression` (CLI start, checkpoint loading) would otherwise pay.
    import tensorly.backend
    from tensorly.decomposition import partial_tucker

    # SVDs need float32 at least; half-precision weights are decomposed in float32.
    dtype = torch.promote_types(weight.dtype, torch.float32)
    tensor = weight.detach().to(dtype)
    factors = [spectrum.vectors[:, :rank].to(dtype) for spectrum, rank in zip(spectra, ranks)]
    # Thread-local backend switch: the caller's tensorly backend (global or per-thread) is restored
    # and no other thread sees pytorch meanwhile.
    with tensorly.backend.backend_context("pytorch", local_threadsafe=True):
        (core, (out_factor, in_factor)), _ = partial_tucker(
            tensor, rank=list(ranks), modes=[0, 1], n_iter_max=n_iter_max, init=factors
        )
    return core, out_factor, in_factor


def _method_for(layer: nn.Module) -> str:
    if isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1):
        return "tucker2"
    return "svd"


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


def _report_row(name: str, layer: nn.Module) -> dict[str, Any]:
    return {
        "name": name,
        "type": "linear" if isinstance(layer, nn.Linear) else "conv2d",
        "method": None,
        "ranks": None,
        "params_before": _num_params(layer),
        "params_after": None,
        "macs_before": None,
        "macs_after": None,
        "latency": [],
        "decision": None,
        "reason": None,
    }


def _keep(row: dict[str, Any], reason: str) -> None:
    row["decision"], row["reason"] = "kept", reason
    log.info("Tucker: keeping %s: %s.", row["name"], reason)


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of `module` (a Conv2d, Linear or a Sequential of them) at batch 1."""
    macs, _ = _macs_and_shape(module, tuple(input_shape[1:]))
    return macs


def _macs_and_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    # Analytic (shape arithmetic, no forward pass): the factorized layers are chains of plain convs
    # and linears, so propagating the shape through them is exact and free.
    if isinstance(module, nn.Sequential):
        total = 0
        for child in module:
            macs, shape = _macs_and_shape(child, shape)
            total += macs
        return total, shape
    if isinstance(module, nn.Linear):
        positions = math.prod(shape[:-1])
        return positions * module.in_features * module.out_features, (*shape[:-1], module.out_features)
    if isinstance(module, nn.Conv2d):
        out_hw = tuple(_conv_out_size(module, axis, size) for axis, size in enumerate(shape[-2:]))
        kh, kw = module.kernel_size
        macs = math.prod(out_hw) * module.out_channels * (module.in_channels // module.groups) * kh * kw
        return macs, (module.out_channels, *out_hw)
    raise ValueError(f"Cannot count MACs of {type(module).__name__}.")


def _conv_out_size(conv: nn.Conv2d, axis: int, size: int) -> int:
    if conv.padding == "same":
        return size
    padding = 0 if conv.padding == "valid" else conv.padding[axis]
    extent = conv.dilation[axis] * (conv.kernel_size[axis] - 1) + 1
    return (size + 2 * padding - extent) // conv.stride[axis] + 1


def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
    parameter = next(module.parameters())
    if parameter.device == device or (device.type == parameter.device.type and device.index is None):
        return module
    # A copy: moving the model's own layer would move part of the model.
    return copy.deepcopy(module).to(device)
