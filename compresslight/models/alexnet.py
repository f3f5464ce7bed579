"""AlexNet with BatchNorm and without grouped convolutions, as paper 003's reference model.

Paper 003 compresses "batch normalized" AlexNet with no group convolutions: 62.3M parameters and
1140 MFLOPs (MACs) against 727 for the grouped Caffe AlexNet. Those counts are the original
Krizhevsky widths 96/256/384/384/256 ungrouped (torchvision's 64/192/384/256/256 variant has
61.1M parameters and 714M MACs), so that is the layout here: conv 11x11/4 96, max pool 3/2,
conv 5x5 256, max pool 3/2, conv 3x3 384, 384, 256, max pool 3/2, each convolution followed by
BN and ReLU (BN replaces the local response normalization); adaptive average pool to 6x6; FC
4096 - 4096 - classes, the first two with BN, ReLU and dropout.

Counts at 1000 classes, 3 input channels, 224x224 input (conv1 pads by 2, so 224 gives Caffe's
55x55 first feature map); MACs are the forward pass at batch 1 (convolutions and linear layers:
`torch.utils.flop_counter` FLOPs / 2), paper 003's in brackets:

| name    | layers        | params             | MACs                  |
|---------|---------------|--------------------|-----------------------|
| alexnet | 5 conv + 3 FC | 62,397,480 (62.3M) | 1,135,256,096 (1140M) |

The paper's 1140M presumably also counts something beyond the multiply-adds of convolutions and
linear layers (biases, BN or pooling); ours is 0.4% lower. The three 3/2 max pools need inputs of
at least 63x63 (a 32x32 image is 1x1 before the last pool), so 32x32 CIFAR images do not fit this
ImageNet layout; upsample them or use a CIFAR architecture.
"""

from __future__ import annotations

from torch import Tensor, nn

from compresslight.registry import register_model

__all__ = ["MIN_INPUT_SIZE", "AlexNet", "alexnet"]

# The smallest height/width for which the last 3x3/2 max pool still has a full window.
MIN_INPUT_SIZE = 63


class AlexNet(nn.Module):
    """AlexNet-BN: convolutions in `features`, `avgpool` to 6x6, three Linear layers in `classifier`.

    Args:
        num_classes: outputs of the last Linear layer.
        in_channels: channels of the input images.
        dropout: drop probability before the second and third Linear layers.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 96, 11, stride=4, padding=2),
            nn.BatchNorm2d(96),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(96, 256, 5, padding=2),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(256, 384, 3, padding=1),
            nn.BatchNorm2d(384),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, 3, padding=1),
            nn.BatchNorm2d(384),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Linear(256 * 6 * 6, 4096),
            nn.BatchNorm1d(4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.BatchNorm1d(4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        # Kaiming for the ReLU convolutions, N(0, 0.01) for the Linear layers, as torchvision's VGG.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Classifies a batch of images.

        Raises:
            ValueError: if the images are smaller than `MIN_INPUT_SIZE` in height or width.
        """
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"AlexNet needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got "
                f"{tuple(x.shape[-2:])}; upsample the images or use a CIFAR architecture."
            )
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model
def alexnet(num_classes: int = 10, in_channels: int = 3) -> AlexNet:
    """AlexNet-BN, ungrouped 96/256/384/384/256 (paper 003): 62.4M params, 1135M MACs at 224x224."""
    return AlexNet(num_classes=num_classes, in_channels=in_channels)
