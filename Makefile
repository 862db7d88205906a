# Every target installs what it needs into .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev,plot,tensorboard]'
	$(BIN)/python -m bnfix.default_checkpoint
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: install
	$(BIN)/bnfix demo

bench: install
	$(BIN)/python benchmarks/scan_overhead.py --arch resnet18 --input 3x224x224
	$(BIN)/python benchmarks/scan_overhead.py --arch mobilenet_v2 --input 1x1024x128 --batches 4 --batch-size 8
	$(BIN)/python benchmarks/abri_step.py --threads 1 --clock cpu
	$(BIN)/python benchmarks/fusion_data.py --threads 1
	$(BIN)/python benchmarks/fusion_scale.py --quick
	$(BIN)/python benchmarks/manifest_scale.py --sizes 10000,50000

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
