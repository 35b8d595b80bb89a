# One-command entry points. Each target creates/updates its virtual environment.
#   make demo   - train a small Llama on the Python standard library (CPU, < 10 min)
#   make test   - core + peer environments, then the whole test suite
#   make bench  - every benchmark (jaxml against its peer in the same run; `name: value` lines)
PY ?= python3
VENV := .venv
PEER := .venv-peer
PYTEST_ARGS ?= -n 2 --dist loadgroup -q tests

.PHONY: venv peer test demo bench clean

$(VENV)/.installed: setup.cfg pyproject.toml requirements/constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c requirements/constraints.txt -e '.[test]'
	touch $@

$(PEER)/.installed: requirements/peer.txt
	$(PY) -m venv $(PEER)
	$(PEER)/bin/pip install -q --upgrade pip
	$(PEER)/bin/pip install -q torch==2.13.0
	$(PEER)/bin/pip install -q -r requirements/peer.txt
	$(PEER)/bin/pip install -q --no-deps recbole==1.2.1  # metric functions only (tests/peer_scripts/recbole_metrics.py)
	# jurity needs pandas < 3: both in their own folder (requirements/peer.txt, tests/peer_scripts/jurity_ctr.py)
	$(PEER)/bin/pip install -q --no-deps --target $(PEER)/jurity-pandas2 jurity==2.1.0 pandas==2.3.3 pytz==2026.6
	touch $@

venv: $(VENV)/.installed
peer: $(PEER)/.installed

test: venv peer
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

BENCHES ?= llama_bench ctr_bench diffusion_bench causal_bench

bench: venv peer
	for b in $(BENCHES); do echo "== $$b"; $(VENV)/bin/python -m benchmarks.$$b || exit 1; done

demo: venv
	$(VENV)/bin/python -m experiments.llama_lm --workdir=workdirs/llama_lm

clean:
	rm -rf $(VENV) $(PEER)
