"""setup.py's decisions, in-process with faked versions (no nvcc, setuptools or torch of those
versions needed): when the CUDA kernels are built, what a build without them says, the
fallback when their compile fails, which build tools are enough, the licence's form.
(The real builds: tests/test_build.py here, and CI's second venv, `make test-oldest`, whose
torch 2.6 is CUDA 12.4 against this machine's nvcc 13.0 with the stock setuptools of a venv.)
"""
import pytest

from helpers import setup_script

S = setup_script()
NVCC = "/opt/cuda/bin/nvcc"


@pytest.mark.parametrize("env,torch_cuda,nvcc,release,built,why", [
    ({}, "12.4", NVCC, "12.8", True, None),   # a minor version apart: torch only warns
    ({}, "12.4", NVCC, "13.0", False, "nvcc 13.0 (/opt/cuda/bin/nvcc) is not of the CUDA 12.x"),
    ({}, "13.0", NVCC, "12.6", False, "is not of the CUDA 13.x"),
    ({}, "12.4", None, None, False, "no nvcc found"),
    ({}, "12.4", NVCC, None, False, f"{NVCC} --version failed"),
    ({}, None, NVCC, "13.0", False, "CPU-only build"),
    ({"LPIPS_FAST_NO_CUDA": "1"}, "12.4", NVCC, "12.4", False, "LPIPS_FAST_NO_CUDA=1"),
    ({"FORCE_CUDA": "1"}, "12.4", NVCC, "13.0", True, None),  # the user insists: fail loudly
    ({"FORCE_CUDA": "0"}, "12.4", NVCC, "13.0", False, "is not of the CUDA 12.x"),
])
def test_cuda_plan(env, torch_cuda, nvcc, release, built, why):
    use, reason = S.cuda_plan(env, torch_cuda, nvcc, release)
    assert use is built
    assert (reason is None) if why is None else (why in reason)


def test_the_readme_documents_the_rebuild_command():
    """The command the build's line names is the one the README shows."""
    with open(f"{S.HERE}/README.md") as f:
        assert S.REBUILD in f.read()


def test_the_line_says_why_and_how_to_get_the_cuda_kernels():
    _, why = S.cuda_plan({}, "12.4", NVCC, "13.0")
    line = S.cpu_only_line(why, "12.4")
    assert "\n" not in line and why in line
    assert line.endswith(f"CUDA_HOME=/path/to/cuda-12.x {S.REBUILD}")
    # nothing to get where torch has no CUDA or the user asked for a CPU-only build
    for env, torch_cuda in (({}, None), ({"LPIPS_FAST_NO_CUDA": "1"}, "12.4")):
        _, why = S.cuda_plan(env, torch_cuda, NVCC, "12.4")
        assert S.cpu_only_line(why, torch_cuda) == f"no CUDA kernels: {why}"


class Builds:
    """Fake build steps: the CUDA one fails with `error` (None: succeeds)."""

    def __init__(self, error=None):
        self.error, self.done, self.said = error, [], []

    def cuda(self):
        if self.error:
            raise self.error
        self.done.append("cuda")

    def cpu(self):
        self.done.append("cpu")

    def run(self, forced=False):
        return S.build_or_fall_back(self.cuda, self.cpu, forced, self.said.append)


def test_a_failing_cuda_compile_falls_back_to_the_cpu_kernels():
    b = Builds(RuntimeError("Error compiling objects for extension\nninja: build stopped"))
    why = b.run()
    assert b.done == ["cpu"] and b.said == [why]
    assert why == ("compiling the CUDA sources failed (RuntimeError: Error compiling objects "
                   "for extension)")


def test_a_working_or_forced_cuda_build_does_not_fall_back():
    b = Builds()
    assert b.run() is None and b.done == ["cuda"] and b.said == []
    b = Builds(OSError("nvcc: not found"))
    with pytest.raises(OSError):
        b.run(forced=True)
    assert b.done == [] and b.said == []


@pytest.mark.parametrize("version,has_wheel,needs", [
    ("65.5.0", True, None),        # Python 3.10/3.11 venvs' stock setuptools, with wheel
    ("65.5.0", False, "pip install wheel"),
    ("70.1.0", False, None),       # bdist_wheel is setuptools' own from 70.1
    ("84.2.1", False, None),
    ("59.6.0", True, "setuptools>=61 (found 59.6.0)"),  # no [project] table support
])
def test_build_tools(version, has_wheel, needs):
    problem = S.build_tools_problem(version, has_wheel)
    if needs is None:
        assert problem is None
    else:
        assert needs in problem and "\n" not in problem and problem.startswith("lpips_fast: ")


def test_licence_field_fits_the_setuptools():
    assert S.license_field("65.5.0") == {"license": "BSD-2-Clause"}
    assert S.license_field("77.0.3") == {"license_expression": "BSD-2-Clause"}
    tomllib = pytest.importorskip("tomllib")
    with open(f"{S.HERE}/pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    # a "license" string in pyproject.toml fails validation before setuptools 77
    assert "license" not in project["project"] and "license" in project["project"]["dynamic"]
