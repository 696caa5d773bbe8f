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


class ResourceError(LayerwiseError):
    """This machine lacks what the run needs: memory, disk space, a writable folder or the
    accelerator asked for."""


class PreflightError(ConfigError):
    """The checks before any MLflow run or training found problems; the message lists them
    all, each naming the setting and its fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} found "
                         "before any training or MLflow run started:\n"
                         + "\n".join(f"  - {p}" for p in problems))
