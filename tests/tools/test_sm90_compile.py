"""Every Triton kernel launch the ops make compiles for sm_80 and sm_90 (no GPU needed).

The interpreter tests check the numbers; this checks what only the GPU compiler sees (types,
tile shapes, shared memory). Launches are recorded under the interpreter in one process and
compiled with triton's ptxas in another (see tests/helpers/sm90_compile.py).
"""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HELPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton was installed without its CUDA backend (ptxas)")
def test_every_launch_compiles_for_sm80_and_sm90(tmp_path):
    path = str(tmp_path / "launches.json")
    script = os.path.join(HELPERS, "sm90_compile.py")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    rec = subprocess.run([sys.executable, script, "record", path], env=env, capture_output=True, text=True, timeout=600)
    assert rec.returncode == 0, rec.stderr[-3000:]
    n = int(rec.stdout.split("recorded ")[1].split()[0])
    assert n >= 60, rec.stdout  # every op, both dtypes, several layouts and tile shapes
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1")
    comp = subprocess.run([sys.executable, script, "compile", path], env=env, capture_output=True, text=True, timeout=900)
    assert comp.returncode == 0, comp.stdout[-4000:] + comp.stderr[-2000:]
    assert f"compiled {n} launches x 2 targets, 0 failures" in comp.stdout
