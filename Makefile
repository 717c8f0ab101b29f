# The two commands a newcomer needs: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export SDL_VIDEODRIVER ?= dummy

.PHONY: venv demo test lint data clean

# torch==2.13.0 goes in first: it is the CPU build available locally, and installing it before the
# project stops any requirement from pulling a multi-GB CUDA build.
$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,sumo,marl]"
	# TensorBoard (training logs) needs protobuf >= 6, but trajdata 1.4.0 pins protobuf==3.19.4 exactly, so
	# no single requirement set resolves: install it over the pin, deliberately. trajdata's generated map
	# proto works under protobuf 6/7 (tests/test_trajdata_source.py checks its map cache round-trips). pip
	# reports the pin as a conflict (exit status 0); its log is shown only if the install fails.
	$(PY) -m pip install -q "protobuf>=6.31.1,<8" "tensorboard>=2.20,<3" > $(VENV)/protobuf-override.log 2>&1 \
		|| (cat $(VENV)/protobuf-override.log; exit 1)
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/trafficgym demo

test: venv
	$(PY) -m pytest -q -ra --durations=15

# ruff, then the import layers (pyproject.toml [tool.importlinter]: the simulator never imports agents, ...)
lint: venv
	$(VENV)/bin/ruff check envs agents training render tests benchmarks
	$(VENV)/bin/lint-imports

# Regenerate the committed towns dataset from SUMO (byte-identical for a seed).
data: venv
	$(VENV)/bin/trafficgym data generate --out envs/data/towns/assets --compress

clean:
	rm -rf $(VENV) build *.egg-info
