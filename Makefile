# The two commands of the README:  make demo   and   make test
# Each installs what it needs (Debian packages, a virtualenv, the Cython build).

PYTHON   ?= python3
VENV     ?= .venv
PROVIDER ?= auto
PY       := $(VENV)/bin/python
APT_PKGS := libfabric-dev libfabric-bin libibverbs-dev ibverbs-utils pkg-config gcc make \
            iproute2 nftables python3-venv python3-dev
PY_PKGS  := "Cython>=3.0" "numpy>=1.22" setuptools wheel pytest pytest-asyncio pytest-timeout hypothesis uvloop

.PHONY: all deps venv build test test-slow demo bench info clean

all: build

# Debian packages: only when something is missing (apt needs root).
deps:
	@if ! pkg-config --exists libfabric 2>/dev/null || ! command -v fi_info >/dev/null \
	    || ! command -v ibv_devices >/dev/null || ! command -v nft >/dev/null \
	    || ! $(PYTHON) -c "import venv, ensurepip" 2>/dev/null \
	    || ! $(PYTHON) -c "import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" 2>/dev/null; then \
	  echo "installing: $(APT_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); \
	fi

$(VENV)/.stamp: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PY_PKGS)
	touch $@

venv: deps $(VENV)/.stamp

build: venv
	$(PY) -m pip install -q --no-build-isolation -e .

# timeout: a hang inside C while holding the GIL (see docs/providers.md, shm)
# defeats pytest-timeout; the whole run is bounded here instead
test: build
	timeout 1500 $(PY) -m pytest -q -ra tests

test-slow: build
	$(PY) -m pytest -q -ra --run-slow tests

demo: build
	$(PY) -m aiotransfer.demo --provider $(PROVIDER)

info: build
	$(VENV)/bin/aiotransfer info

bench: build
	$(PY) -m pip install -q matplotlib
	$(PY) benchmarks/bench_core.py --json benchmarks/results/core.json --plot docs/img/core_bw.png

# head to head with the peer libraries (installs them: nixl pulls in torch, a few GB)
.PHONY: bench-peers
bench-peers: build
	$(PY) -m pip install -q "matplotlib>=3.5" mooncake-transfer-engine-non-cuda nixl
	$(VENV)/bin/aiotransfer bench --repeat 3 --wait-idle 3 --json benchmarks/results/bench.json \
	    --plot docs/img/bench_bw.png --markdown benchmarks/results/bench.md

clean:
	rm -rf build $(VENV) *.egg-info aiotransfer/_core.c aiotransfer/*.so benchmarks/raw/build
