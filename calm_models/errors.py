"""The base of every one-line error of :mod:`calm_models`.

A bad config, data file, checkpoint, run directory or conversion raises a subclass of :class:`CalmError` whose
message is one line naming the field or file: :class:`~calm_models.config.ConfigError`,
:class:`~calm_models.data.DataError`, :class:`~calm_models.checkpoint.CheckpointError`,
:class:`~calm_models.runs.RunError`, :class:`~calm_models.train.TrainError` and
:class:`~calm_models.convert.ConversionError`. Each also derives from the built-in it used to be (``ValueError`` or
``RuntimeError``), so existing handlers keep working.

Example:
    >>> from calm_models.config import ConfigError, TrainConfig, load_config
    >>> try:
    ...     load_config(TrainConfig, overrides=["run.steps=0"])
    ... except CalmError as exc:
    ...     print(type(exc).__name__, isinstance(exc, ValueError), exc)
    ConfigError True run: steps must be an int >= 1, got 0
"""


class CalmError(Exception):
    """A problem with what the user gave (config, file, checkpoint, run), stated in one line."""
