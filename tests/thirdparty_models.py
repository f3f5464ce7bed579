"""Tiny models built the way third-party libraries build theirs (Hugging Face, timm, torchvision).

The libraries themselves are not test dependencies; each module here copies the one construct
that matters (an output type, a layer subclass, a reshape into heads) at a size that runs in
milliseconds.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


class ModelOutput(collections.OrderedDict):
    """As `transformers.utils.ModelOutput`: a dict whose non-None fields are also attributes."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return tuple(self.values())[key]


@dataclasses.dataclass
class ImageClassifierOutput(ModelOutput):
    """As `transformers.modeling_outputs.ImageClassifierOutput` (no labels: loss is None)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class HFStyleClassifier(nn.Module):
    """A conv net whose forward returns an `ImageClassifierOutput`, a tuple or a dict."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3, returns: str = "model_output") -> None:
        super().__init__()
        self.returns = returns
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, pixel_values: torch.Tensor):
        logits = self.classifier(F.adaptive_avg_pool2d(F.relu(self.conv(pixel_values)), 1).flatten(1))
        if self.returns == "tuple":
            return (logits,)
        if self.returns == "dict":
            return {"logits": logits}
        if self.returns == "dict_without_logits":
            return {"scores": logits}
        return ImageClassifierOutput(logits=logits)


class BatchNorm1dHead(nn.Module):
    """A conv trunk and an MLP head with `BatchNorm1d` (one value per channel at batch 1)."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """As timm's `Conv2dSame` / efficientnet-pytorch's `Conv2dDynamicSamePadding`: TF "SAME" padding
    computed from the input size in `forward`; `padding` is 0 on the module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = _same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = _same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SamePadNet(nn.Module):
    """Two convs, the second a stride-2 `Conv2dSame` (5x5 with 16x16 inputs: output 8x8)."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.conv = Conv2dSame(8, 16, 5, stride=2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(F.relu(self.stem(x)))), 1).flatten(1))


class MobileNetV2ConvLayer(nn.Module):
    """As Hugging Face's `MobileNetV2ConvLayer` with `tf_padding`: the parent pads its input from
    the conv's `stride`, `kernel_size` and `dilation` before calling it."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        self.normalization = nn.BatchNorm2d(out_channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        conv = self.convolution
        pad_h = _same_padding(features.shape[-2], conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pad_w = _same_padding(features.shape[-1], conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        features = F.pad(features, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.relu6(self.normalization(conv(features)))


class HFMobileNetStyle(nn.Module):
    def __init__(self, num_classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = MobileNetV2ConvLayer(in_channels, 8, 3, stride=2)
        self.layer = MobileNetV2ConvLayer(8, 16, 3)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.layer(self.stem(x)), 1).flatten(1))


class Attention(nn.Module):
    """As timm's ViT `Attention`: one `qkv` linear, reshaped to (3, heads, head_dim)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim))


class TinyViT(nn.Module):
    """A one-block ViT with 4 heads of width 8 (dim 32) on 4x4 patches."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x).mean(dim=1))


class ConvRNN(nn.Module):
    """A conv feeding a GRU or LSTM over the image columns (as CRNN text recognizers do)."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3, rnn: str = "gru") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.rnn = (nn.GRU if rnn == "gru" else nn.LSTM)(8, 12, batch_first=True)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.conv(x)).mean(dim=2).transpose(1, 2)  # (N, W, C)
        output, _ = self.rnn(features)
        return self.fc(output[:, -1])


class ConcatResidual(nn.Module):
    """Two 8-channel branches concatenated and added to a 16-channel conv (Inception-ResNet style)."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.branch_a = nn.Conv2d(16, 8, 3, padding=1)
        self.branch_b = nn.Conv2d(16, 8, 1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.conv(x) + torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))
