"""The installable commands: every console script of pyproject.toml exists, answers --help (exit 0) without
importing torch, DeepSpeed or datasets, and launch.sh / ds_face.launch.hostfile speak argparse conventions.
(The `pip install .` itself and the --help times are measured by hand: docs/install.md.)"""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
HEAVY = ("torch", "deepspeed", "datasets")

# Runs the entry point as the installed script does (``sys.exit(function())`` with sys.argv set), then reports
# the exit status and which heavy modules had been imported by then.
PROBE = """
import importlib, sys
module, func = sys.argv[1].split(":")
sys.argv = [sys.argv[1], "--help"]
try:
    code = getattr(importlib.import_module(module), func)()
except SystemExit as stop:
    code = stop.code
print("EXIT", code)
print("HEAVY", ",".join(m for m in {heavy!r} if m in sys.modules))
""".format(heavy=HEAVY)


def test_the_scripts_cover_every_command():
    assert set(SCRIPTS) >= {"ds-face-train", "ds-face-eval", "ds-face-embed", "ds-face-export", "ds-face-bench",
                            "ds-face-hostfile", "ds-face-preflight", "ds-face-rec2arrow", "ds-face-folder2arrow",
                            "ds-face-verify", "ds-face-config"}


def runtime_requirements() -> list[str]:
    """requirements.txt, which pyproject.toml reads (setuptools dynamic dependencies)."""
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_runtime_requirements_hold_no_test_packages():
    deps = " ".join(runtime_requirements())
    for test_only in ("pytest", "accelerate"):
        assert test_only not in deps
        assert any(d.startswith(test_only) for d in PYPROJECT["project"]["optional-dependencies"]["test"])
    assert "torch==2.13.0" in runtime_requirements(), "pinned as make setup installs it"
    assert "pip install -q torch==2.13.0" in (ROOT / "Makefile").read_text()


def test_package_discovery_finds_both_packages():
    from setuptools import find_packages
    found = find_packages(str(ROOT), include=PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"])
    assert {"ds_face", "ds_face.backbones", "ds_face.head", "ds_face.data", "ds_face.bench", "data_prep"} <= set(found)
    assert not any(p.startswith("tests") for p in found)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_exits_0_before_heavy_imports(script):
    proc = subprocess.run([sys.executable, "-c", PROBE, SCRIPTS[script]], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "EXIT 0" in proc.stdout, proc.stdout + proc.stderr
    assert "usage:" in proc.stdout
    heavy = proc.stdout.split("HEAVY ")[1].strip()
    assert heavy == "", f"{script} --help imported {heavy}"


def test_launch_sh_help_and_usage():
    ok = subprocess.run([str(ROOT / "launch.sh"), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "./launch.sh RUN.yaml DS.json" in ok.stdout and ok.stderr == ""
    bare = subprocess.run([str(ROOT / "launch.sh")], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert bare.returncode == 2 and "./launch.sh RUN.yaml DS.json" in bare.stderr and bare.stdout == ""


def test_hostfile_has_argparse(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "ds_face.launch.hostfile", "--help"], cwd=ROOT, capture_output=True,
                        text=True, timeout=30)
    assert ok.returncode == 0 and "usage: ds_face.launch.hostfile" in ok.stdout and "HOST slots=N" in ok.stdout
    bare = subprocess.run([sys.executable, "-m", "ds_face.launch.hostfile"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert bare.returncode == 2 and "the following arguments are required: hostfile" in bare.stderr
