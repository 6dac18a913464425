"""Likelihood-free scoring and sampling: energy score, Brier/BrierLM, black-box temperature.

A small toolkit that imports only ``torch`` and ``numpy`` and knows nothing about language
models:

* :mod:`likelihood_free.energy` -- the energy score of a sampler against targets and the matching
  training loss (strictly proper for ``beta`` in ``(0, 2)``).
* :mod:`likelihood_free.brier` -- Brier scores, their unbiased two-sample estimates, BrierLM and a
  streaming metric with standard errors.
* :mod:`likelihood_free.temperature` -- exact temperature sampling for any ``T`` in ``(0, 1]``
  from a black-box sampler, the Bernoulli factory behind it, and a vectorised batch approximation.
"""

from importlib import metadata as _metadata

from likelihood_free.brier import BrierLM, BrierLMResult, brier_estimate, brier_lm, brier_score
from likelihood_free.energy import energy_loss, energy_score, mixture_energy_loss, mixture_energy_score
from likelihood_free.temperature import (
    BernoulliFactoryResult,
    TemperatureFallbackWarning,
    TemperatureSample,
    TemperatureSamplingExhausted,
    batched_temperature_sample,
    bernoulli_factory_power,
    temperature_sample,
)

__all__ = [
    "energy_score",
    "energy_loss",
    "mixture_energy_score",
    "mixture_energy_loss",
    "brier_score",
    "brier_estimate",
    "brier_lm",
    "BrierLM",
    "BrierLMResult",
    "temperature_sample",
    "batched_temperature_sample",
    "bernoulli_factory_power",
    "TemperatureSample",
    "BernoulliFactoryResult",
    "TemperatureSamplingExhausted",
    "TemperatureFallbackWarning",
]

try:  # the one place the version is written is pyproject.toml
    __version__ = _metadata.version("likelihood-free")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
