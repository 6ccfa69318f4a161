// pybind11 bindings of every CUDA host launcher (csrc/cuda/*.cu). The same file builds into
// nft_fast._C (launchers compiled by nvcc; device pointers, the CUDA stream as an integer) and
// into nft_fast._cuda_emu (launchers compiled as C++ for the CPU emulator; CPU pointers, stream 0).
// Python validates shapes/dtypes/devices; tensors cross as raw pointers (std::uintptr_t).
#include "bind_cuda.h"

#include <cstdint>

#include "../mask_update.h"
#include "../masked_bn.h"
#include "../mixup.h"

namespace py = pybind11;

namespace nft_fast {
namespace {
template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
}  // namespace

void bind_cuda(py::module_& m) {
  // --- mask_update (csrc/cuda/mask_update.cu)
  m.def(
      "mask_update_cuda_f32",
      [](std::uintptr_t mask, std::uintptr_t g, std::uintptr_t buf, std::uintptr_t floor, int64_t n,
         std::uintptr_t lr_ptr, float lr, float momentum, float reg_scale, std::uintptr_t stream) {
        mask_update_f32_cuda(ptr<float>(mask), ptr<const float>(g), ptr<float>(buf), ptr<const float>(floor), n,
                             ptr<const float>(lr_ptr), lr, momentum, reg_scale, stream);
      },
      py::arg("mask"), py::arg("grad"), py::arg("buf"), py::arg("floor"), py::arg("n"), py::arg("lr_ptr"),
      py::arg("lr"), py::arg("momentum"), py::arg("reg_scale"), py::arg("stream"));

  // --- masked_bn (csrc/cuda/masked_bn.cu); a pointer of 0 is an absent optional tensor.
  m.def(
      "masked_bn_cuda_plan",
      [](int64_t N, int64_t C, int64_t S, bool rows_c, int sms) {
        const MaskedBnPlan p = masked_bn_cuda_plan(N, C, S, rows_c, sms);
        return py::make_tuple(p.chunks, p.per_chunk, p.workspace);
      },
      py::arg("N"), py::arg("C"), py::arg("S"), py::arg("rows_c"), py::arg("sms"));
  m.def(
      "masked_bn_fwd_cuda",
      [](std::uintptr_t x, std::uintptr_t res, std::uintptr_t w, std::uintptr_t mk, std::uintptr_t b, std::uintptr_t y,
         std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t uvar, std::uintptr_t ws, int64_t N, int64_t C,
         int64_t S, bool rows_c, bool training, float eps, bool relu, bool bf16, int sms, std::uintptr_t stream) {
        masked_bn_fwd_cuda(ptr<const void>(x), ptr<const void>(res), ptr<const float>(w), ptr<const float>(mk),
                           ptr<const float>(b), ptr<void>(y), ptr<float>(mean), ptr<float>(rstd), ptr<float>(uvar),
                           ptr<float>(ws), N, C, S, rows_c, training, eps, relu, bf16, sms, stream);
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("mask"), py::arg("bias"), py::arg("y"),
      py::arg("mean"), py::arg("rstd"), py::arg("uvar"), py::arg("workspace"), py::arg("N"), py::arg("C"),
      py::arg("S"), py::arg("rows_c"), py::arg("training"), py::arg("eps"), py::arg("relu"), py::arg("bf16"),
      py::arg("sms"), py::arg("stream"));
  m.def(
      "masked_bn_bwd_cuda",
      [](std::uintptr_t dy, std::uintptr_t x, std::uintptr_t y, std::uintptr_t w, std::uintptr_t mk,
         std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dx, std::uintptr_t dres, std::uintptr_t dw,
         std::uintptr_t db, std::uintptr_t dm, std::uintptr_t ws, int64_t N, int64_t C, int64_t S, bool rows_c,
         bool training, bool relu, bool bf16, int sms, std::uintptr_t stream) {
        masked_bn_bwd_cuda(ptr<const void>(dy), ptr<const void>(x), ptr<const void>(y), ptr<const float>(w),
                           ptr<const float>(mk), ptr<const float>(mean), ptr<const float>(rstd), ptr<void>(dx),
                           ptr<void>(dres), ptr<float>(dw), ptr<float>(db), ptr<float>(dm), ptr<float>(ws), N, C, S,
                           rows_c, training, relu, bf16, sms, stream);
      },
      py::arg("dy"), py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("mask"), py::arg("mean"),
      py::arg("rstd"), py::arg("dx"), py::arg("dres"), py::arg("dweight"), py::arg("dbias"), py::arg("dmask"),
      py::arg("workspace"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("rows_c"), py::arg("training"),
      py::arg("relu"), py::arg("bf16"), py::arg("sms"), py::arg("stream"));

  // --- mixup (csrc/cuda/mixup.cu); lam_ptr 0: use lam / one_minus.
  m.def(
      "mixup_batch_cuda",
      [](std::uintptr_t x, bool x_bf16, std::uintptr_t perm, std::uintptr_t lam_ptr, float lam, float one_minus,
         std::uintptr_t out, bool out_bf16, int64_t B, int64_t C, int64_t S, bool channels_last, int sms,
         std::uintptr_t stream) {
        mixup_batch_cuda(ptr<const void>(x), x_bf16, ptr<const int64_t>(perm), ptr<const float>(lam_ptr), lam,
                         one_minus, ptr<void>(out), out_bf16, B, C, S, channels_last, sms, stream);
      },
      py::arg("x"), py::arg("x_bf16"), py::arg("perm"), py::arg("lam_ptr"), py::arg("lam"), py::arg("one_minus"),
      py::arg("out"), py::arg("out_bf16"), py::arg("B"), py::arg("C"), py::arg("S"), py::arg("channels_last"),
      py::arg("sms"), py::arg("stream"));
  m.def(
      "mixup_ce_fwd_cuda",
      [](std::uintptr_t logits, bool bf16, std::uintptr_t y, std::uintptr_t perm, std::uintptr_t lam_ptr, float lam,
         float one_minus, int64_t B, int64_t K, std::uintptr_t dlogits, std::uintptr_t row_loss, std::uintptr_t loss,
         std::uintptr_t stream) {
        mixup_ce_fwd_cuda(ptr<const void>(logits), bf16, ptr<const int64_t>(y), ptr<const int64_t>(perm),
                          ptr<const float>(lam_ptr), lam, one_minus, B, K, ptr<float>(dlogits), ptr<float>(row_loss),
                          ptr<float>(loss), stream);
      },
      py::arg("logits"), py::arg("bf16"), py::arg("y"), py::arg("perm"), py::arg("lam_ptr"), py::arg("lam"),
      py::arg("one_minus"), py::arg("B"), py::arg("K"), py::arg("dlogits"), py::arg("row_loss"), py::arg("loss"),
      py::arg("stream"));
}

}  // namespace nft_fast
