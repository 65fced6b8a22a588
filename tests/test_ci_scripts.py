"""CI installs on the Pythons pyproject.toml declares: .ci/python finds them (or says how to provide one),
.ci/floors runs on the floor, and .ci/run runs the runtime-only install on the floor and the newest."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / ".ci"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _python(which: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CI / "python"), which], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("which", ["floor", "newest"])
def test_ci_python_finds_the_declared_version(which):
    declared = re.fullmatch(r">=(\d+\.\d+)", PROJECT["requires-python"])[1] if which == "floor" else max(
        (c.rsplit(" :: ", 1)[1] for c in PROJECT["classifiers"] if re.search(r"Python :: \d+\.\d+$", c)),
        key=lambda v: tuple(map(int, v.split("."))),
    )
    proc = _python(which)
    if proc.returncode != 0:
        assert f"no Python {declared} here" in proc.stderr, proc.stderr  # the one-line way out, not a traceback
        pytest.skip(f"Python {declared} is not installed here: {proc.stderr.strip()}")
    exe = proc.stdout.strip()
    got = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert got == declared, (exe, got, declared)


def test_ci_python_says_how_to_provide_a_missing_version(tmp_path):
    proc = _python("9.9", env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no Python 9.9 here" in proc.stderr and "PYTHON_99=" in proc.stderr


def test_ci_runs_on_the_declared_pythons():
    run = (CI / "run").read_text()
    assert "runtime-install floor " in run and "runtime-install newest " in run
    floors = (CI / "floors").read_text()
    assert '"$(.ci/python floor)"' in floors and '"$floor_py" -m venv' in floors and "python3 " not in floors
    assert "--no-deps" in run and "pip wheel" in run  # the wheel, not the source tree, is what gets installed
