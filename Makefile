# qapruner: every target sets itself up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo train bench-accuracy bench-quota export export-quota compare engines bench clean

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

# QUOTA vs stage-wise pruning at average budgets of 30% and 12.5% (docs/results/quota{,-b0.125}.{json,md}); the
# 3-layer embedded decoder can only prune at layer 2, so everything in-LLM starts from QAPruner's pre-LLM cut
# (--pre auto: 40% and 16.7%).
bench-quota: setup
	$(PY) -m qapruner.quota evaluate --model models/digits-llava --scheme w4a4 --weights gptq --budget 0.30 \
	  --pre auto --questions 200 --calib-seeds 3 --kv-bits 4 8 --out docs/results/quota.json
	$(PY) -m qapruner.quota evaluate --model models/digits-llava --scheme w4a4 --weights gptq --budget 0.125 \
	  --pre auto --questions 200 --calib-seeds 3 --kv-bits 4 8 --out docs/results/quota-b0.125.json

# The exported artifacts of the embedded model at 12.5% retention (K = 32 of 256), one per deployable precision.
EXPORT := $(PY) -m export --model models/digits-llava --retention 0.125 --force
export: setup
	$(EXPORT) --out engines/digits-r0.125-fp32
	$(EXPORT) --out engines/digits-r0.125-text-fp32 --semantic text
	$(EXPORT) --out engines/digits-r0.125-fp16 --vision fp16 --llm fp16
	$(EXPORT) --out engines/digits-r0.125-w4a16 --llm w4a16
	$(EXPORT) --out engines/digits-r0.125-w4a8 --llm w4a8
	$(EXPORT) --out engines/digits-r0.125-int8-w8a8 --vision int8 --llm w8a8
	$(EXPORT) --out engines/digits-r0.125-int8-w8a8-fullcalib --vision int8 --llm w8a8 --calib-tokens full
	$(MAKE) export-quota

# QUOTA: a recipe calibrated under simulated W4A4 with a 4-bit KV cache at an average budget of 30% of the visual
# tokens per decoder layer, baked into the LLM (llm_prefill.onnx + llm.onnx); K = the recipe's V0.
RECIPE := build/recipes/digits-w4a4-kv4-b0.30.json
export-quota: setup
	mkdir -p build/recipes
	$(PY) -m qapruner.quota calibrate --model models/digits-llava --scheme w4a4 --kv-bits 4 --budget 0.30 \
	  --pre auto --calibration calibration_data --calib-limit 16 --out $(RECIPE)
	$(PY) -m export --model models/digits-llava --recipe $(RECIPE) --llm w4a16 --force --out engines/digits-quota-b0.30-w4a16
	$(PY) -m export --model models/digits-llava --recipe $(RECIPE) --llm w4a8 --force --out engines/digits-quota-b0.30-w4a8

# torch vs ONNX Runtime (polygraphy) for each artifact: docs/results/parity.{json,md}, JSON reports in build/compare/;
# answers through the slim runtime on the engines built for this machine.
compare: export
	$(PY) -m engines.build
	$(PY) -m export.compare engines/digits-r0.125-fp32 engines/digits-r0.125-text-fp32 engines/digits-r0.125-fp16 \
	  engines/digits-r0.125-w4a16 engines/digits-r0.125-w4a8 engines/digits-r0.125-int8-w8a8 \
	  engines/digits-r0.125-int8-w8a8-fullcalib engines/digits-quota-b0.30-w4a16 engines/digits-quota-b0.30-w4a8 \
	  --questions 200 --out docs/results/parity.json

# Engines for every exported engines/NAME/: TensorRT plans where TensorRT and a GPU exist, else ORT CPU models.
engines: setup
	$(PY) -m engines.build

# Speed and memory (docs/results/speed.{md,json}): prefill vs retention, score+prune cost, runtime vs transformers,
# decode tokens/s; the embedded model and a LLaVA-1.5-shaped random one. Run it on an otherwise idle machine.
bench: setup
	$(PY) -m engines.bench --out docs/results/speed.json

clean:
	rm -rf build .pytest_cache
