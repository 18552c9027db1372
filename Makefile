# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: setup
	$(BIN)/python -m jobs.demo --config conf/demo.yaml

test: setup
	$(BIN)/python -m pytest -q --timeout=900

bench: setup
	$(BIN)/python benchmarks/decode_speed.py --out benchmarks/results/decode_speed.json

clean:
	rm -rf $(VENV) outputs
