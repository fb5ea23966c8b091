# Two commands do all the set-up on a fresh machine:
#   make demo   creates/updates .venv and runs the whole story on ELPV
#   make test   creates/updates .venv and runs every test (CI runs exactly this)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[train,export,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edge-tl demo

# Training tests and export tests run in two processes: a process that has quantized with
# NNCF/OpenVINO and then trains with torch crashed (segfault) in long test sessions.
TRAIN_TESTS := tests/test_train.py tests/test_backbones.py tests/test_data.py tests/test_heads.py
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(TRAIN_TESTS)
	$(VENV)/bin/python -m pytest -q tests $(addprefix --ignore=,$(TRAIN_TESTS))

lint: $(STAMP)
	$(VENV)/bin/ruff check edge_tl tests benchmarks
	$(VENV)/bin/ruff format --check edge_tl tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) demo-output build *.egg-info
