"""Prompt learner g: FLAIR slice -> dense prompt embedding (SAM's prompt-encoder output shape)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hardnet import HarDNet

__all__ = ["PromptLearner", "FPNDecoder"]


class FPNDecoder(nn.Module):
    """Cheap top-down fusion of backbone features down to one output stride.

    1x1 lateral projections to ``channels``, bilinear x2 upsample-and-add from the coarsest level,
    then a depthwise-separable 3x3 refinement. Levels finer than ``out_stride`` are not used.
    """

    def __init__(self, in_channels: list[int], strides: list[int], out_stride: int, channels: int) -> None:
        super().__init__()
        if out_stride not in strides:
            raise ValueError(f"out_stride {out_stride} not in backbone strides {strides}")
        self.first = strides.index(out_stride)
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels[self.first :])
        self.refine = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        feats = feats[self.first :]
        x = self.laterals[-1](feats[-1])
        for lateral, f in zip(self.laterals[-2::-1], feats[-2::-1]):
            # Input sizes are multiples of 32, so every level is exactly twice the next one.
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False) + lateral(f)
        return self.refine(x)


class PromptLearner(nn.Module):
    """HarDNet encoder + FPN-like decoder -> (B, embed_dim, embed_size, embed_size).

    The decoder fuses down to stride ``input_size / embed_size`` (e.g. 512 -> 64 is stride 8). If
    that stride is not a backbone stride it fuses to the nearest finer one (stride 4 at the
    finest) and bilinearly resizes. The last projection is linear: the embedding stands in for
    SAM's prompt-encoder output, which is not bounded or rectified.
    """

    def __init__(
        self,
        backbone: str = "hardnet85",
        in_channels: int = 1,
        input_size: int = 512,
        embed_dim: int = 256,
        embed_size: int = 64,
        decoder_channels: int = 64,
    ) -> None:
        super().__init__()
        self.encoder = HarDNet(backbone, in_channels)
        self.input_size = input_size
        self.embed_dim = embed_dim
        self.embed_size = embed_size
        stride = input_size // embed_size
        finer = [s for s in self.encoder.strides if s <= stride]
        fuse_stride = max(finer) if finer else min(self.encoder.strides)
        self.fuse_stride = fuse_stride
        self.decoder = FPNDecoder(self.encoder.out_channels, self.encoder.strides, fuse_stride, decoder_channels)
        # Resize the narrow decoder output rather than the wide embedding (1x1 conv and bilinear
        # resize commute, so the result is the same for less work).
        self.resize = input_size // fuse_stride != embed_size
        self.proj = nn.Conv2d(decoder_channels, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.decoder(self.encoder(x))
        if self.resize:
            y = F.interpolate(y, size=(self.embed_size, self.embed_size), mode="bilinear", align_corners=False)
        return self.proj(y)
