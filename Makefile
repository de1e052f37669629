# The two commands of the README. Each sets up .venv from nothing if needed.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
# torch is pinned for the install so a CPU machine does not pull several GB of CUDA builds;
# a working torch already in the venv is kept as it is.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.lyfast-installed

.PHONY: test bench venv clean

$(VPY):
	$(PY) -m venv $(VENV)

$(STAMP): $(VPY) pyproject.toml setup.py
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest tests

bench: $(STAMP)
	$(VPY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
