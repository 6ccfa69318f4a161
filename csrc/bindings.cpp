// pybind11 module nft_fast._C. Tensors cross as raw device pointers (and the CUDA stream as
// an integer) so the module does not link libtorch: it builds in seconds and does not
// depend on the torch ABI of the machine it runs on. Python validates shapes/dtypes.
#include <cstdint>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda/bind_cuda.h"
#include "mask_update.h"
#include "masked_bn.h"
#include "mixup.h"

namespace py = pybind11;

template <typename T>
static T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "nft_fast C++/CUDA kernels";
  mod.def("has_cuda", []() {
#ifdef NFT_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  mod.def("has_openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
  mod.def("cuda_archs", []() {
    std::vector<std::string> out;
#ifdef NFT_FAST_CUDA_ARCHS
    out.push_back(NFT_FAST_CUDA_ARCHS);
#endif
    return out;
  });
  mod.def(
      "mask_update_f32",
      [](std::uintptr_t m, std::uintptr_t g, std::uintptr_t buf, std::uintptr_t floor, int64_t n, float lr,
         float momentum, float reg_scale) {
        py::gil_scoped_release nogil;
        nft_fast::mask_update_f32_cpu(ptr<float>(m), ptr<const float>(g), ptr<float>(buf), ptr<const float>(floor), n,
                                      lr, momentum, reg_scale);
      },
      py::arg("mask"), py::arg("grad"), py::arg("buf"), py::arg("floor"), py::arg("n"), py::arg("lr"),
      py::arg("momentum"), py::arg("reg_scale"));
  // Masked BatchNorm on the CPU, fp32 or bf16 activations (csrc/masked_bn.h); a pointer of 0 is an
  // absent optional tensor.
  mod.def(
      "masked_bn_fwd_cpu",
      [](std::uintptr_t x, std::uintptr_t res, std::uintptr_t w, std::uintptr_t m, std::uintptr_t b, std::uintptr_t y,
         std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t uvar, int64_t N, int64_t C, int64_t S, bool rows_c,
         bool training, float eps, bool relu, bool bf16) {
        py::gil_scoped_release nogil;
        nft_fast::masked_bn_fwd_cpu(ptr<const void>(x), ptr<const void>(res), ptr<const float>(w),
                                    ptr<const float>(m), ptr<const float>(b), ptr<void>(y), ptr<float>(mean),
                                    ptr<float>(rstd), ptr<float>(uvar), N, C, S, rows_c, training, eps, relu, bf16);
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("mask"), py::arg("bias"), py::arg("y"),
      py::arg("mean"), py::arg("rstd"), py::arg("uvar"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("rows_c"),
      py::arg("training"), py::arg("eps"), py::arg("relu"), py::arg("bf16"));
  mod.def(
      "masked_bn_bwd_cpu",
      [](std::uintptr_t dy, std::uintptr_t x, std::uintptr_t y, std::uintptr_t w, std::uintptr_t m,
         std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dx, std::uintptr_t dres, std::uintptr_t dw,
         std::uintptr_t db, std::uintptr_t dm, int64_t N, int64_t C, int64_t S, bool rows_c, bool training,
         bool relu, bool bf16) {
        py::gil_scoped_release nogil;
        nft_fast::masked_bn_bwd_cpu(ptr<const void>(dy), ptr<const void>(x), ptr<const void>(y), ptr<const float>(w),
                                    ptr<const float>(m), ptr<const float>(mean), ptr<const float>(rstd),
                                    ptr<void>(dx), ptr<void>(dres), ptr<float>(dw), ptr<float>(db), ptr<float>(dm),
                                    N, C, S, rows_c, training, relu, bf16);
      },
      py::arg("dy"), py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("mask"), py::arg("mean"),
      py::arg("rstd"), py::arg("dx"), py::arg("dres"), py::arg("dweight"), py::arg("dbias"), py::arg("dmask"),
      py::arg("N"), py::arg("C"), py::arg("S"), py::arg("rows_c"), py::arg("training"), py::arg("relu"),
      py::arg("bf16"));
  // MixUp, CPU (csrc/mixup.h): fp32/bf16 storage, int64/int32 perm; a bad index raises IndexError.
  mod.def(
      "mixup_batch",
      [](std::uintptr_t x, bool x_bf16, std::uintptr_t perm, bool perm_i32, std::uintptr_t out, bool out_bf16,
         int64_t B, int64_t R, int64_t Q, bool transpose, float lam, float oml) {
        py::gil_scoped_release nogil;
        nft_fast::mixup_batch_cpu(ptr<const void>(x), x_bf16, ptr<const void>(perm), perm_i32, ptr<void>(out),
                                  out_bf16, B, R, Q, transpose, lam, oml);
      },
      py::arg("x"), py::arg("x_bf16"), py::arg("perm"), py::arg("perm_i32"), py::arg("out"), py::arg("out_bf16"),
      py::arg("B"), py::arg("R"), py::arg("Q"), py::arg("transpose"), py::arg("lam"), py::arg("oml"));
  mod.def(
      "mixup_ce_fwd",
      [](std::uintptr_t z, bool z_bf16, std::uintptr_t y, std::uintptr_t perm, bool perm_i32, std::uintptr_t dlogits,
         std::uintptr_t loss, int64_t B, int64_t K, double lam, double oml) {
        py::gil_scoped_release nogil;
        nft_fast::mixup_ce_fwd_cpu(ptr<const void>(z), z_bf16, ptr<const int64_t>(y), ptr<const void>(perm), perm_i32,
                                   ptr<float>(dlogits), ptr<float>(loss), B, K, lam, oml);
      },
      py::arg("z"), py::arg("z_bf16"), py::arg("y"), py::arg("perm"), py::arg("perm_i32"), py::arg("dlogits"),
      py::arg("loss"), py::arg("B"), py::arg("K"), py::arg("lam"), py::arg("oml"));
#ifdef NFT_FAST_WITH_CUDA
  // The CUDA host launchers (csrc/cuda/bind_cuda.cpp; also bound in nft_fast._cuda_emu).
  nft_fast::bind_cuda(mod);
#endif
}
