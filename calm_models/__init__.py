"""Continuous Autoregressive Language Models (CALM) assembled from :mod:`likelihood_free`.

One file per concept: :mod:`~calm_models.autoencoder` (K tokens <-> one vector),
:mod:`~calm_models.backbone` (Llama-style Transformer with a KV cache), :mod:`~calm_models.heads`
(energy, flow and diffusion heads), :mod:`~calm_models.model` (CALM),
:mod:`~calm_models.baseline` (token Transformer), :mod:`~calm_models.data`, and the entry points
:mod:`~calm_models.train`, :mod:`~calm_models.evaluate`, :mod:`~calm_models.generate`,
:mod:`~calm_models.robustness` and :mod:`~calm_models.plot`.
"""

from calm_models.autoencoder import Autoencoder, AutoencoderConfig
from calm_models.backbone import Backbone, BackboneConfig, KVCache
from calm_models.baseline import TokenLM, TokenLMConfig
from calm_models.heads import DiffusionHead, EnergyHead, FlowHead, HeadConfig, build_head
from calm_models.model import CALM, CALMConfig

__all__ = [
    "Autoencoder",
    "AutoencoderConfig",
    "Backbone",
    "BackboneConfig",
    "KVCache",
    "TokenLM",
    "TokenLMConfig",
    "HeadConfig",
    "EnergyHead",
    "FlowHead",
    "DiffusionHead",
    "build_head",
    "CALM",
    "CALMConfig",
]
