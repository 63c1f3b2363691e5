"""Build of the lpips_fast._C extension (metadata lives in pyproject.toml).

CPU kernels are always built. CUDA kernels are added when torch has CUDA and nvcc is found
(or FORCE_CUDA=1); LPIPS_FAST_NO_CUDA=1 forces a CPU-only build. Build with
`pip install --no-build-isolation -e .` (an isolated build would fetch another torch); a wheel
with `pip wheel --no-build-isolation --no-deps -w dist .` (tests/wheel_check.sh checks one).
"""
import glob
import os
import shutil
import sys

from setuptools import setup


def _guess_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; when that is a wrapper such as
    /usr/local/bin/nvcc it yields /usr/local, where no libcudart lives and the link fails.
    Pick a toolkit directory that has both bin/nvcc and lib64/libcudart before torch looks."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        has_rt = any(glob.glob(os.path.join(home, d, "libcudart.so*")) for d in ("lib64", "lib"))
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and has_rt:
            os.environ["CUDA_HOME"] = home
            return


_guess_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip() not in ("", "0", "false", "False")


def _want_cuda():
    if _env_flag("LPIPS_FAST_NO_CUDA"):
        return False
    if _env_flag("FORCE_CUDA"):
        return True
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return torch.version.cuda is not None and bool(nvcc)


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


def _extensions():
    use_cuda = _want_cuda()
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to detect the arch from: build for Hopper (H100 / H200).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    sources = ["csrc/lpips_fast.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is chosen by torch (C++17 or C++20)
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(HERE, "csrc")]
    kwargs = {}
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "-lineinfo"]
        include_dirs += _nvidia_include_dirs()
        cls = CUDAExtension
    else:
        cls = CppExtension
    ext = cls(
        name="lpips_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        **kwargs,
    )
    print(f"lpips_fast: building {'CPU + CUDA' if use_cuda else 'CPU-only'} kernels")
    return [ext]


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """One object directory per Python for every build: an editable install (a temporary one
    by default) and a wheel build then share ninja's objects and its record of the compile
    commands, so the wheel after `make build` recompiles nothing that is unchanged (the CUDA
    source alone takes minutes on 2 cores). Other flags or headers still recompile."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(HERE, "build", f"ext.{sys.implementation.cache_tag}")


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
)
