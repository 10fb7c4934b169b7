"""One builder for every network: config -> SAMLessNet (in the spirit of segment_anything's build_sam)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from samless.card import AGGREGATOR_NAMES, BACKBONES, PRESETS, NetConfig, resolve_config

from .aggregator import ConvUpsample, ConvUpsampleDetail, Size, TransposedConvDecoder
from .learner import PromptLearner

__all__ = [
    "AGGREGATORS",
    "BACKBONES",
    "PRESETS",
    "LesionProbability",
    "NetConfig",
    "SAMLessNet",
    "build_model",
    "model_complexity",
    "resolve_config",
]

AGGREGATORS: dict[str, type[nn.Module]] = {
    "conv_upsample": ConvUpsample,
    "conv_upsample_detail": ConvUpsampleDetail,
    "transposed_conv": TransposedConvDecoder,
}
assert tuple(AGGREGATORS) == AGGREGATOR_NAMES  # the card (torch-free) validates names against its own list


class SAMLessNet(nn.Module):
    """Prompt learner g + aggregator. Phase 1 trains ``learner`` (via ``embed``) against SAM's
    mask decoder; phase 2 fine-tunes both; inference runs ``forward``."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        self.learner = PromptLearner(
            backbone=config.backbone,
            in_channels=config.in_channels,
            input_size=config.input_size,
            embed_dim=config.embed_dim,
            embed_size=config.embed_size,
            decoder_channels=config.decoder_channels,
        )
        self.aggregator = AGGREGATORS[config.aggregator](config.embed_dim, config.num_classes, config.in_channels)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> dense prompt embedding (B, embed_dim, embed_size, embed_size)."""
        return self.learner(x)

    def decode(self, emb: torch.Tensor, out_size: Size, image: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding (and, for aggregators that read it, the input) -> logits (B, num_classes, *out_size)."""
        return self.aggregator(emb, out_size, image)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes, H, W)."""
        return self.decode(self.embed(x), (x.shape[-2], x.shape[-1]), x)


class LesionProbability(nn.Module):
    """Lesion probability (B, 1, H, W): what is exported to ONNX and what the torch backend runs."""

    def __init__(self, net: SAMLessNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)[:, 1:2]


def build_model(config: NetConfig | dict[str, Any] | str) -> SAMLessNet:
    """Build a randomly initialised SAMLessNet from a config, its dict, or a preset name."""
    return SAMLessNet(resolve_config(config))


def model_complexity(config: NetConfig | dict[str, Any] | str) -> dict[str, int | float]:
    """Parameter count and GFLOPs for one slice (FlopCounterMode: a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = resolve_config(config)
    net = build_model(cfg).eval()
    x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "gflops_per_slice": counter.get_total_flops() / 1e9,
    }
