"""The original CIFAR ResNets of He et al. (2016) with option-A shortcuts, as published weights need them.

Option A: where a block changes shape, the shortcut takes every second pixel and zero-pads the
channels (16 -> 32 puts the input in channels 8..23); it has no parameters. This is the
architecture of the weights published with `akamaster/pytorch_resnet_cifar10` (in
`../shared/pretrained/`); names and shapes match their state dicts exactly (after the
`module.` prefix is stripped), so `ImageClassifier(init_from=..., init_from_prefix="module.")`
loads every key. `compresslight.models.resnet` has the option-B variant (a 1x1 projection).

Counts at 10 classes, 3 input channels, 32x32; MACs of the forward pass at batch 1:

| name        | layers | params  | MACs    | published top-1 (official CIFAR-10 test set) |
|-------------|--------|---------|---------|----------------------------------------------|
| resnet20_a  | 20     | 269,722 | 40.55M  | 91.73%                                       |
| resnet56_a  | 56     | 853,018 | 125.49M | 93.39%                                       |

Structured pruning: `ZeroPadShortcut` places its input channels at fixed output positions and
fills the others with zeros, like a parameter-free 1x1 projection whose weight is a 0/1 placement
matrix. Pruning edits that placement (`compresslight.compression.pruning` registers its
torch-pruning handler): removing an output channel of a stage drops the input channel placed
there (if any), removing an input channel leaves a zero where it was placed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from compresslight.registry import register_model

__all__ = ["CifarBasicBlockA", "CifarResNetA", "ZeroPadShortcut", "resnet20_a", "resnet56_a"]


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut: subsample by `stride`, place input channels among zero channels.

    Built with `in_channels` input and `out_channels` output channels, it puts the input in the
    middle (`(out_channels - in_channels) // 2` zero channels before it, the rest after), as
    option A does. After pruning, `placement[c]` is the output position of input channel `c`, or
    -1 when that channel is no longer forwarded.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output (>= `in_channels`).
        stride: spatial subsampling (`x[:, :, ::stride, ::stride]`).

    Raises:
        ValueError: if `out_channels` < `in_channels` or a count or the stride is < 1.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if min(in_channels, out_channels, stride) < 1 or out_channels < in_channels:
            raise ValueError(
                f"ZeroPadShortcut needs 1 <= in_channels <= out_channels and stride >= 1, got in_channels="
                f"{in_channels}, out_channels={out_channels}, stride={stride}."
            )
        self.stride = stride
        self.out_channels = out_channels
        before = (out_channels - in_channels) // 2
        self.placement = [before + channel for channel in range(in_channels)]
        self._rebuild_indices()

    @property
    def in_channels(self) -> int:
        return len(self.placement)

    def set_placement(self, placement: list[int], out_channels: int) -> None:
        """Replaces the channel placement (what pruning does); checks it first.

        Raises:
            ValueError: if a position is outside [-1, out_channels) or two channels share one.
        """
        used = [position for position in placement if position >= 0]
        if any(not -1 <= position < out_channels for position in placement) or len(set(used)) != len(used):
            raise ValueError(
                f"`placement` must hold distinct output positions in [0, {out_channels}) or -1, got {placement}."
            )
        self.placement = list(placement)
        self.out_channels = out_channels
        self._rebuild_indices()

    def _rebuild_indices(self) -> None:
        kept = [channel for channel, position in enumerate(self.placement) if position >= 0]
        positions = [self.placement[channel] for channel in kept]
        self._all_inputs_kept = len(kept) == len(self.placement)
        contiguous = positions == list(range(positions[0], positions[0] + len(positions))) if positions else False
        # The published layout (and any pruning of it that keeps the input block contiguous) is
        # one F.pad, as in the original code; anything else is a pad by one zero channel and a
        # gather, both of which export to ONNX.
        self._pad = (positions[0], self.out_channels - positions[0] - len(positions)) if contiguous else None
        gather = [len(kept)] * self.out_channels
        for rank, position in enumerate(positions):
            gather[position] = rank
        device = self._gather.device if "_gather" in self._buffers else None
        # Non-persistent: the state dict stays the published one (no shortcut entries).
        self.register_buffer("_kept_inputs", torch.tensor(kept, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("_gather", torch.tensor(gather, dtype=torch.long, device=device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        if not self._all_inputs_kept:
            x = x.index_select(1, self._kept_inputs)
        if self._pad is not None:
            return F.pad(x, (0, 0, 0, 0, *self._pad))
        return F.pad(x, (0, 0, 0, 0, 0, 1)).index_select(1, self._gather)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, stride={self.stride}"


class CifarBasicBlockA(nn.Module):
    """Two 3x3 conv-BN layers and a residual add; `shortcut` zero-pads when the shape changes.

    Args:
        in_channels: channels of the block's input.
        out_channels: channels of the block's output.
        stride: stride of the first convolution (2 halves the resolution).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNetA(nn.Module):
    """Option-A ResNet for 32x32 inputs: conv 16, three stages of 16/32/64 channels, pool, `linear`.

    Args:
        blocks_per_stage: basic blocks in each stage (3 gives ResNet20, 9 ResNet56).
        num_classes: outputs of `linear`.
        in_channels: channels of the input images.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(32, 64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            # As the published training code initialised them (the weights usually come from a file).
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [CifarBasicBlockA(in_channels, out_channels, stride)]
        layers += [CifarBasicBlockA(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


@register_model
def resnet20_a(num_classes: int = 10, in_channels: int = 3) -> CifarResNetA:
    """ResNet20 for CIFAR with option-A (zero-pad) shortcuts: 269,722 params at 10 classes."""
    return CifarResNetA(3, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet56_a(num_classes: int = 10, in_channels: int = 3) -> CifarResNetA:
    """ResNet56 for CIFAR with option-A (zero-pad) shortcuts: 853,018 params at 10 classes."""
    return CifarResNetA(9, num_classes=num_classes, in_channels=in_channels)
