# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup demo test bench quality clean

# the venv, then the wallpaper photos (apt-get download + dpkg-deb -x, ~100 MB) and the offline VAEs fitted
# on them, cached under ~/.cache/infgen (INFGEN_CACHE): each is a no-op once done. The tests use both VAEs;
# the demo and the quality benchmark only `photo`, so they skip the `tiny` fit
setup: $(STAMP)
	$(BIN)/infgen setup

# constraints.txt: the versions the suite last passed with (pyproject.toml keeps the ranges users install)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/infgen setup photo
	$(BIN)/python -m jobs.demo --config conf/demo.yaml

test: setup
	$(BIN)/python -m pytest -q --timeout=900 --durations=12

bench: setup
	$(BIN)/python benchmarks/decode_speed.py --out benchmarks/results/decode_speed.json

quality: $(STAMP)
	$(BIN)/infgen setup photo
	$(BIN)/python benchmarks/quality.py --out benchmarks/results/quality.json --figure docs/quality_4x.jpg

clean:
	rm -rf $(VENV) outputs
