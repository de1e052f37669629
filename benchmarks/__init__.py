"""lyfast benchmarks: `python -m benchmarks` (report) and `python -m pytest benchmarks/ --benchmark-only`."""
