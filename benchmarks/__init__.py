"""lyfast benchmarks: `python -m benchmarks` (report) and `python -m pytest benchmarks/ --benchmark-only`."""

from lyfast._checkout import prefer_installed_kernels

prefer_installed_kernels()
