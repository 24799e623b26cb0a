"""Packaging: installing the project installs its dependencies and no module (the code runs from the
checkout, as nanoGPT's does, so generic names such as data, model and eval never reach site-packages);
the scripts run from any folder."""
import glob
import os
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def test_the_wheel_holds_dependencies_only_and_the_checkout_runs_from_anywhere(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "wheel" / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith(".py")], names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    for dependency in ("torch", "safetensors", "tokenizers", "numpy"):
        assert f"Requires-Dist: {dependency}" in metadata
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # nothing of the project is importable outside the checkout (an installed copy would be)
    probe = "import importlib.util, sys; print([m for m in sys.argv[1:] if importlib.util.find_spec(m)])"
    r = subprocess.run([sys.executable, "-c", probe, *MODULES], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
    for script, needle in (("grpo.py", "--loss"), ("eval.py", "--k"), ("data.py", "split")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and needle in r.stdout, (script, r.stderr[-2000:])
