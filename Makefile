# The two commands of the README. PYTHON may point at a virtual environment's interpreter.
PYTHON ?= python3
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: install quickstart quickstart-text test test-all test-latest lock

# The package, its extras and the test tools, at the versions the test suite passed with (constraints.txt).
install:
	$(PYTHON) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[test]"

# Both stages on the embedded digits, then samples (offline, on a CPU: about 5 minutes on 2 cores).
# Rerunning resumes the same runs (run_name=quickstart), so it finishes at once when nothing is left to do.
quickstart: install
	$(PYTHON) -m lightning_ldm stage=autoencoder run_name=quickstart
	$(PYTHON) -m lightning_ldm stage=diffusion run_name=quickstart
	$(PYTHON) -m lightning_ldm stage=sample run_name=quickstart

# Text to image on captioned digit scenes, on a CPU (about 11 minutes on 2 cores): stage 1, stage 2, then samples
# of prompts that state size, colour and digit as the training captions do.
quickstart-text: install
	$(PYTHON) -m lightning_ldm experiment=txt2img-digits-cpu-autoencoder run_name=quickstart-text
	$(PYTHON) -m lightning_ldm experiment=txt2img-digits-cpu run_name=quickstart-text
	$(PYTHON) -m lightning_ldm stage=sample run_name=quickstart-text sample.guidance_scale=3 sample.num_samples=16 \
	  sample.prompts='["a large red 3","a small blue 7","a large green 1","a small white 0","a large yellow 5","a large magenta 9"]'

# The test suite that CI runs (.ci/run); slow end-to-end checks are marked and run by `make test-all`.
test: install
	$(PYTHON) -m pytest -n 2 --dist loadfile -m "not slow" tests

test-all: install
	$(PYTHON) -m pytest -n 2 --dist loadfile tests

# The suite against the newest releases that pyproject.toml's ranges admit, in a virtual environment of its own
# (.venv-latest): what a user gets with `pip install lightning_ldm` today. Passing here is what lets `make lock`
# move constraints.txt forward.
LATEST_VENV ?= .venv-latest
test-latest:
	rm -rf $(LATEST_VENV) && $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install $(PIP_FLAGS) --upgrade --upgrade-strategy eager -e ".[test]"
	$(LATEST_VENV)/bin/python -m pip list --format=freeze
	$(LATEST_VENV)/bin/python -m pytest -n 2 --dist loadfile -m "not slow" tests

# Rewrite constraints.txt from an environment in which the suite passed (default: the test-latest one).
lock:
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable --exclude lightning_ldm | sort -f > constraints.txt
