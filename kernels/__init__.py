"""Triton kernels for lyfast (installed as `lyfast.kernels`). Importing this package never requires
Triton; each kernel module imports it itself."""
