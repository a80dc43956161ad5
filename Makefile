# Set-up, demo, tests and benchmarks. Every target sets up .venv first (fast when already done).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup real-data demo pretrain test lint bench ssl-quality clean figures

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/lvmmed demo --out outputs/demo

# real MR: Colin27 / INIA19 slices to pretrain on, AAL lobe patches from disjoint slices to probe (docs/ssl.md)
MR_DATA ?= outputs/mr_data
pretrain: setup real-data
	$(VENV)/bin/lvmmed mr-data --out $(MR_DATA)
	$(PY) -m monai.bundle run --config_file bundles/lvmmed_pretrain/configs/train.yaml \
		--data $(MR_DATA)/unlabelled --probe_data $(MR_DATA)/regions --image_size 64 --max_epochs 12
	$(PY) -m monai.bundle run --config_file bundles/lvmmed_pretrain/configs/evaluate.yaml \
		--data $(MR_DATA)/regions --image_size 64

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
