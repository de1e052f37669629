"""Packaging for lyfast.

`kernels/` (Triton) is installed as `lyfast.kernels` through a package-dir mapping, so the
repository keeps the one-folder-per-backend layout while users import `lyfast.kernels`.
The CUDA extension in `csrc/` is built only when a CUDA toolkit and a CUDA-enabled torch
are present (or LYFAST_BUILD_CUDA=1); otherwise `pip install .` is pure Python.
"""
import os

from setuptools import setup


def get_extensions():
    force = os.environ.get("LYFAST_BUILD_CUDA")
    if force == "0":
        print("lyfast: LYFAST_BUILD_CUDA=0, skipping the CUDA extension")
        return [], {}
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".cu", ".cpp"))
    ) if os.path.isdir("csrc") else []
    if not sources:
        print("lyfast: no CUDA sources in csrc/, skipping the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing in an isolated build env
        print(f"lyfast: torch not importable at build time ({exc}); skipping the CUDA extension "
              "(to build it: pip install --no-build-isolation . with a CUDA torch and toolkit)")
        return [], {}
    if force != "1" and (torch.version.cuda is None or CUDA_HOME is None):
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME)"
        print(f"lyfast: {why}; skipping the CUDA extension (pure-Python install)")
        return [], {}
    # No --use_fast_math: the Cayley solve divides by pivots and the fp32 paths are held to the PyTorch
    # reference's precision. lyfast._C holds only TORCH_LIBRARY_IMPL registrations; lyfast/cuda_ops.py
    # loads it with torch.ops.load_library (it is not imported as a Python module).
    ext = CUDAExtension(
        "lyfast._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = get_extensions()

setup(
    packages=["lyfast", "lyfast.functional", "lyfast.modules", "lyfast.kernels"],
    package_dir={"lyfast.kernels": "kernels"},
    package_data={"lyfast.kernels": ["calibration.json"]},  # fitted efficiencies, when a GPU run wrote them
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
