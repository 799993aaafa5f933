# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[torch,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -f out/demo/cracks.gpkg
	$(VENV)/bin/crackmap run examples/sample-survey --store out/demo/cracks.gpkg --survey sample-survey
	@echo "Crack map: out/demo/cracks.gpkg (layers cracks, scenes); probability rasters: out/demo/cracks-probability/"

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/pipeline_throughput.py

clean:
	rm -rf $(VENV) out .pytest_cache
