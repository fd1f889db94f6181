# The two commands of the README. Both create .venv if needed; torch and torchvision are installed first,
# pinned, with pip (local wheels on the AI Factory machines; uv/poetry would download GBs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# deduce pins regex<2025, transformers 5 needs regex>=2025.10.22: deduce goes in without its pins (its other
# dependencies come from pyproject). See the text recipe's deidentify.py (recipes/*/deidentify.py).
DEDUCE_PIN := deduce==3.0.6
DEMO_DIR ?= demo
DEMO_ARGS ?= trainer.max_epochs=4
# The demo trains the recipe `aift train` runs when none is named (configs/train.yaml's default).
DEMO_RECIPE ?= $(shell sed -n 's/^ *- recipe: *\([A-Za-z0-9_]*\).*/\1/p' configs/train.yaml)

.PHONY: demo test test-fast venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Installed marker: reinstall when the package metadata changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(DEDUCE_PIN)
	touch $@

venv: $(VENV)/.installed

## demo: set up, make demo data, train the default recipe on CPU, show the results and how to open MLflow
demo: venv
	@mkdir -p $(DEMO_DIR)
	cd $(DEMO_DIR) && ../$(BIN)/aift data synth $(DEMO_RECIPE) --out data/$(DEMO_RECIPE) --overwrite
	cd $(DEMO_DIR) && ../$(BIN)/aift train recipe=$(DEMO_RECIPE) $(DEMO_ARGS) hydra.run.dir=outputs/demo \
		trainer.enable_progress_bar=false
	@$(BIN)/python -m aifactory_train.commands.show_summary $(DEMO_DIR)/outputs/demo/summary.json
	@echo "Open the MLflow UI:  cd $(DEMO_DIR) && ../$(BIN)/mlflow ui   (then http://127.0.0.1:5000)"

SLURM_DIR ?= /tmp/aift-slurm
# Two test files at a time (pytest-xdist; a file's tests stay on one worker, in order, sharing its fixtures). Most
# tests run `aift` in a subprocess whose start-up (imports, the MLflow store) keeps one core busy; two at a time
# took the suite from 24 to 18 minutes on 2 cores. `make test PYTEST_PARALLEL=` runs them one by one.
PYTEST_PARALLEL ?= -n 2 --dist loadfile
# One torch/OpenMP thread per test process: with two workers, each process's default of one thread per core puts
# 4+ spinning threads on 2 cores. Measured on 2 cores (test_bench.py + test_strategies.py, -n 2): 217 s -> 156 s;
# the CPU acceptance run in them 184 s -> 79 s. `make test TEST_THREADS=` keeps torch's default.
TEST_THREADS ?= 1

## test: set up (with dev extras), start a local Slurm cluster (slurm/local_cluster.sh: apt-get installs slurm-wlm,
## slurmdbd, munge and mariadb-server if missing; its tests are skipped, with the reason, if it cannot start), run the
## test suite, stop the cluster
test: venv
	@bash slurm/local_cluster.sh start $(SLURM_DIR) || echo "warning: no local Slurm cluster; its tests will be skipped"
	SLURM_CONF=$(SLURM_DIR)/slurm.conf $(if $(TEST_THREADS),OMP_NUM_THREADS=$(TEST_THREADS)) \
		$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) --durations=20; status=$$?; \
		bash slurm/local_cluster.sh stop $(SLURM_DIR) >/dev/null 2>&1; exit $$status

## test-fast: the fast tier only (no `aift` processes, no training, no Slurm; tests/conftest.py says what counts as
## end-to-end): feedback in under two minutes while you work. `make test` runs everything and is what CI runs.
test-fast: venv
	$(if $(TEST_THREADS),OMP_NUM_THREADS=$(TEST_THREADS)) $(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not e2e" \
		--durations=10

clean:
	rm -rf $(DEMO_DIR) outputs multirun mlruns mlflow.db
