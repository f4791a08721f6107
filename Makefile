# Set-up and everyday entry points. `make run` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint system-deps clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: install, then label the bundled sample frames with Grad-CAM overlays (shipped checkpoint)
run: $(STAMP)
	$(BIN)/steelsight predict deploy/samples/*/*.bmp --cam-out runs/demo-overlays

## system-deps: Debian packages the tests use (needs root or sudo)
system-deps:
	./deploy/install-system-deps.sh

## test: install everything, then run the whole test suite
test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
