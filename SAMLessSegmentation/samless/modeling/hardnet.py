"""HarDNet backbones (Chao et al., "HarDNet: A Low Memory Traffic Network", ICCV 2019).

Harmonic dense blocks connect layer k to layer k - 2**n whenever 2**n divides k, so the
concatenations stay short (low memory traffic) while shallow features still reach deep layers.
The classification head is dropped: the backbone returns one feature map per output stride
(4, 8, 16, 32), the last one computed at that stride, for a segmentation decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ARCHS", "HarDNet", "HarDNetSpec", "HarmonicDenseBlock"]


@dataclass(frozen=True)
class HarDNetSpec:
    """Published configuration of one HarDNet variant."""

    stem_channels: tuple[int, int]
    transition_channels: tuple[int, ...]  # 1x1 transition conv width after each block
    growth_rates: tuple[int, ...]
    n_layers: tuple[int, ...]
    downsample: tuple[bool, ...]  # halve the resolution after this block
    grmul: float
    depthwise: bool  # 39DS: depthwise-separable convs, depthwise stride-2 downsampling


ARCHS: dict[str, HarDNetSpec] = {
    "85": HarDNetSpec(
        stem_channels=(48, 96),
        transition_channels=(192, 256, 320, 480, 720, 1280),
        growth_rates=(24, 24, 28, 36, 48, 256),
        n_layers=(8, 16, 16, 16, 16, 4),
        downsample=(True, False, True, False, True, False),
        grmul=1.7,
        depthwise=False,
    ),
    "68": HarDNetSpec(
        stem_channels=(32, 64),
        transition_channels=(128, 256, 320, 640, 1024),
        growth_rates=(14, 16, 20, 40, 160),
        n_layers=(8, 16, 16, 16, 4),
        downsample=(True, False, True, True, False),
        grmul=1.7,
        depthwise=False,
    ),
    "39ds": HarDNetSpec(
        stem_channels=(24, 48),
        transition_channels=(96, 320, 640, 1024),
        growth_rates=(16, 20, 64, 160),
        n_layers=(4, 16, 8, 4),
        downsample=(True, True, True, False),
        grmul=1.6,
        depthwise=True,
    ),
}


class ConvBNAct(nn.Sequential):
    """Conv (no bias, BN follows) + BatchNorm + ReLU6, as in the paper."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class DWConvBN(nn.Sequential):
    """Depthwise 3x3 conv + BatchNorm, no activation (the linear half of a separable conv)."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
        )


class SeparableConv(nn.Sequential):
    """HarDNet-39DS layer: pointwise 1x1 (+BN+ReLU6) then depthwise 3x3 (+BN)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(ConvBNAct(in_ch, out_ch, 1), DWConvBN(out_ch))


def _harmonic_links(n_layers: int, in_ch: int, growth_rate: float, grmul: float):
    """Per layer 1..n: (output channels, input channels, indices of the layers it reads).

    Index 0 is the block input. Layer k reads k - 2**i for every 2**i dividing k; each extra
    link multiplies its width by grmul (wider layers where more paths converge), rounded to even.
    """
    out_chs = [in_ch]
    specs = []
    for k in range(1, n_layers + 1):
        links = []
        width = float(growth_rate)
        i = 0
        while k % (2**i) == 0 and 2**i <= k:
            links.append(k - 2**i)
            if i > 0:
                width *= grmul
            i += 1
        out_ch = int(int(width + 1) / 2) * 2
        specs.append((out_ch, sum(out_chs[j] for j in links), links))
        out_chs.append(out_ch)
    return specs


class HarmonicDenseBlock(nn.Module):
    """Harmonic dense block; outputs the concatenation of the odd layers and the last layer."""

    def __init__(self, in_ch: int, n_layers: int, growth_rate: int, grmul: float, depthwise: bool) -> None:
        super().__init__()
        specs = _harmonic_links(n_layers, in_ch, growth_rate, grmul)
        self.links = [links for _, _, links in specs]
        self.layers = nn.ModuleList(
            SeparableConv(cin, cout) if depthwise else ConvBNAct(cin, cout, 3) for cout, cin, _ in specs
        )
        # Even layers (except the last) only feed later layers; dropping them keeps the output thin.
        self.keep = [k for k in range(1, n_layers + 1) if k % 2 == 1 or k == n_layers]
        self.out_channels = sum(specs[k - 1][0] for k in self.keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for layer, links in zip(self.layers, self.links):
            inp = outs[links[0]] if len(links) == 1 else torch.cat([outs[j] for j in links], 1)
            outs.append(layer(inp))
        return torch.cat([outs[k] for k in self.keep], 1)


class HarDNet(nn.Module):
    """HarDNet-85 / -68 / -39DS feature extractor for any number of input channels.

    ``forward(x)`` returns ``[f4, f8, f16, f32]``: the last feature map at output strides 4, 8,
    16 and 32 (each the 1x1 transition output of the last block at that stride).
    """

    strides: list[int]
    out_channels: list[int]

    def __init__(self, arch: str = "85", in_channels: int = 1) -> None:
        super().__init__()
        key = arch.lower().removeprefix("hardnet")
        if key not in ARCHS:
            raise ValueError(f"unknown HarDNet arch {arch!r}; allowed: {sorted(ARCHS)}")
        spec = ARCHS[key]
        self.arch = key
        c0, c1 = spec.stem_channels
        # Stem to stride 4: conv3x3 s2, then a 3x3 conv (1x1 for 39DS), then maxpool
        # (depthwise stride-2 conv for 39DS).
        self.stem = nn.Sequential(
            ConvBNAct(in_channels, c0, 3, 2),
            ConvBNAct(c0, c1, 1 if spec.depthwise else 3),
            DWConvBN(c1, 2) if spec.depthwise else nn.MaxPool2d(3, 2, 1),
        )
        # Group blocks by stride; the downsampling that starts a stage belongs to that stage.
        stages: list[list[nn.Module]] = [[]]
        out_channels: list[int] = []
        ch = c1
        for i, (tr_ch, gr, n) in enumerate(zip(spec.transition_channels, spec.growth_rates, spec.n_layers)):
            block = HarmonicDenseBlock(ch, n, gr, spec.grmul, spec.depthwise)
            stages[-1] += [block, ConvBNAct(block.out_channels, tr_ch, 1)]
            ch = tr_ch
            if spec.downsample[i]:
                out_channels.append(ch)
                stages.append([DWConvBN(ch, 2) if spec.depthwise else nn.MaxPool2d(2, 2)])
        out_channels.append(ch)
        if len(stages) != 4:
            raise AssertionError(f"HarDNet-{key} config must give 4 strides, got {len(stages)}")
        self.stages = nn.ModuleList(nn.Sequential(*s) for s in stages)
        self.out_channels = out_channels
        self.strides = [4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats
