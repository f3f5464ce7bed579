"""VGG16 with BatchNorm and its compact depthwise-separable variant, CIFAR head (paper 001).

Paper 001 (section VII, Tables III, VII, VIII) keeps VGG16's 13 convolutions (configuration D,
3x3, stride 1, padding 1, each with bias and followed by BN and ReLU) and replaces the three
fully connected layers with one Linear 512 -> classes. The compact VGG16 keeps the first
convolution and turns every other one into a depthwise-separable pair, MobileNet style:
depthwise 3x3 + BN + ReLU, then pointwise 1x1 + BN + ReLU (both convolutions with bias, as the
paper counts them).

Counts at 10 classes, 3 input channels, 32x32 input; MACs are the forward pass at batch 1
(convolutions and linear layers: `torch.utils.flop_counter` FLOPs / 2), paper 001's in brackets:

| name          | layers                         | params              | MACs                 |
|---------------|--------------------------------|---------------------|----------------------|
| vgg16         | 13 conv + 1 FC                 | 14,728,266 (14.73M) | 313,201,664 (313.2M) |
| vgg16_compact | 1 conv + 12 dw/pw pairs + 1 FC | 1,698,378 (1.70M)   | 38,018,048 (38M)     |

Both match Tables VII and VIII exactly. A global average pool before the head is the identity
at 32x32 (the features end at 1x1) and lets the networks take larger inputs, e.g. 200x200
Steelpatch patches.
"""

from __future__ import annotations

from torch import Tensor, nn

from compresslight.registry import register_model

__all__ = ["VGG", "VGG16_CFG", "vgg16", "vgg16_compact"]

# Output channels of the 13 convolutions of configuration D; "M" is a 2x2/2 max pool.
VGG16_CFG: list[int | str] = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
]


def _make_features(cfg: list[int | str], in_channels: int, depthwise_separable: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2, stride=2))
            continue
        out_channels = int(item)
        # The compact design keeps the first convolution full, as MobileNet (which paper 001
        # follows) does: over 1-3 input channels a depthwise pair saves next to nothing.
        if depthwise_separable and layers:
            layers += [
                nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, out_channels, 1),
            ]
        else:
            layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
        layers += [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        channels = out_channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG with BatchNorm: convolutions in `features`, global average pool, one Linear `classifier`.

    Args:
        cfg: output channels per convolution, "M" for a 2x2 max pool.
        num_classes: outputs of `classifier`.
        in_channels: channels of the input images.
        depthwise_separable: make every convolution after the first a depthwise 3x3 + pointwise 1x1
            pair (paper 001's compact VGG16).
    """

    def __init__(
        self,
        cfg: list[int | str],
        num_classes: int = 10,
        in_channels: int = 3,
        depthwise_separable: bool = False,
    ) -> None:
        super().__init__()
        self.features = _make_features(cfg, in_channels, depthwise_separable)
        last_channels = [int(item) for item in cfg if item != "M"][-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        # Kaiming for the ReLU convolutions, N(0, 0.01) for the head, as torchvision's VGG.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model
def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG16-BN with paper 001's one-Linear CIFAR head: 14,728,266 params, 313.2M MACs at 32x32."""
    return VGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels)


@register_model
def vgg16_compact(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """Paper 001's compact VGG16 (depthwise-separable after conv 1): 1,698,378 params, 38.0M MACs."""
    return VGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels, depthwise_separable=True)
