"""The project's own error types. Each message names what is wrong and how to fix it."""


class LayerwiseError(Exception):
    """Base class: the CLI prints these as one actionable line and exits non-zero."""


class ConfigError(LayerwiseError):
    """A configuration value is invalid; raised before any work or MLflow run starts."""


class DataError(LayerwiseError):
    """Input data is missing, corrupt or malformed."""


class CheckpointError(LayerwiseError):
    """A checkpoint is missing, or its content does not match its recorded digest."""


class DivergenceError(LayerwiseError):
    """Training produced a NaN or infinite loss."""


class TrackingError(LayerwiseError):
    """The MLflow or Prefect server cannot be reached or refused a write."""
