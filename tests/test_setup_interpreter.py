""".ci/interpreter.py: which Python .ci/setup installs into and .ci/python runs (PEP 668)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "interpreter.py"


def _module():
    spec = importlib.util.spec_from_file_location("ci_interpreter", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, python=sys.executable):
    return subprocess.run([str(python), str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_decision():
    ci = _module()
    assert ci.choose(venv_exists=False, managed=False) == "self"  # pyenv, conda, an activated venv
    assert ci.choose(venv_exists=False, managed=True) == "venv"   # Debian's python3: make .venv
    assert ci.choose(venv_exists=True, managed=False) == "venv"   # setup made one earlier: keep using it
    assert ci.choose(venv_exists=True, managed=True) == "venv"


def test_externally_managed_reads_the_pep668_marker(tmp_path, monkeypatch):
    ci = _module()
    monkeypatch.setattr(ci.sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setattr(ci.sys, "base_prefix", ci.sys.prefix)  # not a venv
    assert not ci.externally_managed()
    (tmp_path / "EXTERNALLY-MANAGED").write_text("[externally-managed]\n")
    assert ci.externally_managed()
    monkeypatch.setattr(ci.sys, "base_prefix", "/somewhere/else")  # inside a venv the marker does not apply
    assert not ci.externally_managed()


def test_plain_interpreter_is_used_as_it_is(tmp_path):
    r = _run("--root", tmp_path, "--create")
    if r.stdout.strip() != sys.executable:  # this interpreter is itself externally managed
        pytest.skip("the test interpreter is externally managed")
    assert r.returncode == 0 and not (tmp_path / ".venv").exists()


def test_managed_interpreter_gets_a_venv_that_sees_the_system_packages(tmp_path):
    r = _run("--root", tmp_path, "--assume-managed")
    assert r.returncode == 3 and "bash .ci/setup" in r.stderr  # not made without --create
    r = _run("--root", tmp_path, "--assume-managed", "--create")
    assert r.returncode == 0, r.stderr
    py = Path(r.stdout.strip())
    assert py == tmp_path / ".venv" / "bin" / "python" and py.exists()
    # --system-site-packages: what the base interpreter has (a GPU machine's CUDA torch) is reused
    assert "include-system-site-packages = true" in (tmp_path / ".venv" / "pyvenv.cfg").read_text()
    in_venv = sys.prefix != sys.base_prefix  # then the new venv sees the base's packages, not this venv's
    code = "import sys, pip; print(sys.prefix)" + ("" if in_venv else "; import torch")
    chk = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300)
    assert chk.returncode == 0, chk.stderr
    assert Path(chk.stdout.strip()) == tmp_path / ".venv"
    # the next call (setup again, or .ci/python) reuses it, whatever the interpreter
    again = _run("--root", tmp_path)
    assert again.returncode == 0 and Path(again.stdout.strip()) == py


def test_ci_python_runs_the_chosen_interpreter():
    out = subprocess.run([str(ROOT / ".ci" / "python"), "-c", "import sys; print(sys.executable)"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert out.returncode == 0, out.stderr
    venv = ROOT / ".venv" / "bin" / "python"
    assert Path(out.stdout.strip()) == (venv if venv.exists() else Path(sys.executable))
