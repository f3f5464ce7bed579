"""The factorized layers of a Tucker-2 / SVD decomposition and how one layer is computed.

`TuckerConv2d` (in_proj, core, out_proj), `SVDSplit` (two convs or linears), the one-layer
functions (`tucker_decompose`, `svd_decompose_linear`, `vbmf_tucker_ranks`) and the mode spectra
that VBMF and the HOSVD initialization share. `compresslight.compression.tucker` explains the
decomposition and decides which layers to replace.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from compresslight.compression.lowrank import factorize_layer
from compresslight.compression.vbmf import evbmf_from_singular_values

__all__ = [
    "DEFAULT_HOOI_ITERS",
    "SVDSplit",
    "TuckerConv2d",
    "TuckerRanks",
    "svd_decompose_linear",
    "tucker_decompose",
    "vbmf_tucker_ranks",
]

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
