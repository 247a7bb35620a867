"""The installable package: pyproject.toml builds a wheel (setuptools) whose msdiff imports outside
the clone, with runtime dependencies as ranges that admit the tested pins of requirements.txt."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import run_process

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.split("[")[0].strip().lower()] = version.strip()
    return pins


def test_dependencies_are_ranges_that_admit_the_pinned_versions():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    pins = _pins()
    deps = [Requirement(d) for d in project["project"]["dependencies"]]
    names = {r.name.lower() for r in deps}
    assert {"torch", "lightning", "jsonargparse", "pyyaml", "numpy"} <= names
    for r in deps:
        assert not any(s.operator == "==" for s in r.specifier), f"{r}: a pin, expected a range"
        if r.name.lower() in pins:
            assert r.specifier.contains(pins[r.name.lower()]), f"{r} excludes the tested {pins[r.name.lower()]}"


@pytest.mark.slow
def test_the_built_wheel_imports_outside_the_clone(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "msdiff", "pyproject.toml", "README.md"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    r = run_process([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                     "-w", tmp_path / "dist", src], timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("msdiff-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
        meta = next(n for n in z.namelist() if n.endswith("METADATA"))
        assert "Requires-Dist: lightning" in z.read(meta).decode()
    packaged = {str(p.relative_to(tmp_path / "site")) for p in (tmp_path / "site" / "msdiff").rglob("*.py")}
    assert packaged == {f for f in files if f.endswith(".py")}
    code = "import msdiff, msdiff.run, msdiff.cli; print(msdiff.__file__)"
    r = run_process([sys.executable, "-c", code], timeout=300, cwd=tmp_path,
                    env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site"), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "site" / "msdiff" / "__init__.py")
