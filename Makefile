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

# Two xdist workers: the suite in ~5.5 min instead of ~8 on 2 cores, and a test that crashes the interpreter
# (a segfault in a native kernel) is reported as failed while a new worker runs the rest.
test: $(STAMP)
	$(VPY) -m pytest tests -n 2

bench: $(STAMP)
	$(VPY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
