"""ResNets with BasicBlocks (He et al. 2016): the CIFAR variant and the ImageNet ResNet18.

Counts at 10 classes (CIFAR) or 1000 classes (ResNet18), 3 input channels; MACs are the forward
pass at batch 1 (convolutions and linear layers, as `torch.utils.flop_counter` counts them:
FLOPs / 2).

| name     | layers | params     | MACs                                               |
|----------|--------|------------|----------------------------------------------------|
| resnet20 | 20     | 272,474    | 40.81M (32x32)                                     |
| resnet56 | 56     | 855,770    | 125.75M (32x32)                                    |
| resnet18 | 18     | 11,689,512 | 1.814G (224x224), 1.556G (200x200), 37.52M (32x32) |

The CIFAR ResNets use a 1x1-conv + BN projection shortcut in the two downsampling blocks (option
B of the paper) rather than zero-padding (option A): a projection is an ordinary layer, so
structured pruning (torch-pruning) can follow the channels through every residual add. That is
why ResNet20 has 272,474 parameters (paper 000's "272K") instead of option A's 269,722.

Attribute names follow torchvision (`conv1`, `bn1`, `layer1`..`layer4`, `fc`; blocks `conv1`,
`bn1`, `conv2`, `bn2`), so layer-name patterns such as `layer1.*.conv1` (paper 002) select what
they say, and `resnet18`'s state dict has the same keys as torchvision's. The residual branch of
a CIFAR block is `shortcut`, of a ResNet18 block `downsample` (None when it is the identity).
"""

from __future__ import annotations

from torch import Tensor, nn

from compresslight.registry import register_model

__all__ = ["BasicBlock", "CifarBasicBlock", "CifarResNet", "ResNet", "resnet18", "resnet20", "resnet56"]


def _init_weights(model: nn.Module) -> None:
    # He et al.'s initialization for ReLU networks; the Linear head keeps PyTorch's default, as
    # torchvision's ResNets do.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CifarBasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add; `shortcut` projects when the shape changes.

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
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 conv 16, three stages of 16/32/64 channels, global pool, `fc`.

    Args:
        blocks_per_stage: BasicBlocks in each of the three stages (3 gives ResNet20, 9 ResNet56).
        num_classes: outputs of `fc`.
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
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [CifarBasicBlock(in_channels, out_channels, stride)]
        layers += [CifarBasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 conv-BN layers, `downsample` projects if needed.

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
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """ImageNet-layout ResNet: 7x7/2 conv 64, 3x3/2 max pool, four stages 64-512, global pool, `fc`.

    Global average pooling makes it take any input from 32x32 up (Steelpatch is 200x200).

    Args:
        blocks_per_stage: BasicBlocks in each of the four stages ((2, 2, 2, 2) gives ResNet18).
        num_classes: outputs of `fc`.
        in_channels: channels of the input images.
    """

    def __init__(
        self, blocks_per_stage: tuple[int, int, int, int], num_classes: int = 1000, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_stage(64, 64, blocks_per_stage[0], stride=1)
        self.layer2 = self._make_stage(64, 128, blocks_per_stage[1], stride=2)
        self.layer3 = self._make_stage(128, 256, blocks_per_stage[2], stride=2)
        self.layer4 = self._make_stage(256, 512, blocks_per_stage[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        _init_weights(self)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet20 for CIFAR (3 blocks per stage, projection shortcuts): 272,474 params at 10 classes."""
    return CifarResNet(3, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet56 for CIFAR (9 blocks per stage, projection shortcuts): 855,770 params at 10 classes."""
    return CifarResNet(9, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet18, ImageNet layout (torchvision's keys): 11,689,512 params at 1000 classes."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
