"""Aggregators: dense prompt embedding -> mask logits, without SAM (training phase 2 and inference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvUpsample", "ConvUpsampleDetail", "TransposedConvDecoder", "LayerNorm2d", "Size"]

Size = int | tuple[int, int]


def _resize(x: torch.Tensor, out_size: Size) -> torch.Tensor:
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    # Bilinear at an unchanged size is an exact copy, so this is always safe to apply.
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class ConvUpsample(nn.Module):
    """MS-SAMLess aggregator: 1x1 conv (256->128) + GN + ReLU, bilinear x2, 1x1 conv (128->64) +
    GN + ReLU, bilinear x2, 1x1 conv (64->classes), resize to ``out_size``.

    A 1x1 conv and a bilinear resize are both linear and bilinear weights sum to 1, so they
    commute exactly. The forward pass applies each conv *before* the upsampling that precedes it
    in the description above (on 4x fewer pixels, and resampling the narrower tensor): same
    function and same parameters, about 5x cheaper on CPU.
    """

    def __init__(self, embed_dim: int = 256, num_classes: int = 2, in_channels: int = 1) -> None:
        super().__init__()  # in_channels: the slice's; unused here (only the embedding is read)
        self.conv1 = nn.Conv2d(embed_dim, 128, 1, bias=False)
        self.norm1 = nn.GroupNorm(8, 128)
        # Bias-free: GroupNorm follows and would cancel a bias anyway.
        self.conv2 = nn.Conv2d(128, 64, 1, bias=False)
        self.norm2 = nn.GroupNorm(8, 64)
        self.head = nn.Conv2d(64, num_classes, 1)

    def features(self, embedding: torch.Tensor) -> torch.Tensor:
        """The 64 channels before the head, at twice the embedding's size."""
        x = F.relu(self.norm1(self.conv1(embedding)))
        # == conv2(up2(x)): GroupNorm statistics are taken after the upsampling, as specified.
        return F.relu(self.norm2(_up2(self.conv2(x))))

    def forward(self, embedding: torch.Tensor, out_size: Size, image: torch.Tensor | None = None) -> torch.Tensor:
        # == head(up2(x)) (the head's bias passes through bilinear weights that sum to 1).
        return _resize(_up2(self.head(self.features(embedding))), out_size)


def _conv_gn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
                         nn.GroupNorm(4, out_ch), nn.ReLU(inplace=True))


class DetailBranch(nn.Module):
    """A correction to the logits on the aggregator's finer grid, from the image: a stride-2 3x3 conv
    reads the input pixels, a 1x1 conv the aggregator's features, two 3x3 convs fuse them."""

    def __init__(self, in_channels: int, feature_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv_gn_relu(in_channels, width, stride=2)
        self.lateral = nn.Conv2d(feature_channels, width, 1, bias=False)
        self.fuse = nn.Sequential(_conv_gn_relu(2 * width, width), _conv_gn_relu(width, width))
        self.head = nn.Conv2d(width, num_classes, 1)
        # Zero at the start: the branch adds nothing until trained, so a ConvUpsample network's
        # weights start a ConvUpsampleDetail one computing exactly what it did.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # Same grid for the presets (input 4x the embedding); otherwise the image side is resized.
        stem = _resize(self.stem(image), features.shape[-2:])
        return self.head(self.fuse(torch.cat([stem, self.lateral(features)], 1)))


class ConvUpsampleDetail(ConvUpsample):
    """ConvUpsample plus a detail branch that reads the input slice(s) themselves.

    Not in the paper (a design change): the embedding lies on a grid 4 pixels apart (64 x 64 for
    256 px), and ConvUpsample's 1x1 convs and bilinear upsampling cannot draw anything finer, so
    lesions a few millimetres across fade and edges blur. The branch adds image evidence on the
    aggregator's 2-pixel grid (at full resolution a training step cost 2.4x as much on a 2-core CPU).
    """

    def __init__(self, embed_dim: int = 256, num_classes: int = 2, in_channels: int = 1) -> None:
        super().__init__(embed_dim, num_classes)
        self.detail = DetailBranch(in_channels, self.conv2.out_channels, num_classes)

    def forward(self, embedding: torch.Tensor, out_size: Size, image: torch.Tensor | None = None) -> torch.Tensor:
        if image is None:
            raise ValueError("ConvUpsampleDetail needs the input image (SAMLessNet.decode(..., image=x))")
        x = self.features(embedding)
        return _resize(_up2(self.head(x) + self.detail(image, x)), out_size)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of an NCHW tensor (as in SAM's mask decoder)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class TransposedConvDecoder(nn.Module):
    """AutoSAM's surrogate decoder, shaped like SAM's output upscaling (two stride-2 transposed convs)."""

    def __init__(self, embed_dim: int = 256, num_classes: int = 2, in_channels: int = 1) -> None:
        super().__init__()  # in_channels: unused (only the embedding is read)
        self.up1 = nn.ConvTranspose2d(embed_dim, 64, 2, stride=2)
        self.norm = LayerNorm2d(64)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.head = nn.Conv2d(32, num_classes, 1)

    def forward(self, embedding: torch.Tensor, out_size: Size, image: torch.Tensor | None = None) -> torch.Tensor:
        x = F.gelu(self.norm(self.up1(embedding)))
        x = F.gelu(self.up2(x))
        return _resize(self.head(x), out_size)
