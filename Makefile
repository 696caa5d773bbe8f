# One entry point. Every target creates the virtual environment it needs when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PRESET ?= default
ARGS   ?=

.PHONY: ablate install run quick test test-slow test-integration test-all bench lock ui clean deploy screenshots

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)            ## the main job on the embedded defaults (make run PRESET=quick)
	$(VENV)/bin/layerwise run --preset $(PRESET) $(ARGS)

quick: $(STAMP)
	$(VENV)/bin/layerwise run --preset quick $(ARGS)

test: $(STAMP)           ## the fast, offline suite (what CI runs)
	$(VENV)/bin/pytest -q $(ARGS)

test-integration: $(STAMP)  ## only the server tests (Prefect + MLflow on the local PostgreSQL)
	$(VENV)/bin/pytest -q -m integration $(ARGS)

test-slow: $(STAMP)      ## only the heavier tests marked slow
	$(VENV)/bin/pytest -q -m slow $(ARGS)

test-all: $(STAMP)
	$(VENV)/bin/pytest -q -m "" $(ARGS)

GRID ?= erhan-small
ablate: $(STAMP)         ## pretraining-vs-random ablation (make ablate GRID=tiny ARGS="--workers 2")
	$(VENV)/bin/layerwise ablate --preset $(GRID) $(ARGS)

bench: $(STAMP)          ## measured comparisons, not tests: benchmarks/results/<machine>.json
	$(PY) -m benchmarks $(ARGS)

# The flow runs' environment (prefect.yaml's job variables), resolved now: this checkout,
# its mlruns/ and data/ unless set; MLFLOW_TRACKING_URI and PREFECT_API_URL must be set.
# The pool is created when missing; a worker that created it meanwhile is no failure.
deploy: export LAYERWISE_APP_DIR ?= $(CURDIR)
deploy: export LAYERWISE_HOME ?= $(or $(XDG_DATA_HOME),$(HOME)/.local/share)/layerwise
deploy: export LAYERWISE_DATA_DIR ?= $(CURDIR)/data
deploy: $(STAMP)         ## register prefect.yaml on $$PREFECT_API_URL, creating the work pool if missing
	@test -n "$$PREFECT_API_URL" || { echo "error: set PREFECT_API_URL (the Prefect server's API, e.g. http://127.0.0.1:4200/api)" >&2; exit 2; }
	@test -n "$$MLFLOW_TRACKING_URI" || { echo "error: set MLFLOW_TRACKING_URI (the MLflow server the flow runs record to, e.g. http://127.0.0.1:5000)" >&2; exit 2; }
	$(VENV)/bin/prefect work-pool inspect layerwise > /dev/null 2>&1 || $(VENV)/bin/prefect work-pool create layerwise --type process || $(VENV)/bin/prefect work-pool inspect layerwise > /dev/null
	$(VENV)/bin/prefect --no-prompt deploy --all

OUT ?= screenshots
screenshots: $(STAMP)    ## MLflow and Prefect UI pages of one small run, in headless Chromium (OUT=folder)
	$(PY) docs/screenshots.py --out $(OUT)

ui: $(STAMP)             ## browse the embedded MLflow store
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --port 5000

lock: $(STAMP)           ## refresh constraints.txt from the current environment
	(echo "# Pinned versions of every dependency (pip constraints). Regenerate with: make lock"; \
	 $(VENV)/bin/pip freeze --exclude-editable | grep -v '^layerwise') > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
