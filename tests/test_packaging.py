"""Packaging contract: lyfast imports without lycoris or triton, and `pip install .` on a CPU-only
machine is a pure-Python install that ships the Triton kernels as lyfast.kernels."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_pulls_neither_lycoris_nor_triton():
    code = "import sys, lyfast; bad = [m for m in ('lycoris', 'triton') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_wheel_is_pure_python_with_kernels(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("lyfast-*.whl")
    assert wheel.name.endswith("-none-any.whl"), wheel.name  # no compiled extension on a CPU torch
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("lyfast/kernels/lokr.py", "lyfast/kernels/boft.py", "lyfast/kernels/loha.py",
                     "lyfast/functional/loha.py", "lyfast/modules/boft.py", "lyfast/kohya.py"):
        assert required in names, required
    assert not any(n.endswith((".so", ".pyd")) for n in names)
