# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CORE   := $(VENV)/.installed-core
FULL   := $(VENV)/.installed-full

.PHONY: demo test lint install bench clean maplibre

# The demo needs only the core (ONNX Runtime runs the model); tests also need
# torch (export, training, the torch backend) and the test tools.
$(CORE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(CORE)

$(FULL): $(CORE)
	$(PY) -m pip install --quiet -e '.[torch,dev]'
	touch $(FULL)

install: $(FULL)

demo: $(CORE)
	rm -f out/demo/cracks.gpkg
	$(VENV)/bin/crackmap run examples/sample-survey --store out/demo/cracks.gpkg --survey sample-survey
	$(VENV)/bin/crackmap sections out/demo/cracks.gpkg --network examples/sample-roads.geojson \
		--survey sample-survey --section-m 1 --rollup-m 5
	@echo "Crack map: out/demo/cracks.gpkg (layers cracks, scenes, sections, pattern_areas); probability rasters: out/demo/cracks-probability/"
	@echo "See it in a browser: $(VENV)/bin/crackmap serve out/demo/cracks.gpkg  (then http://127.0.0.1:8080/)"

# A throwaway PostGIS (infra/postgis.sh) for the store tests, stopped again whatever happens, and
# Debian's chromium (infra/chromium.sh) for the web-map browser test.  If either cannot be had,
# its tests skip locally and fail under CI=true.
test: $(FULL)
	@pgdir=$$(mktemp -d); trap 'infra/postgis.sh stop "$$pgdir" >/dev/null 2>&1 || rm -rf "$$pgdir"' EXIT; \
	if pgenv=$$(PYTHON=$(abspath $(PY)) infra/postgis.sh start --fast "$$pgdir"); then eval "$$pgenv"; \
	else export CRACKMAP_PG_UNAVAILABLE="infra/postgis.sh start failed (see above)"; fi; \
	infra/chromium.sh || export CRACKMAP_CHROMIUM_UNAVAILABLE="infra/chromium.sh failed (see above)"; \
	$(PY) -m pytest

# Static checks of pipeline/ and models/ (mypy: [tool.mypy] in pyproject.toml); CI runs it before the tests.
lint: $(FULL)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy

bench: $(FULL)
	$(PY) benchmarks/pipeline_throughput.py

# Refresh the vendored MapLibre GL JS from npm: make maplibre [MAPLIBRE_VERSION=5.24.1]
maplibre:
	infra/vendor-maplibre.sh $(MAPLIBRE_VERSION)

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache
