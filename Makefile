# Two set-up commands for a fresh machine (see README.md):
#   make demo   - creates .venv, installs the project, pretrains DINO on CvT on the embedded digits
#   make test   - creates .venv, installs the project with its dev tools, runs ruff and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench bench-quality clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		pretrain.py --objective dino --backbone cvt

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

# The quick tier: a few presets of every sweep, the loss parity tests and one end-to-end run.
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m fast

# Benchmarks run in their own environment with the peers (vit-pytorch, lightly) installed.
.venv-bench/.installed: $(STAMP) benchmarks/requirements.txt
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	echo "$(abspath $(VENV))/lib/$$($(PY) -c 'import sys;print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages" \
		> "$$(.venv-bench/bin/python -c 'import site;print(site.getsitepackages()[0])')/_project_venv.pth"
	.venv-bench/bin/python -m pip install -q -r benchmarks/requirements.txt
	touch $@

bench: .venv-bench/.installed
	for f in benchmarks/bench_*.py; do [ $$f = benchmarks/bench_quality.py ] && continue; \
		.venv-bench/bin/python -m benchmarks.$$(basename $$f .py) || exit 1; done

# Learning quality at a fixed wall-clock budget: all objectives, both data sets, 300 s per run (add --peers by hand).
bench-quality: .venv-bench/.installed
	.venv-bench/bin/python -m benchmarks.bench_quality

clean:
	rm -rf $(VENV) .venv-bench build *.egg-info
