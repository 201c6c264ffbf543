# The two commands of the README. PYTHON may point at a virtual environment's interpreter.
PYTHON ?= python3
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: install quickstart test test-all

install:
	$(PYTHON) -m pip install $(PIP_FLAGS) -e ".[test]"

# Both stages on the embedded digits, then samples (offline, on a CPU: about 2 + 8 + 0.5 minutes on 2 cores).
# Rerunning resumes the same runs (run_name=quickstart), so it finishes at once when nothing is left to do.
quickstart: install
	$(PYTHON) -m lightning_ldm stage=autoencoder run_name=quickstart
	$(PYTHON) -m lightning_ldm stage=diffusion run_name=quickstart
	$(PYTHON) -m lightning_ldm stage=sample run_name=quickstart

# The test suite that CI runs (.ci/run); slow end-to-end checks are marked and run by `make test-all`.
test: install
	$(PYTHON) -m pytest -n 2 --dist loadfile -m "not slow" tests

test-all: install
	$(PYTHON) -m pytest -n 2 --dist loadfile tests
