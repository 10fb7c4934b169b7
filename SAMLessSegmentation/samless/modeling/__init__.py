"""Networks of MS-SAMLess: HarDNet prompt learner + aggregator, built from one config."""

from .aggregator import ConvUpsample, ConvUpsampleDetail, TransposedConvDecoder
from .build import (
    AGGREGATORS,
    BACKBONES,
    PRESETS,
    LesionProbability,
    NetConfig,
    SAMLessNet,
    build_model,
    model_complexity,
    resolve_config,
)
from .hardnet import HarDNet
from .learner import PromptLearner

__all__ = [
    "AGGREGATORS",
    "BACKBONES",
    "PRESETS",
    "ConvUpsample",
    "ConvUpsampleDetail",
    "HarDNet",
    "LesionProbability",
    "NetConfig",
    "PromptLearner",
    "SAMLessNet",
    "TransposedConvDecoder",
    "build_model",
    "model_complexity",
    "resolve_config",
]
