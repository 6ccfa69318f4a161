"""Which Python nft_fast is installed into and run with; prints its path.

Run with the interpreter the user has (``python3``, or ``$PYTHON``):
- a project virtual environment ``.venv`` that setup made earlier is used again;
- an "externally managed" interpreter (PEP 668: Debian's and Ubuntu's own python3, where
  ``pip install`` refuses to touch the system) gets a new ``.venv`` when ``--create`` is given.
  It is made with ``--system-site-packages``, so what the system already has (a GPU machine's
  CUDA torch and triton) is reused rather than downloaded again;
- any other interpreter (pyenv, conda, a venv the user activated) is used as it is.

Exit status 3: a virtual environment was needed but could not be made (Debian: install
python3-venv).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

VENV = ".venv"


def externally_managed() -> bool:
    """PEP 668: a marker file in the stdlib directory of an interpreter that is not a venv."""
    in_venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
    return not in_venv and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))


def venv_python(root: Path) -> Path:
    return root / VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def choose(venv_exists: bool, managed: bool) -> str:
    """``"venv"`` (the project's .venv: reuse or make it) or ``"self"`` (this interpreter)."""
    return "venv" if venv_exists or managed else "self"


def make_venv(root: Path) -> None:
    """``python -m venv --system-site-packages root/.venv`` with pip in it; nothing is left
    behind when that fails (a half-made .venv would be taken for a finished one)."""
    try:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(root / VENV)], check=True)
    except BaseException:
        shutil.rmtree(root / VENV, ignore_errors=True)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="where .venv lives (default: the repository)")
    ap.add_argument("--create", action="store_true", help="make .venv when one is needed and missing")
    ap.add_argument("--assume-managed", action="store_true", help="treat this interpreter as externally managed")
    args = ap.parse_args(argv)
    py = venv_python(args.root)
    if choose(py.exists(), args.assume_managed or externally_managed()) == "self":
        print(sys.executable)
        return 0
    if not py.exists():
        if not args.create:
            print(f"{sys.executable} is externally managed (PEP 668) and {args.root / VENV} does not exist: "
                  "run bash .ci/setup first", file=sys.stderr)
            return 3
        try:
            make_venv(args.root)
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"could not make {args.root / VENV} ({e}); on Debian/Ubuntu: apt-get install python3-venv",
                  file=sys.stderr)
            return 3
    print(py)
    return 0


if __name__ == "__main__":
    sys.exit(main())
