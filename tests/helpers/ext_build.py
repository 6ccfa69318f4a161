"""Build nft_fast's extension modules once more with extra CMake settings (sanitizer builds for
tests/tools/test_asan.py and tests/cuda_emu/test_racecheck.py), and run Python on them: the
subprocess's tests/conftest.py loads them in place of the installed ones (NFT_TEST_C_SO,
NFT_TEST_CUDA_EMU_SO)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cmake_build(tmp: Path, targets: List[str], cmake_args: List[str]) -> Dict[str, Path]:
    """Configure and build ``targets`` (e.g. ``_C``, ``_cuda_emu``) under ``tmp``; the paths of
    the built modules by target."""
    pybind11 = pytest.importorskip("pybind11")
    out, build = tmp / "out", tmp / "build"
    args = ["cmake", "-S", str(ROOT), "-B", str(build), f"-DNFT_FAST_OUTPUT_DIR={out}",
            f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DNFT_FAST_NO_CUDA=ON", *cmake_args]
    if "_cuda_emu" in targets:  # the test tool's target exists only on request
        args.append("-DNFT_FAST_BUILD_CUDA_EMU=ON")
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    for cmd in (args, ["cmake", "--build", str(build), "--target", *targets, "--parallel", str(os.cpu_count() or 2)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    mods = {name: sorted(out.glob(f"{name}.*.so")) for name in targets}
    assert all(mods.values()), f"modules missing in {out}: {mods}"
    return {name: so[0] for name, so in mods.items()}


def run_python(mods: Dict[str, Path], argv: List[str], timeout: float, **env) -> subprocess.CompletedProcess:
    """``python argv`` from the repository root, with the modules ``mods`` in place of the
    installed ones and the kernels' CUDA backend on the emulator; ``env`` adds variables."""
    e = dict(os.environ, NFT_FAST_CUDA_EMU="1", **env)
    for name, var in (("_C", "NFT_TEST_C_SO"), ("_cuda_emu", "NFT_TEST_CUDA_EMU_SO")):
        if name in mods:
            e[var] = str(mods[name])
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def load_module_snippet(var: str = "NFT_TEST_CUDA_EMU_SO", name: str = "m") -> str:
    """Python source (for ``python -c``) that imports the emulator module as ``name``: the build at
    $var when it is set (a sanitizer run), else the installed one."""
    return ("import importlib.util, os, torch, nft_fast\n"
            f"if os.environ.get('{var}'):\n"
            f"    spec = importlib.util.spec_from_file_location('nft_fast._cuda_emu', os.environ['{var}'])\n"
            f"    {name} = importlib.util.module_from_spec(spec); spec.loader.exec_module({name})\n"
            "else:\n"
            f"    import nft_fast._cuda_emu as {name}\n")
