# qapruner: every target sets itself up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo train bench-accuracy clean

setup: $(STAMP)

# torch==2.13.0 is the CPU wheel on this machine's disk; pins live in requirements.txt.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(PY) -m pytest

demo: setup
	$(PY) -m qapruner.demo

# Reproduces models/digits-llava from scratch (≈1 h on 2 CPU cores) and docs/results/training.md.
train: setup
	$(PY) -m qapruner.train --out models/digits-llava --report docs/results/training.md

# The paper's experiments on the embedded model: docs/results/accuracy.{json,md,png} and the alpha sweep.
bench-accuracy: setup
	$(PY) -m qapruner.evaluate --model models/digits-llava --questions 200 --calib-seeds 3 \
	  --semantic cls text --act dynamic static --out docs/results/accuracy.json
	$(PY) -m qapruner.evaluate --model models/digits-llava --questions 200 --calib-seeds 3 \
	  --methods w4a4-qapruner --retention 0.125 --alpha 0 0.1 0.3 0.5 0.7 0.9 1 \
	  --semantic cls --act dynamic --out docs/results/alpha-sweep.json

clean:
	rm -rf build .pytest_cache
