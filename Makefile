# The two commands of the README. PYTHON may point at a virtual environment's interpreter.
PYTHON ?= python3
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: install quickstart test test-all

install:
	$(PYTHON) -m pip install $(PIP_FLAGS) -e ".[test]"

# Train the default autoencoder on the embedded digits (offline, CPU, a few minutes).
quickstart: install
	$(PYTHON) -m lightning_ldm stage=autoencoder run_name=quickstart

# The test suite that CI runs (.ci/run); slow end-to-end checks are marked and run by `make test-all`.
test: install
	$(PYTHON) -m pytest -n 2 --dist loadfile -m "not slow" tests

test-all: install
	$(PYTHON) -m pytest -n 2 --dist loadfile tests
