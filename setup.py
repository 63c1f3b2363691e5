"""Build of the lpips_fast._C extension (metadata lives in pyproject.toml).

CPU kernels are always built. CUDA kernels are added when torch has CUDA and an nvcc of
torch's CUDA major version is found; otherwise (no nvcc, another major version, an nvcc
whose compile fails) the build goes on with the CPU kernels only and says why in one line,
which lpips_fast/_build.json keeps beside the extension for run time (`lpips-fast --version`,
the warning on CUDA inputs). FORCE_CUDA=1 builds the CUDA kernels or fails;
LPIPS_FAST_NO_CUDA=1 builds CPU kernels only. Build with
`pip install --no-build-isolation -e .` (an isolated build would fetch another torch); a
wheel with `pip wheel --no-build-isolation --no-deps -w dist .` (tests/wheel_check.sh).

Run as a script (by pip, or `python setup.py ...`) it builds; imported (tests/test_setup.py)
it only defines the decision functions.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join("lpips_fast", "_build.json")  # relative to a package root
MIN_SETUPTOOLS = (61, 0)     # reads the [project] table of pyproject.toml
OWN_BDIST_WHEEL = (70, 1)    # older setuptools build wheels with the `wheel` package
REBUILD = "FORCE_CUDA=1 pip install --no-build-isolation --no-deps --force-reinstall ."


def _release(text):
    """(major, minor) of a version string such as '65.5.0', '12.4' or '2.6.0+cu124'."""
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def build_tools_problem(setuptools_version, has_wheel):
    """None where these build tools can build lpips_fast, else the one line that says what is
    missing (pip runs setup.py with the user's tools under --no-build-isolation)."""
    if _release(setuptools_version) < MIN_SETUPTOOLS:
        return (f"lpips_fast: building needs setuptools>=61 (found {setuptools_version}): "
                "pip install -U 'setuptools>=61' wheel")
    if _release(setuptools_version) < OWN_BDIST_WHEEL and not has_wheel:
        return (f"lpips_fast: setuptools {setuptools_version} builds wheels only with the "
                "`wheel` package (or setuptools>=70.1): pip install wheel")
    return None


def _flag(env, name):
    return env.get(name, "").strip() not in ("", "0", "false", "False")


def cuda_plan(env, torch_cuda, nvcc, nvcc_release):
    """(build the CUDA kernels?, why not or None). torch_cuda: torch.version.cuda (None for a
    CPU-only torch); nvcc: its path or None; nvcc_release: what `nvcc --version` reports
    ('13.0'), None where it could not run. torch's extension builder refuses an nvcc of
    another major version than torch's CUDA (a minor version apart it only warns)."""
    if _flag(env, "LPIPS_FAST_NO_CUDA"):
        return False, "LPIPS_FAST_NO_CUDA=1 was set"
    if _flag(env, "FORCE_CUDA"):
        return True, None
    if torch_cuda is None:
        return False, "this torch is a CPU-only build"
    if nvcc is None:
        return False, f"no nvcc found (CUDA_HOME, PATH); torch was built with CUDA {torch_cuda}"
    if nvcc_release is None:
        return False, f"{nvcc} --version failed"
    if _release(nvcc_release)[0] != _release(torch_cuda)[0]:
        return False, (f"nvcc {nvcc_release} ({nvcc}) is not of the CUDA {_release(torch_cuda)[0]}"
                       f".x that torch was built with (CUDA {torch_cuda})")
    return True, None


def cpu_only_line(why, torch_cuda):
    """The one line that says why the CUDA kernels are missing and how to get them (the build
    prints it; lpips_fast reports it at run time: `lpips-fast --version`, CUDA inputs)."""
    line = f"no CUDA kernels: {why}"
    if torch_cuda is None or why.startswith("LPIPS_FAST_NO_CUDA"):
        return line
    major = _release(torch_cuda)[0]
    return (f"{line}. To add them, with a CUDA {major}.x toolkit: "
            f"CUDA_HOME=/path/to/cuda-{major}.x {REBUILD}")


def build_or_fall_back(build_cuda, build_cpu, forced, say):
    """Run build_cuda(); if it fails (and FORCE_CUDA is not set), say why in one line and run
    build_cpu(). Returns why the CUDA kernels are missing, or None."""
    try:
        build_cuda()
        return None
    except Exception as e:  # nvcc, ninja and the linker all end here
        if forced:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        why = f"compiling the CUDA sources failed ({type(e).__name__}: {first})"
    say(why)
    build_cpu()
    return why


def write_build_info(root, line):
    """lpips_fast/_build.json under `root`: the line that says why the CUDA kernels are
    missing and how to get them (None: they are built), for lpips_fast._ops.cuda_missing."""
    path = os.path.join(root, BUILD_INFO)
    if os.path.isdir(os.path.dirname(path)):
        with open(path, "w") as f:
            json.dump({"cuda_missing": line}, f)


def guess_cuda_home():
    """The toolkit to build with: CUDA_HOME (or CUDA_PATH) where set, else a directory with
    both bin/nvcc and a libcudart. torch guesses CUDA_HOME from `which nvcc`; when that is a
    wrapper such as /usr/local/bin/nvcc it yields /usr/local, where no libcudart lives and the
    link fails. None where none is found (torch's own guess then stands)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        has_rt = any(glob.glob(os.path.join(home, d, "libcudart.so*")) for d in ("lib64", "lib"))
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and has_rt:
            return home
    return None


def _nvcc_release(nvcc):
    """'13.0' from `nvcc --version`, or None where it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out.stdout)
    return found.group(1) if out.returncode == 0 and found else None


def detect_cuda_plan(torch_cuda, cuda_home, env=os.environ):
    """cuda_plan for this machine: the nvcc of cuda_home (where torch's builder takes it;
    the build passes guess_cuda_home(), else torch's CUDA_HOME)."""
    nvcc = cuda_home and os.path.join(cuda_home, "bin", "nvcc")
    nvcc = nvcc if nvcc and os.path.exists(nvcc) else None
    return cuda_plan(env, torch_cuda, nvcc, nvcc and _nvcc_release(nvcc))


def _nvidia_include_dirs():
    """Headers torch's CUDA build includes (cusparse.h, cublas_v2.h, cudnn.h) that pip installs
    under site-packages/nvidia/*/include rather than in the CUDA toolkit."""
    dirs = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return dirs
    for root in list(getattr(nvidia, "__path__", [])):
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.isdir(inc):
                dirs.append(inc)
    return dirs


def _to_cpu_only(ext):
    """The CUDA extension made CPU-only in place (after its CUDA compile failed): no .cu
    sources, no CUDA runtime to link (the toolkit's libcudart may not be torch's)."""
    ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
    ext.libraries = [lib for lib in ext.libraries if lib != "cudart"]


def main():
    problem = build_tools_problem(setuptools_version(), _has_wheel())
    if problem:
        sys.exit(problem)
    home = guess_cuda_home()
    if home:  # before torch.utils.cpp_extension takes its own guess
        os.environ["CUDA_HOME"] = home
    import torch
    from setuptools import setup
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    use_cuda, why = detect_cuda_plan(torch.version.cuda, CUDA_HOME)
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to detect the arch from: build for Hopper (H100 / H200).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"

    sources = (["csrc/lpips_fast.cpp", "csrc/conv_autograd.cpp"]
               + sorted(glob.glob("csrc/cpu/*.cpp")))
    extra = {"cxx": ["-O3", "-fopenmp"]}  # the C++ standard is chosen by torch (C++17 or C++20)
    include_dirs = [os.path.join(HERE, "csrc")]
    cls = CppExtension
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "-lineinfo"]
        include_dirs += _nvidia_include_dirs()
        cls = CUDAExtension
    ext = cls(name="lpips_fast._C", sources=sources, include_dirs=include_dirs,
              extra_compile_args=extra, extra_link_args=["-fopenmp"])

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """One object directory per Python for every build: an editable install (a temporary
        one by default) and a wheel build then share ninja's objects and its record of the
        compile commands, so the wheel after `make build` recompiles nothing that is unchanged
        (the CUDA source alone takes minutes on 2 cores). Other flags or headers still
        recompile. A failing CUDA compile falls back to the CPU kernels (build_or_fall_back)."""

        def finalize_options(self):
            super().finalize_options()
            # per torch release too: a venv of another torch must not take these objects
            tag = f"{sys.implementation.cache_tag}-torch{torch.__version__.split('+')[0]}"
            self.build_temp = os.path.join(HERE, "build", f"ext.{tag}")

        def build_extension(self, ext):
            def say(reason):
                line = cpu_only_line(reason, torch.version.cuda)
                print(f"lpips_fast: building CPU kernels only, {line}")

            missing = why
            if use_cuda:
                print("lpips_fast: building CPU + CUDA kernels")
                missing = build_or_fall_back(
                    lambda: super(BuildExt, self).build_extension(ext),
                    lambda: (_to_cpu_only(ext), super(BuildExt, self).build_extension(ext)),
                    _flag(os.environ, "FORCE_CUDA"), say)
            else:
                say(why)
                super().build_extension(ext)
            self._record(ext, missing and cpu_only_line(missing, torch.version.cuda))

        def _record(self, ext, line):
            """_build.json beside the built extension (a wheel's build_lib), and in the
            source tree where an editable or in-place build loads the package from."""
            package_root = os.path.dirname(os.path.dirname(self.get_ext_fullpath(ext.name)))
            roots = {package_root}
            if self.inplace or getattr(self, "editable_mode", False):
                roots.add(HERE)
            for root in roots:
                write_build_info(root, line)

    setup(**license_field(setuptools_version()), ext_modules=[ext],
          cmdclass={"build_ext": BuildExt})


def setuptools_version():
    import setuptools
    return setuptools.__version__


def _has_wheel():
    import importlib.util
    return importlib.util.find_spec("wheel") is not None


def license_field(setuptools_version):
    """The licence in the form this setuptools takes (pyproject.toml lists it as dynamic):
    an SPDX expression from setuptools 77 on (which deprecates the free-text field), the
    free-text field before (which the expression form fails to validate)."""
    if _release(setuptools_version) >= (77, 0):
        return {"license_expression": "BSD-2-Clause"}
    return {"license": "BSD-2-Clause"}


if __name__ == "__main__":
    main()
