"""The emulator's data-race checker (csrc/testing/cuda_emu/cuda_emu.cpp, "racecheck") on the CUDA kernels.

A build of nft_fast._cuda_emu with the CMake option NFT_FAST_CUDA_EMU_RACECHECK=ON compiles the
kernel sources with -fsanitize=thread, whose load/store hooks the emulator implements: two accesses
to one byte race when one is a write (or one is atomic and the other not) and nothing orders them
on a GPU (different blocks of a launch; or one block's threads in the same barrier interval, lanes
of one warp also with no __syncwarp between). Unlike the schedule checks
(tests/cuda_emu/test_schedules.py) it sees a race that does not change the result under the
schedules tried. Planted races in self-test kernels must be reported with both source lines; then
the kernel tests rerun with the checker on and must pass.
"""
import os
import shutil

import pytest
import torch
from nft_fast import _build
from tests.helpers.ext_build import cmake_build, load_module_snippet, run_python

emu = pytest.importorskip("nft_fast._cuda_emu", reason=f"CUDA emulator module not built ({_build.EMU_BUILD_HINT})")
pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend runs on the GPU here, not the emulator"),
    pytest.mark.skipif(bool(os.environ.get("NFT_TEST_CUDA_EMU_SO")), reason="already inside a rebuilt-module run"),
]
needs_build = pytest.mark.skipif(not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))),
                                 reason="needs cmake and a C++ compiler")


def test_default_build_has_no_race_checker():
    assert emu.racecheck_available() is False and emu.racecheck() is False
    with pytest.raises(RuntimeError, match="built without the race checker.*NFT_FAST_CUDA_EMU_RACECHECK=ON"):
        emu.set_racecheck(True)
    emu.set_racecheck(False)  # turning it off is always fine


@pytest.fixture(scope="module")
def race_mod(tmp_path_factory):
    return cmake_build(tmp_path_factory.mktemp("racecheck"), ["_cuda_emu"],
                       ["-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DNFT_FAST_CUDA_EMU_RACECHECK=ON"])


PLANTED = load_module_snippet() + """
assert m.racecheck_available() and not m.racecheck()
m.set_racecheck(True)
p = lambda t: t.data_ptr()
x, out, out2 = torch.arange(256, dtype=torch.float32), torch.zeros(256), torch.zeros(256)
i1, i2, i3 = (torch.zeros(1, dtype=torch.int32) for _ in range(3))  # kept alive: the kernels write them
cases = {
    "racy_neighbour": lambda: m.selftest.racy_neighbour(p(x), p(out), 4, 64),
    "last_block": lambda: m.selftest.last_block(p(i1), 4),
    "warp_handoff": lambda: m.selftest.warp_handoff(p(x), p(out), False),
    "atomic_vs_plain": lambda: m.selftest.atomic_vs_plain(p(i2), 64, True),
    # ordered: must not be reported
    "warp_handoff_synced": lambda: m.selftest.warp_handoff(p(x), p(out), True),
    "atomics_only": lambda: m.selftest.atomic_vs_plain(p(i3), 64, False),
    "block_sum": lambda: m.selftest.block_sum(p(x), p(out), 256, 2, 32, 4),
    "warp_sums": lambda: m.selftest.warp_sums(p(x), p(out), p(out2), 256, 2, 96),
    "uninit_shared": lambda: m.selftest.uninit_shared(p(out), 2, 64),
}
for name, run in cases.items():
    try:
        run()
        print(f"{name}: no race", flush=True)
    except RuntimeError as e:
        print(f"{name}: {e}", flush=True)
assert int(i3) == 64, int(i3)
m.set_racecheck(False)
m.selftest.racy_neighbour(p(x), p(out), 4, 64)
print("off: no check", flush=True)
"""


@needs_build
def test_planted_races_are_reported_with_both_source_lines(race_mod):
    r = run_python(race_mod, ["-c", PLANTED], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    got = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    for name in ("warp_handoff_synced", "atomics_only", "block_sum", "warp_sums", "uninit_shared", "off"):
        assert got[name] in ("no race", "no check"), f"{name}: {got[name]}"
    shared = got["racy_neighbour"]
    assert "data race in kernel 'racy_neighbour_kernel'" in shared and "on shared memory" in shared, shared
    # the write of one thread and its neighbour's read, each with its line in selftest.cu
    assert "writes 4 byte(s) at emu_selftest::racy_neighbour_kernel at selftest.cu:" in shared, shared
    assert "read it at emu_selftest::racy_neighbour_kernel at selftest.cu:" in shared, shared
    assert "in the same barrier interval" in shared, shared
    cross = got["last_block"]
    assert "on global memory" in cross and "of block (1,0,0) writes" in cross, cross
    assert "of block (0,0,0) wrote it" in cross and "blocks of one launch are not ordered" in cross, cross
    warp = got["warp_handoff"]
    assert "warp_handoff_kernel" in warp and "on shared memory" in warp, warp
    atomic = got["atomic_vs_plain"]
    assert "atomically updates" in atomic or "atomically updated" in atomic, atomic


@needs_build
def test_kernel_tests_pass_under_the_race_checker(race_mod):
    """Every CUDA kernel test on the emulator with the checker on: masked BN (every layout, dtype,
    residual/ReLU case), MixUp batch and CE, the mask update, the schedule checks, the emulator's
    self-tests, and Purifier steps on the cuda backend."""
    files = ["tests/cuda_emu/test_emulator.py", "tests/cuda_emu/test_schedules.py", "tests/ops/test_mixup.py",
             "tests/ops/test_masked_bn.py", "tests/ops/test_mask_update.py", "tests/test_purifier_backends.py"]
    r = run_python(race_mod, ["-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", "cuda and not compile"],
                   timeout=1500, NFT_FAST_CUDA_EMU_RACECHECK="1")
    tail = r.stdout[-6000:] + "\n" + r.stderr[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail
