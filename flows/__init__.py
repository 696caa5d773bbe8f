"""Prefect flows (the pipeline) and the ``layerwise`` command line."""
