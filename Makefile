# sclip-lightning: `make install` then `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install test test-slow lint format typecheck demo bench bench-shards bench-memory real-benchmark real-benchmark-finetune clean

install:  ## create .venv and install the package with dev + offline extras
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -e ".[dev,offline]"
	@$(PYTHON) -c "import sclip_lightning, lightning, open_clip, ot; print('sclip_lightning', sclip_lightning.__version__, 'installed')"

test:  ## the CI suite (CPU, tiny random-weight models, no network)
	$(PYTHON) -m pytest -q

test-slow:  ## slower CPU tests and real-data tests (needs ../shared/data)
	$(PYTHON) -m pytest -q -m "slow or realdata"

lint:
	$(BIN)/ruff check src tests bench notebooks/*.py
	$(BIN)/ruff format --check src tests bench notebooks/*.py

format:
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

typecheck:
	$(BIN)/mypy

demo:  ## CLIP vs S-CLIP (paper) vs S-CLIP (bank of all pairs + unbalanced OT) on the embedded synthetic domain
	$(PYTHON) -m sclip_lightning.demo --seeds $(or $(SEEDS),0 1 2) --methods $(or $(METHODS),clip sclip sclip-bank-uot) --out outputs/demo

bench:  ## loss and training-step benchmarks (ratios against baselines in the same run)
	$(PYTHON) bench/loss.py
	$(PYTHON) bench/step.py
	@if [ -f ../shared/data/rsicd-mini/dataset_rsicd.json ]; then $(PYTHON) bench/data.py; else echo "bench/data.py skipped: ../shared/data/rsicd-mini not found"; fi

bench-shards:  ## WebDataset shard loader vs folder loader, 100k synthetic images (written once)
	$(PYTHON) bench/shards.py --batches 100 --out docs/shards.json

bench-memory:  ## peak RSS of retrieval evaluation, 50k images x 250k captions, 1 process and 2 DDP ranks
	$(PYTHON) bench/retrieval_memory.py --ranks 1 2 --dim 128

real-benchmark:  ## rsicd-mini, offline towers locked + cached, through sclip fit/test: 7 methods, grid on val, 3 seeds on test
	$(PYTHON) bench/real_benchmark.py --out docs

real-benchmark-finetune:  ## rsicd-mini, image tower's top blocks unlocked (cached below them): CLIP vs S-CLIP with/without bank
	$(PYTHON) bench/real_benchmark.py --protocol finetune --steps 500 --lrs 3e-4 1e-4 --out docs

clean:
	rm -rf outputs lightning_logs .pytest_cache .ruff_cache .mypy_cache
