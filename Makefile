# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CACHE := $(CURDIR)/.cache
# Persistent caches so JIT builds (DeepSpeed ops, inductor) are paid once per checkout.
export TORCH_EXTENSIONS_DIR := $(CACHE)/torch_extensions
export TORCHINDUCTOR_CACHE_DIR := $(CACHE)/inductor
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline

.PHONY: install browser demo compare test bench clean

install: $(STAMP) browser

# CPU torch first (a local wheel), then the project pinned by constraints-cpu.txt,
# so pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[test]'
	touch $(STAMP)

# Debian's chromium + chromedriver for the web page test (tests/serving/test_web.py), when missing;
# selenium (the `test` extra) drives them. Needs root (apt-get); never downloads a browser of its own.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "make: installing chromium and chromium-driver (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "make: /usr/bin/chromium or chromedriver missing: run 'sudo apt-get install chromium chromium-driver' (the web page test needs them)"; \
	  fi; \
	fi

# The main job: prepare the skill data (once), train the tiny model from scratch with Ray Train
# + DeepSpeed ZeRO-2 on 2 CPU workers, evaluate it, print the table. A fresh run every time.
demo: $(STAMP)
	rm -rf runs/train/tiny
	$(VENV)/bin/ms-ray train jobs/tiny.yaml

# Multi-stream vs a single-stream baseline of the same size, same examples and budget: both
# trained, scored on held-out tasks, report + plots in runs/compare/tiny (~25 min on 2 cores).
compare: $(STAMP)
	rm -rf runs/compare/tiny
	$(VENV)/bin/ms-ray compare jobs/compare-tiny.yaml

# Everything, slow scenarios included (plain `pytest` runs only the fast part).
test: $(STAMP) browser
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) $(CACHE) .pytest_cache
