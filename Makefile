# Set-up and the two everyday commands. `make demo` and `make test` set up as needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: setup demo test test-all clean browser

setup: $(VENV)/.installed

# ONNX Runtime: the `gpu` extra (onnxruntime-gpu) where an NVIDIA driver is, else `cpu`
# (onnxruntime); the two packages must not be installed together.
ORT_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

# torch first: the CPU build where there is no NVIDIA driver (a plain `torch` pulls a
# multi-GB CUDA build); a local wheel of torch 2.13.0 is used where pip can find one.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch; \
	else \
		$(PY) -m pip install -q --no-index torch==2.13.0 2>/dev/null || \
		$(PY) -m pip install -q --retries 1 torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e ".[dev,$(ORT_EXTRA)]"
	touch $@

demo: setup
	$(VENV)/bin/vrn-reconstruct --sample -o $(OUT) --formats obj,html --preview

# `make test`: ruff, then every test not marked slow (under 5 minutes on 2 cores). CI (the
# CI variable set, as .ci/run does) and `make test-all` run every test.
PYTEST_MARKS := $(if $(CI),,-m "not slow")

test: setup browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_MARKS)

test-all: setup browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# Chromium and chromedriver for the browser tests (tests/test_viewer.py, test_web.py),
# from Debian's packages where apt-get and root are at hand; elsewhere those tests skip.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and chromium-driver (apt-get) for the browser tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver >/dev/null; } \
		|| echo "note: chromium could not be installed; the browser tests will skip"; \
	else \
		echo "note: no chromium, and no root apt-get to install it: the browser tests will skip"; \
	fi

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
