"""Build script: the package, the `freetickets` command, and the extensions the
machine can build.

* C++ CPU extension (``csrc/cpu``, module ``freetickets_kernels._cpu``): built
  when a C++ compiler is found.  Set ``FREETICKETS_NO_CPU_EXT=1`` to skip it.
* CUDA extension (``csrc/cuda``, module ``freetickets_kernels._cuda``): built
  when ``csrc/cuda`` has sources and a GPU is visible or ``FORCE_CUDA=1``.
  ``TORCH_CUDA_ARCH_LIST`` is honoured (default ``8.0;9.0``).

Without any extension the package still works on the reference backend.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"[freetickets-kernels setup] {msg}", file=sys.stderr)


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable at build time: no extension is built "
             "(install torch first and use --no-build-isolation)")
        return [], {}
    exts = []
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    compiler = os.environ.get("CXX", "c++")
    if os.environ.get("FREETICKETS_NO_CPU_EXT") == "1":
        _say("FREETICKETS_NO_CPU_EXT=1: skipping the C++ CPU extension")
    elif not cpu_sources:
        _say("csrc/cpu has no sources: skipping the C++ CPU extension")
    elif shutil.which(compiler) is None:
        _say(f"no C++ compiler ({compiler}) found: skipping the CPU extension")
    else:
        exts.append(CppExtension(
            "freetickets_kernels._cpu",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        ))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) +
                          glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    want_cuda = os.environ.get("FORCE_CUDA") == "1" or torch.cuda.is_available()
    if cuda_sources and want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        exts.append(CUDAExtension(
            "freetickets_kernels._cuda",
            cuda_sources,
            extra_compile_args={"cxx": ["-O3"],
                                "nvcc": ["-O3", "-lineinfo"]},
        ))
    elif cuda_sources:
        _say("no GPU visible and FORCE_CUDA != 1: skipping the CUDA extension")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()


def _version() -> str:
    """__version__ from freetickets_kernels/_version.py, without importing the package."""
    scope: dict = {}
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "freetickets_kernels", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


setup(
    name="freetickets-kernels",
    version=_version(),
    description="Block-sparse CPU/GPU kernels for fast sparse networks, and FreeTickets ensembles",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["freetickets_kernels", "freetickets_kernels.*"]),
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest", "hypothesis"],
                    "train": ["scikit-learn", "matplotlib", "torchvision"]},
    entry_points={"console_scripts": ["freetickets=freetickets_kernels.app.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
