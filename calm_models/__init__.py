"""Continuous Autoregressive Language Models (CALM) assembled from :mod:`likelihood_free`.

One file per concept: :mod:`~calm_models.config` (configurations, presets), :mod:`~calm_models.autoencoder` (K tokens
<-> one vector), :mod:`~calm_models.backbone` (Llama-style Transformer), :mod:`~calm_models.heads` (energy, flow and
diffusion heads), :mod:`~calm_models.model` (CALM), :mod:`~calm_models.baseline` (token Transformer),
:mod:`~calm_models.protocol` (what both implement), :mod:`~calm_models.flops`, :mod:`~calm_models.data`,
:mod:`~calm_models.checkpoint`, :mod:`~calm_models.runs`, :mod:`~calm_models.convert` (the released checkpoints),
:mod:`~calm_models.hf` (Hugging Face LMs) and the entry points :mod:`~calm_models.train`, :mod:`~calm_models.evaluate`,
:mod:`~calm_models.generate`, :mod:`~calm_models.robustness` and :mod:`~calm_models.plot`.
"""

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
