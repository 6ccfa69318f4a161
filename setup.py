"""Build: pure-Python package + Triton sources (kernels/ -> nft_fast.kernels) + the
pybind11 extension nft_fast._C compiled from csrc/ by CMake/Ninja.

Environment:
  NFT_FAST_NO_EXT=1          skip the extensions (the package runs on its torch backend)
  NFT_FAST_NO_CUDA=1         build only the C++ CPU kernels even if nvcc is present
  NFT_FAST_BUILD_CUDA_EMU=1  also build the test tool nft_fast._cuda_emu (same CMake run): the CUDA
                             kernels compiled for the CPU emulator (csrc/testing/cuda_emu/), which
                             the tests run them on without a GPU. Off by default: not part of the
                             product, so a plain install neither builds nor ships it.
A present compiler whose build fails is an error, not a silent fallback (the emulator included,
when asked for).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, optional: bool = False) -> None:
        super().__init__(name, sources=[], optional=optional)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


EMU = "nft_fast._cuda_emu"


def _skip_reason() -> str:
    if _flag("NFT_FAST_NO_EXT"):
        return "NFT_FAST_NO_EXT is set"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler found"
    return ""


class CMakeBuild(build_ext):
    def run(self) -> None:
        reason = _skip_reason()
        if reason:
            print(f"nft_fast: not building the C++/CUDA extension ({reason})", file=sys.stderr)
            self.extensions = []
            return
        super().run()

    def build_extension(self, ext: Extension) -> None:
        if ext.name == EMU:  # built by the CMake run of nft_fast._C, which runs first
            if not Path(self.get_ext_fullpath(ext.name)).exists():
                raise RuntimeError(f"NFT_FAST_BUILD_CUDA_EMU is set but {EMU} was not built (see the CMake log)")
            return
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DNFT_FAST_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if _flag("NFT_FAST_NO_CUDA"):
            args.append("-DNFT_FAST_NO_CUDA=ON")
        # Always passed (a reused CMake cache must not keep an earlier ON).
        args.append(f"-DNFT_FAST_BUILD_CUDA_EMU={'ON' if _flag('NFT_FAST_BUILD_CUDA_EMU') else 'OFF'}")
        if not _flag("NFT_FAST_BUILD_CUDA_EMU"):
            # An emulator module an earlier build left here (an editable install's package
            # directory, a reused build/lib) would be stale, and would be installed or shipped.
            for stale in out_dir.glob("_cuda_emu.*"):
                print(f"nft_fast: removing {stale} (NFT_FAST_BUILD_CUDA_EMU is not set)", file=sys.stderr)
                stale.unlink()
        nvcc = shutil.which("nvcc")
        if nvcc and "CUDACXX" not in os.environ:
            args.append(f"-DCMAKE_CUDA_COMPILER={os.path.realpath(nvcc)}")
        ninja = shutil.which("ninja")
        if ninja:
            # name it: a cached path from an earlier pip build environment (deleted since) would
            # break a rebuild in the same build folder
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    # _C first: its CMake run also builds _cuda_emu when asked, which setuptools then only copies.
    ext_modules=[CMakeExtension("nft_fast._C")] + ([CMakeExtension(EMU)] if _flag("NFT_FAST_BUILD_CUDA_EMU") else []),
    cmdclass={"build_ext": CMakeBuild},
)
