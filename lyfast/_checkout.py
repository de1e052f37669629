"""Running from a checkout: the repository root holds the Triton folder `kernels/` (installed as `lyfast.kernels`),
which shadows the PyPI package of the same name that transformers >= 5 imports. Called before anything imports
transformers: the benchmarks, the tests, and `lyfast.quantized` (optimum-quanto imports transformers)."""
from __future__ import annotations

import importlib
import os
import sys


def prefer_installed_kernels() -> None:
    """Bind `kernels` to the installed PyPI package (Hugging Face's hub kernels), not this repository's folder.

    transformers >= 5 depends on that package and imports it as soon as peft is imported; run from the repository
    root (`python -m pytest`, `python -m benchmarks`), `import kernels` would find the Triton folder that is
    installed as `lyfast.kernels`, and transformers then fails with ImportError (`CUDAProperties`). Nothing in
    lyfast imports the top-level name, so importing the installed package first with the root off the path is
    enough; where it is not installed, nothing is imported.
    """
    if "kernels" in sys.modules:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root (lyfast/..)
    if not os.path.isfile(os.path.join(root, "kernels", "loha.py")):
        return  # not a checkout (installed: the Triton folder is lyfast/kernels), nothing shadows the package
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
