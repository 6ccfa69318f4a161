"""Build: pure-Python package + Triton sources (kernels/ -> nft_fast.kernels) + the
pybind11 extension nft_fast._C compiled from csrc/ by CMake/Ninja, and (same CMake run) the
CUDA emulator module nft_fast._cuda_emu: the CUDA kernels compiled for the CPU (csrc/emu/).

Environment:
  NFT_FAST_NO_EXT=1       skip the extensions (the package runs on its torch backend)
  NFT_FAST_NO_CUDA=1      build only the C++ CPU kernels even if nvcc is present
  NFT_FAST_NO_CUDA_EMU=1  do not build nft_fast._cuda_emu
A present compiler whose build fails is an error, not a silent fallback.
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


def _skip_reason() -> str:
    if os.environ.get("NFT_FAST_NO_EXT", "0") not in ("", "0"):
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
        if ext.name == "nft_fast._cuda_emu":  # built by the CMake run of nft_fast._C (optional)
            if not Path(self.get_ext_fullpath(ext.name)).exists():
                print("nft_fast: the CUDA emulator module was not built (see the CMake log)", file=sys.stderr)
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
        if os.environ.get("NFT_FAST_NO_CUDA", "0") not in ("", "0"):
            args.append("-DNFT_FAST_NO_CUDA=ON")
        if os.environ.get("NFT_FAST_NO_CUDA_EMU", "0") not in ("", "0"):
            args.append("-DNFT_FAST_NO_CUDA_EMU=ON")
        nvcc = shutil.which("nvcc")
        if nvcc and "CUDACXX" not in os.environ:
            args.append(f"-DCMAKE_CUDA_COMPILER={os.path.realpath(nvcc)}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    # _C first: its CMake run also builds _cuda_emu, which setuptools then only copies (when present).
    ext_modules=[CMakeExtension("nft_fast._C"), CMakeExtension("nft_fast._cuda_emu", optional=True)],
    cmdclass={"build_ext": CMakeBuild},
)
