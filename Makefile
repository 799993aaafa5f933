# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CORE   := $(VENV)/.installed-core
FULL   := $(VENV)/.installed-full

.PHONY: demo test install bench clean

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

# A throwaway PostGIS (infra/postgis.sh) for the store tests, stopped again whatever happens.
# If it cannot start, the PostGIS tests skip locally and fail under CI=true.
test: $(FULL)
	@pgdir=$$(mktemp -d); trap 'infra/postgis.sh stop "$$pgdir" >/dev/null 2>&1 || rm -rf "$$pgdir"' EXIT; \
	if pgenv=$$(PYTHON=$(abspath $(PY)) infra/postgis.sh start --fast "$$pgdir"); then eval "$$pgenv"; \
	else export CRACKMAP_PG_UNAVAILABLE="infra/postgis.sh start failed (see above)"; fi; \
	$(PY) -m pytest

bench: $(FULL)
	$(PY) benchmarks/pipeline_throughput.py

clean:
	rm -rf $(VENV) out .pytest_cache
