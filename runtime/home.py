"""Where the embedded stores, checkpoints and cached stages live."""

from __future__ import annotations

import os
from pathlib import Path


def layerwise_home() -> Path:
    """Where the embedded stores, checkpoints and cached stages live.

    ``$LAYERWISE_HOME`` when set; else, in a flow run that a Prefect worker or runner
    started in its own process (``PREFECT__FLOW_RUN_ID`` set; a worker's runs start in the
    checkout, ``prefect.yaml``'s pull step), the user's data directory
    (``user_data_home()``), never the code directory; else ``./mlruns`` of the current
    directory, as for MLflow's own ``./mlruns`` (``layerwise run``, ``make run``).
    """
    if os.environ.get("LAYERWISE_HOME"):
        return Path(os.environ["LAYERWISE_HOME"]).expanduser().resolve()
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        return user_data_home()
    return Path("mlruns").resolve()


def user_data_home() -> Path:
    """``$XDG_DATA_HOME/layerwise``, by default ``~/.local/share/layerwise`` (the XDG base
    directory for a user's data, where ``make deploy`` puts a worker's stores too)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return (Path(base) / "layerwise").resolve()
