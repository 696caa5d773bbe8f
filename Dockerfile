# syntax=docker/dockerfile:1
# The layerwise image: the project with the versions constraints.txt pins, run as a
# non-root user. docker-compose.yml runs the Prefect server, the MLflow server, the
# deployment registration and the worker from this one image, so servers and client always
# agree on versions. torch from PyPI brings its CUDA libraries: the same image uses the GPUs
# when the container is given them (the compose `gpu` profile) and the CPU otherwise.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    LAYERWISE_APP_DIR=/app \
    LAYERWISE_HOME=/var/lib/layerwise/home \
    LAYERWISE_DATA_DIR=/var/lib/layerwise/data

# The volume mount points exist and belong to the runtime user, so fresh named volumes
# start out writable by it.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin layerwise \
 && mkdir -p /app /var/lib/layerwise/home /var/lib/layerwise/data \
             /var/lib/mlflow/artifacts /var/lib/mlflow/auth \
 && chown -R layerwise:layerwise /var/lib/layerwise /var/lib/mlflow

WORKDIR /app

# Dependencies first, from the metadata and the pins alone (empty packages stand in for the
# code), so that a code change rebuilds only the last two layers.
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir flows tasks models \
 && touch flows/__init__.py tasks/__init__.py models/__init__.py \
 && pip install -c constraints.txt . \
 && pip uninstall -y layerwise \
 && rm -rf flows tasks models build ./*.egg-info

COPY . .
RUN pip install --no-deps -c constraints.txt . \
 && rm -rf build ./*.egg-info

USER layerwise
# The flow code (flows/pipeline.py) and prefect.yaml stay in /app: prefect.yaml's pull step
# sets the flow runs' working directory to $LAYERWISE_APP_DIR.
CMD ["layerwise", "--help"]
