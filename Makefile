# The two set-up commands are `make demo` and `make test` (see README.md).
# `make demo` ends on a real QEMU 10.0 where one is installed, else on the simulator.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck pytest docs golden bench qemu clean

$(STAMP): pyproject.toml requirements/dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -r requirements/dev.txt
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	@echo '$$ cprfsm check --qemu 10.0 --mode cpr-reboot --cap postcopy-ram'
	-@$(VENV)/bin/cprfsm check --qemu 10.0 --mode cpr-reboot --cap postcopy-ram
	@echo
	@echo '$$ cprfsm check --qemu 10.0 --mode cpr-reboot --device vfio'
	-@$(VENV)/bin/cprfsm check --qemu 10.0 --mode cpr-reboot --device vfio
	@echo
	@echo '$$ cprfsm check --qemu 10.0 --mode cpr-reboot --device vfio --runstate suspended'
	@$(VENV)/bin/cprfsm check --qemu 10.0 --mode cpr-reboot --device vfio --runstate suspended
	@echo
	@echo
	@echo '$$ cprfsm demo --backend auto --suspend --memory file,share=on --cap x-ignore-shared --ram 256M'
	@$(VENV)/bin/cprfsm demo --backend auto --suspend --memory file,share=on --cap x-ignore-shared --ram 256M

qemu:
	bash .ci/install-qemu

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/pytest -n 2

test: qemu lint typecheck
	CPRFSM_REQUIRE_QEMU=1 $(MAKE) pytest

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W -q -b html docs docs/_build/html

golden: $(STAMP)
	$(PY) -m tests.live.record --out tests/golden/qemu-10.0.2.csv --jobs 2

bench: $(STAMP)
	$(PY) bench/run.py
	$(PY) bench/bench_simulator.py
	$(PY) bench/bench_qmp.py

clean:
	rm -rf $(VENV) docs/_build .mypy_cache .ruff_cache .pytest_cache .hypothesis
