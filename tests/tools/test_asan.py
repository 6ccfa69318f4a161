"""The C++ kernels (csrc/cpu/) and the CUDA kernels (csrc/cuda/, on the emulator) under
AddressSanitizer.

Builds nft_fast._C (C++ only, nvcc off) and the emulator module nft_fast._cuda_emu once more with
-fsanitize=address, and reruns their kernel tests in a subprocess preloaded with libasan, which
loads those builds in place of the installed ones (tests/conftest.py: NFT_TEST_C_SO,
NFT_TEST_CUDA_EMU_SO). Every tensor torch allocates on the CPU then has ASan redzones, so a kernel
that reads or writes past a tensor's end (or into freed memory, or its own stack frame's
neighbours) fails the run: on a GPU the same access is an illegal-address fault or silently wrong
data, on the CPU heap corruption. A deliberate read one past the end is checked to be reported,
so the check is live.

Not seen: accesses that stay inside some allocation (a wrong index into the right tensor: the
value tests catch those), and anything the emulator does not model (tests/cuda_emu/test_emulator.py).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nft_fast import _build
from tests.helpers.ext_build import cmake_build, load_module_snippet, run_python

CXX = shutil.which("c++") or shutil.which("g++")


def _lib(name):
    if not CXX:
        return None
    out = subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


# libstdc++ preloaded too: Python does not link it, and ASan's __cxa_throw interceptor needs the
# real one loaded when ASan starts (else the first C++ exception aborts the process).
LIBASAN, LIBSTDCXX = _lib("libasan.so"), _lib("libstdc++.so.6")
pytestmark = [
    pytest.mark.skipif(not _build.cuda_emu_built(), reason=f"the CUDA emulator test tool is off here ({_build.EMU_BUILD_HINT})"),
    pytest.mark.skipif(not (LIBASAN and LIBSTDCXX and shutil.which("cmake")),
                       reason="needs a C++ compiler with libasan, and cmake"),
    pytest.mark.skipif(bool(os.environ.get("NFT_TEST_CUDA_EMU_SO")), reason="already inside the ASan run"),
]


@pytest.fixture(scope="module")
def asan_mods(tmp_path_factory):
    """Paths of AddressSanitizer builds of nft_fast._C (C++ kernels only) and nft_fast._cuda_emu."""
    return cmake_build(tmp_path_factory.mktemp("asan"), ["_C", "_cuda_emu"],
                       ["-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DCMAKE_CXX_FLAGS=-fsanitize=address -fno-omit-frame-pointer",
                        "-DCMAKE_MODULE_LINKER_FLAGS=-fsanitize=address"])


def _run(mods, argv, timeout, log_dir):
    """``argv`` in a Python preloaded with ASan on the modules ``mods``; ASan's reports, which
    pytest's output capture would swallow when ASan kills the process, go to files in ``log_dir``."""
    r = run_python(mods, argv, timeout, LD_PRELOAD=f"{LIBASAN} {LIBSTDCXX}",
                   # torch and Python leak by design at exit; the fibers switch stacks (annotated)
                   ASAN_OPTIONS=f"detect_leaks=0:detect_stack_use_after_return=0:log_path={log_dir}/asan")
    # (a warning alone, e.g. on the ucontext fallback test's swapcontext, is no report)
    reports = [f.read_text(errors="replace") for f in sorted(Path(log_dir).glob("asan*"))]
    return r, "".join(t for t in reports if "ERROR: AddressSanitizer" in t or "CHECK failed" in t)


OOB = load_module_snippet() + """
x, out = torch.arange(64, dtype=torch.float32), torch.zeros(1)
m.selftest.oob_read(x.data_ptr(), 63, out.data_ptr())
print("in bounds:", float(out), flush=True)
m.selftest.oob_read(x.data_ptr(), 64, out.data_ptr())
print("not reported", flush=True)
"""


def test_asan_reports_a_kernel_reading_past_a_tensor(asan_mods, tmp_path):
    r, reports = _run(asan_mods, ["-c", OOB], timeout=300, log_dir=tmp_path)
    assert "in bounds: 63.0" in r.stdout, r.stdout + r.stderr[-3000:] + reports[-3000:]
    assert r.returncode != 0 and "not reported" not in r.stdout
    assert "heap-buffer-overflow" in reports and "oob_read_kernel" in reports, reports[-3000:]


def test_kernel_tests_pass_under_asan(asan_mods, tmp_path):
    """The C++ and CUDA kernel tests (kernels, schedules, emulator self-tests) under ASan; not the
    torch.compile ones (inductor's own generated code is not ours, and slow under ASan)."""
    files = ["tests/cuda_emu/test_emulator.py", "tests/cuda_emu/test_schedules.py", "tests/ops/test_mixup.py",
             "tests/ops/test_masked_bn.py", "tests/ops/test_mask_update.py"]
    # masked BN's and MixUp's C++/CUDA tests, not their triton ones (the interpreter runs no native code
    # of ours); test_mask_update.py whole
    r, reports = _run(asan_mods, ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files,
                                  "-k", "not compile and (not triton or mask_update)"], timeout=1500, log_dir=tmp_path)
    # the report's first lines name the access, the kernel and the tensor's allocation
    assert not reports, "AddressSanitizer:\n" + "\n".join(ln for ln in reports.splitlines()[:60]
                                                             if not ln.startswith("  0x"))
    tail = r.stdout[-4000:] + "\n" + r.stderr[-4000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail
