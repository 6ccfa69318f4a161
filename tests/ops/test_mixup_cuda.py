"""MixUp ops: the cuda backend (csrc/cuda/mixup.cu) against the torch oracle, on a GPU or, without
one, on the CPU emulator (NFT_FAST_CUDA_EMU=1, conftest): the batch bit-equal, the CE loss and
gradient within a few fp32 ulps."""
import pytest
import torch

from test_mixup_cpp import BATCH_DTYPES, BATCH_SHAPES, _ce_close, _ce_inputs, _loss_and_grad, _same, compile_fullgraph_check  # noqa: E402,E501

import nft_fast
from nft_fast import ops
from nft_fast.ops import mixup as M

pytestmark = pytest.mark.skipif(not ops.backend_available("cuda"), reason="no CUDA device and no emulator")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16 = torch.bfloat16


@pytest.mark.parametrize("shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("in_dtype,out_dtype", BATCH_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_bit_equal_to_oracle(shape, in_dtype, out_dtype, channels_last):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(DEV, in_dtype)
    x[0].view(-1)[0] = float("inf")
    perm = torch.randperm(shape[0], generator=g).to(DEV)
    got = M.mixup_batch_cuda(x, perm, 0.3719, out_dtype, channels_last)
    _same(got, M.mixup_batch_torch(x, perm, 0.3719, out_dtype, channels_last))


@pytest.mark.parametrize("shape", [(7, 3, 5, 6), (3, 70, 9, 7), (2, 3, 2, 5, 3)], ids=str)
def test_batch_channels_last_and_strided_input(shape):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).to(DEV)
    perm = torch.randperm(shape[0], generator=g).to(DEV)
    for xin in (x.contiguous(memory_format=M.channels_last_format(x.dim(), True)), x.transpose(2, 3)):
        for cl in (False, True):
            _same(M.mixup_batch_cuda(xin, perm, 0.81, BF16, cl), M.mixup_batch_torch(xin, perm, 0.81, BF16, cl))


@pytest.mark.parametrize("lam", [0.0, 1.0, 0.6283, "tensor", "tensor_f64"])
def test_batch_lam_values_and_device_lam(lam):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 3, 4, 5, generator=g).to(DEV)
    perm = torch.randperm(9, generator=g).to(DEV)
    lv = {"tensor": torch.tensor([0.6283], device=DEV),
          "tensor_f64": torch.tensor(0.1875, dtype=torch.float64, device=DEV)}.get(lam, lam)
    got = M.mixup_batch_cuda(x, perm, lv, channels_last=True)
    _same(got, M.mixup_batch_torch(x, perm, lv, channels_last=True))
    if lam == "tensor":  # read on the device at run time: a new value in place gives a new batch
        lv.fill_(0.25)
        _same(M.mixup_batch_cuda(x, perm, lv, channels_last=True),
              M.mixup_batch_torch(x, perm, torch.tensor([0.25], device=DEV), channels_last=True))


def test_batch_int32_perm_other_dtypes_and_bad_input():
    x = torch.randn(5, 3, 2, 2, device=DEV)
    perm = torch.randperm(5).to(DEV)
    _same(M.mixup_batch_cuda(x, perm.int(), 0.3, BF16, True), M.mixup_batch_torch(x, perm, 0.3, BF16, True))
    for dt, od in ((torch.float64, None), (torch.float16, None), (torch.float32, torch.float16)):
        _same(M.mixup_batch_cuda(x.to(dt), perm, 0.2, od, True), M.mixup_batch_torch(x.to(dt), perm, 0.2, od, True))
    with pytest.raises(ValueError, match="perm has shape"):
        M.mixup_batch_cuda(x, perm[:4], 0.5)
    with pytest.raises(ValueError, match="requires grad"):
        M.mixup_batch_cuda(x.clone().requires_grad_(), perm, 0.5)


@pytest.mark.parametrize("B", [1, 7, 33, 128])
@pytest.mark.parametrize("K", [1, 10, 37, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_ce_matches_oracle(B, K, dtype):
    z, y, perm = (t.to(DEV) for t in _ce_inputs(B, K, seed=B * K, dtype=dtype))
    _ce_close(_loss_and_grad(M.mixup_cross_entropy_cuda, z, y, perm, 0.3719),
              _loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.3719), B, dtype)


@pytest.mark.parametrize("lam", [0.0, 1.0, "tensor"])
def test_ce_lam_identity_perm_masked_classes_and_scale(lam):
    z, y, perm = (t.to(DEV) for t in _ce_inputs(33, 12, seed=7))
    z[:, 11] = float("-inf")
    y = y.clamp(max=10)
    lv = torch.tensor([0.3], device=DEV) if lam == "tensor" else lam
    for p in (perm, torch.arange(33, device=DEV)):
        _ce_close(_loss_and_grad(M.mixup_cross_entropy_cuda, z, y, p, lv, scale=-2.5),
                  _loss_and_grad(M.mixup_cross_entropy_torch, z, y, p, lv, scale=-2.5), 33 / 2.5)


def test_ce_deterministic_no_grad_and_fallbacks():
    z, y, perm = (t.to(DEV) for t in _ce_inputs(128, 1000, seed=10))
    a = M.mixup_cross_entropy_cuda(z, y, perm, 0.37)
    with torch.no_grad():
        b = M.mixup_cross_entropy_cuda(z.requires_grad_(), y, perm, 0.37)
    assert torch.equal(a, b) and not b.requires_grad, "row losses are reduced in a fixed order"
    z64 = z.detach().double()
    assert torch.equal(M.mixup_cross_entropy_cuda(z64, y, perm, 0.3), M.mixup_cross_entropy_torch(z64, y, perm, 0.3))


def test_opcheck():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 3, 4, 6, generator=g).to(DEV)
    perm = torch.randperm(5, generator=g).to(DEV)
    op = torch.ops.nft_fast.mixup_batch_cuda.default
    torch.library.opcheck(op, (x, perm, None, 0.3, BF16, True))
    torch.library.opcheck(op, (x, perm, torch.tensor([0.3], device=DEV), 0.0, torch.float32, False))
    z, y, perm = (t.to(DEV) for t in _ce_inputs(7, 37, seed=14))
    fwd = torch.ops.nft_fast.mixup_ce_cuda_fwd.default
    torch.library.opcheck(fwd, (z.requires_grad_(), y, perm, None, 0.3))
    torch.library.opcheck(fwd, (z.detach().bfloat16().requires_grad_(), y, perm, torch.tensor([0.9], device=DEV), 0.0))


@pytest.mark.parametrize("lam", [0.37, "tensor"])
def test_dispatch_and_compile_fullgraph(lam):
    with nft_fast.use_backend("cuda"):
        assert ops.resolved_backend("mixup_batch", DEV) == "cuda"
        assert ops.resolved_backend("mixup_ce", DEV) == "cuda"
    compile_fullgraph_check(M.mixup_batch_cuda, M.mixup_cross_entropy_cuda,
                            torch.tensor(0.37, device=DEV) if lam == "tensor" else lam, DEV)
