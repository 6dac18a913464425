"""Continuous Autoregressive Language Models (CALM) assembled from :mod:`likelihood_free`, one module per concept."""

from calm_models.autoencoder import Autoencoder
from calm_models.backbone import Backbone, KVCache
from calm_models.baseline import TokenLM
from calm_models.config import AutoencoderConfig, BackboneConfig, CALMConfig, HeadConfig, TokenLMConfig, TrainConfig
from calm_models.errors import CalmError
from calm_models.heads import DiffusionHead, EnergyHead, FlowHead, build_head
from calm_models.model import CALM
from calm_models.protocol import Generation, LanguageModel

__all__ = [
    "CALM",
    "CalmError",
    "Autoencoder",
    "AutoencoderConfig",
    "Backbone",
    "BackboneConfig",
    "CALMConfig",
    "DiffusionHead",
    "EnergyHead",
    "FlowHead",
    "Generation",
    "HeadConfig",
    "KVCache",
    "LanguageModel",
    "TokenLM",
    "TokenLMConfig",
    "TrainConfig",
    "build_head",
]
