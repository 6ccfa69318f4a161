// pybind11 module nft_fast._cuda_emu: the CUDA host launchers of csrc/cuda/*.cu compiled as C++
// and run on the CPU by the emulator (cuda_emu.h), with the same Python interface as in
// nft_fast._C (bind_cuda), plus the emulator's own self-test launchers.
#include <cstdint>
#include <string>

#include <pybind11/pybind11.h>

#include "../../cuda/bind_cuda.h"
#include "cuda_emu.h"
#include "selftest.h"

namespace py = pybind11;

namespace {
template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
}  // namespace

PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "nft_fast CUDA kernels on the CPU emulator (csrc/testing/cuda_emu): a test tool for CI without a GPU";
  nft_fast::bind_cuda(m);
  m.def("switch_backend", []() { return std::string(nft_emu::detail::switch_backend()); },
        "fiber context switch in use: 'asm-x86_64' or 'ucontext'");
  m.def("launch_count", []() { return nft_emu::detail::launch_count(); });
  m.def("set_schedule", [](const std::string& kind, unsigned long long seed) { nft_emu::detail::set_schedule(kind.c_str(), seed); },
        py::arg("kind"), py::arg("seed") = 0,
        "order of blocks and fibers in later launches: 'forward' (default), 'reverse' or 'random' (seeded); "
        "a deterministic kernel gives bit-identical results under each");
  m.def("racecheck_available", []() { return nft_emu::detail::racecheck_available(); },
        "whether this build has the data-race checker (CMake option NFT_FAST_CUDA_EMU_RACECHECK=ON)");
  m.def("set_racecheck", [](bool on) { nft_emu::detail::set_racecheck(on); }, py::arg("on"),
        "check later launches for data races (racecheck builds; also NFT_FAST_CUDA_EMU_RACECHECK=1): "
        "a launch with a race raises RuntimeError naming both accesses");
  m.def("racecheck", []() { return nft_emu::detail::racecheck(); }, "whether the race checker is on");
  m.def("schedule", []() { return py::make_tuple(std::string(nft_emu::detail::schedule()), nft_emu::detail::schedule_seed()); },
        "(kind, seed) of the current schedule");

  namespace st = nft_fast::emu_selftest;
  py::module_ t = m.def_submodule("selftest", "emulator self-test kernels (tests/cuda_emu/test_emulator.py)");
  t.def("block_sum", [](std::uintptr_t x, std::uintptr_t out, int n, int blocks, int bx, int by) {
    st::block_sum(ptr<const float>(x), ptr<float>(out), n, blocks, bx, by);
  });
  t.def("shfl_probe", [](std::uintptr_t x, std::uintptr_t out, bool is64, int threads, int mode, int arg, int width) {
    st::shfl_probe(ptr<const void>(x), ptr<void>(out), is64, threads, mode, arg, width);
  });
  t.def("warp_sums", [](std::uintptr_t x, std::uintptr_t ox, std::uintptr_t od, int n, int blocks, int threads) {
    st::warp_sums(ptr<const float>(x), ptr<float>(ox), ptr<float>(od), n, blocks, threads);
  });
  t.def("votes", [](std::uintptr_t pred, std::uintptr_t ballot, std::uintptr_t all, std::uintptr_t any,
                    std::uintptr_t red, std::uintptr_t bcount, std::uintptr_t band, std::uintptr_t bor, int threads) {
    st::votes(ptr<const int>(pred), ptr<unsigned>(ballot), ptr<int>(all), ptr<int>(any), ptr<int>(red),
              ptr<int>(bcount), ptr<int>(band), ptr<int>(bor), threads);
  });
  t.def("half_masks", [](std::uintptr_t x, std::uintptr_t out, int threads) {
    st::half_masks(ptr<const int>(x), ptr<int>(out), threads);
  });
  t.def("atomics", [](std::uintptr_t x, int n, std::uintptr_t fsum, std::uintptr_t icount, std::uintptr_t imax,
                      std::uintptr_t usum, std::uintptr_t dsum, int blocks, int threads) {
    st::atomics(ptr<const float>(x), n, ptr<float>(fsum), ptr<int>(icount), ptr<int>(imax),
                ptr<unsigned long long>(usum), ptr<double>(dsum), blocks, threads);
  });
  t.def("bf16_roundtrip", [](std::uintptr_t x, std::uintptr_t bits, std::uintptr_t back, std::uintptr_t bits2,
                             std::uintptr_t back2, int n) {
    st::bf16_roundtrip(ptr<const float>(x), ptr<std::uint16_t>(bits), ptr<float>(back), ptr<std::uint16_t>(bits2),
                       ptr<float>(back2), n);
  });
  t.def("barrier_bench", [](std::uintptr_t out, int blocks, int threads, int barriers) {
    py::gil_scoped_release nogil;
    st::barrier_bench(ptr<float>(out), blocks, threads, barriers);
  });
  t.def("template_launches", [](std::uintptr_t y, std::uintptr_t x, int n) {
    st::template_launches(ptr<float>(y), ptr<const float>(x), n);
  });
  t.def("math", [](std::uintptr_t in, std::uintptr_t out) { st::math(ptr<const float>(in), ptr<float>(out)); });
  t.def("config_launch", [](int blocks, int threads) { st::config_launch(blocks, threads); });
  t.def("deadlock_shfl_vs_sync", [](std::uintptr_t out, int threads) { st::deadlock_shfl_vs_sync(ptr<float>(out), threads); });
  t.def("shfl_after_exit", [](std::uintptr_t x, std::uintptr_t out, int n, int threads) {
    st::shfl_after_exit(ptr<const float>(x), ptr<float>(out), n, threads);
  });
  t.def("divergent_sync", [](std::uintptr_t out, int threads) { st::divergent_sync(ptr<float>(out), threads); });
  t.def("racy_neighbour", [](std::uintptr_t x, std::uintptr_t out, int blocks, int threads) {
    st::racy_neighbour(ptr<const float>(x), ptr<float>(out), blocks, threads);
  });
  t.def("uninit_shared", [](std::uintptr_t out, int blocks, int threads) { st::uninit_shared(ptr<float>(out), blocks, threads); });
  t.def("oob_read", [](std::uintptr_t x, int n, std::uintptr_t out) { st::oob_read(ptr<const float>(x), n, ptr<float>(out)); });
  t.def("vec_load", [](std::uintptr_t x, int off, std::uintptr_t out, int threads) {
    st::vec_load(ptr<const float>(x), off, ptr<float>(out), threads);
  });
  t.def("last_block", [](std::uintptr_t last, int blocks) { st::last_block(ptr<int>(last), blocks); });
  t.def("warp_handoff", [](std::uintptr_t x, std::uintptr_t out, bool sync) {
    st::warp_handoff(ptr<const float>(x), ptr<float>(out), sync);
  });
  t.def("atomic_vs_plain", [](std::uintptr_t p, int threads, bool plain) { st::atomic_vs_plain(ptr<int>(p), threads, plain); });
  t.def("trap_kernel", [](int threads) { st::trap_kernel(threads); });
}
