# Set-up, demo, tests and benchmarks. Every target sets up .venv first (fast when already done).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup real-data demo pretrain test lint bench ssl-quality clean figures

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/lvmmed demo --out outputs/demo

pretrain: setup
	$(PY) -m monai.bundle run --config_file bundles/lvmmed_pretrain/configs/train.yaml
	$(PY) -m monai.bundle run --config_file bundles/lvmmed_pretrain/configs/evaluate.yaml

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

real-data:
	@bash scripts/install_real_data.sh

ssl-quality: setup real-data
	$(PY) benchmarks/ssl_quality.py

bench: setup real-data
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf outputs .pytest_cache .ruff_cache

figures: setup
	$(PY) scripts/make_figures.py --out docs/figures
