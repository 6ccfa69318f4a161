"""Races and uninitialised shared memory in the CUDA kernels (csrc/cuda/), checked on the CPU
emulator (csrc/testing/cuda_emu/): every kernel runs under the forward, reverse and two random block/thread
schedules and must give bit-identical results (they are deterministic by design: no atomics, fixed
reduction orders). A read and a write of one address by two threads (or blocks) between two
barriers gives a schedule-dependent result, and a read of shared memory the block never wrote
sees the poison the emulator fills it with at every block start.

The first tests plant such bugs in self-test kernels and check that they are seen; without a GPU
this is the only check for races CI has (it cannot see interleavings finer than one barrier
interval, or the memory model)."""
from contextlib import contextmanager

import pytest
import torch

from nft_fast import _build
from nft_fast.ops import mask_update as MU
from nft_fast.ops import masked_bn as MB
from nft_fast.ops import mixup as M
from tests.helpers.bn_cases import bn_inputs, bn_run
from tests.helpers.mixup_cases import ce_inputs, loss_and_grad

emu = pytest.importorskip("nft_fast._cuda_emu", reason=f"CUDA emulator module not built ({_build.EMU_BUILD_HINT})")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend runs on the GPU here, not the emulator")

SCHEDULES = [("reverse", 0), ("random", 1), ("random", 2)]
BF16 = torch.bfloat16


@contextmanager
def schedule(kind, seed=0):
    old = emu.schedule()
    emu.set_schedule(kind, seed)
    try:
        yield
    finally:
        emu.set_schedule(*old)


@contextmanager
def racecheck_off():
    """The planted races below are for the schedule checks: the race checker (on in
    tests/cuda_emu/test_racecheck.py's run of this file) would fail them at once."""
    on = emu.racecheck()
    emu.set_racecheck(False)
    try:
        yield
    finally:
        emu.set_racecheck(on)


def _bits(t):
    if t is None:
        return None
    t = t.detach().contiguous()
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]).clone()
    return t.clone()


def _flat(out):
    """Tensors of a nested tuple/dict result, as bit patterns (NaN-safe, -0 != +0)."""
    if isinstance(out, dict):
        return [x for k in sorted(out) for x in _flat(out[k])]
    if isinstance(out, (tuple, list)):
        return [x for o in out for x in _flat(o)]
    return [_bits(out)]


def assert_schedule_independent(run):
    with schedule("forward"):
        base = _flat(run())
    for kind, seed in SCHEDULES:
        with schedule(kind, seed):
            got = _flat(run())
        assert len(got) == len(base)
        for i, (a, b) in enumerate(zip(got, base)):
            assert (a is None) == (b is None)
            if a is not None and not torch.equal(a, b):
                n = int((a != b).sum())
                raise AssertionError(f"output {i} depends on the schedule ({kind}, seed {seed}): {n} of {a.numel()} "
                                     "elements differ from the forward schedule: a race in the kernel")


def p(t):
    return t.data_ptr()


# ----------------------------------------------------------------- the checks see planted bugs


def test_planted_shared_memory_race_is_seen():
    x = torch.arange(4 * 64, dtype=torch.float32)
    outs = {}
    for kind, seed in [("forward", 0)] + SCHEDULES:
        with schedule(kind, seed):
            outs[kind, seed] = _racy(x)
    fwd = outs["forward", 0].view(4, 64)
    # forward: thread t runs to its end before t+1 starts, so it reads t+1's slot unwritten (poison);
    # only the last thread reads slot 0, already written.
    assert torch.isnan(fwd[:, :-1]).all() and torch.equal(fwd[:, -1], x.view(4, 64)[:, 0])
    rev = outs["reverse", 0].view(4, 64)
    assert torch.equal(rev[:, :-1], x.view(4, 64)[:, 1:]), "reverse: every neighbour wrote first"
    assert not torch.equal(_bits(outs["random", 1]), _bits(outs["forward", 0]))
    with pytest.raises(AssertionError, match="depends on the schedule"):
        assert_schedule_independent(lambda: _racy(x))


def _racy(x):
    out = torch.zeros_like(x)
    with racecheck_off():
        emu.selftest.racy_neighbour(p(x), p(out), 4, 64)
    return out


def test_uninitialised_shared_memory_reads_poison():
    out = torch.zeros(2 * 64)
    emu.selftest.uninit_shared(p(out), 2, 64)
    assert torch.isnan(out).all(), "forward schedule: 0xff bytes (NaN) in every shared slot at block start"
    a, b = torch.zeros_like(out), torch.zeros_like(out)
    with schedule("random", 1):
        emu.selftest.uninit_shared(p(a), 2, 64)
    with schedule("random", 2):
        emu.selftest.uninit_shared(p(b), 2, 64)
    assert not torch.equal(_bits(a), _bits(b)), "random schedule: random poison, different per seed"


def test_cross_block_race_is_seen_and_schedule_is_reproducible():
    got = {}
    for kind, seed in [("forward", 0), ("reverse", 0), ("random", 5), ("random", 5), ("random", 6)]:
        last = torch.full((1,), -1, dtype=torch.int32)
        with schedule(kind, seed):
            for _ in range(3):  # the k-th launch after set_schedule replays the same order
                with racecheck_off():
                    emu.selftest.last_block(p(last), 40)
                got.setdefault((kind, seed), []).append(int(last))
    assert got["forward", 0] == [39] * 3 and got["reverse", 0] == [0] * 3
    r5, r6 = got["random", 5], got["random", 6]
    assert r5[:3] == r5[3:], "same seed: the same schedule"
    assert len(set(r5 + r6)) > 1, "random block orders"


def test_misaligned_vector_access_traps():
    """A GPU faults on a float4 load that is not 16-byte aligned; the emulator's CPU would not, so
    NFT_CHECK_ALIGNED (the masked-BN kernels' vector loads and stores use it) traps."""
    x = torch.arange(4 * 32 + 4, dtype=torch.float32)
    out = torch.zeros(32)
    emu.selftest.vec_load(p(x), 4, p(out), 32)
    assert torch.equal(out, x[4:].view(32, 4).sum(1))
    with pytest.raises(RuntimeError, match="misaligned address: a 16-byte vector access"):
        emu.selftest.vec_load(p(x), 1, p(out), 32)


def test_bad_schedule_name_raises():
    with pytest.raises(ValueError, match="expected forward, reverse or random"):
        emu.set_schedule("backwards")
    assert emu.schedule()[0] == "forward"


# ------------------------------------------------------------------------------ the kernels

BN_CASES = [
    ((7, 3), None, torch.float32),
    ((1030, 5), None, torch.float32),
    ((3, 130, 2, 2), torch.channels_last, torch.float32),
    ((16, 24, 12, 12), torch.channels_last, torch.float32),
    ((16, 24, 12, 12), None, torch.float32),
    ((16, 24, 12, 12), torch.channels_last, BF16),
    ((4, 3, 17, 16), None, BF16),
    ((2, 6, 3, 4, 5), torch.channels_last_3d, torch.float32),
]


@pytest.mark.parametrize("shape,fmt,dtype", BN_CASES, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_masked_bn_schedule_independent(shape, fmt, dtype, training):
    args = bn_inputs(shape, fmt, seed=sum(shape), dtype=dtype)
    grads = ("x", "m", "w", "b", "res")
    assert_schedule_independent(lambda: bn_run(MB.masked_batch_norm_cuda, *args, training=training, relu=True,
                                               use_res=True, grads=grads))


@pytest.mark.parametrize("shape,cl,out_dtype", [((33, 1, 28, 28), False, None), ((64, 3, 32, 32), True, BF16),
                                                ((3, 70, 9, 7), True, None), ((7, 3, 2, 5, 3), False, None)], ids=str)
def test_mixup_batch_schedule_independent(shape, cl, out_dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    perm = torch.randperm(shape[0], generator=g)
    lam = torch.tensor([0.37])
    assert_schedule_independent(lambda: M.mixup_batch_cuda(x, perm, lam, out_dtype, cl))


@pytest.mark.parametrize("B,K,dtype", [(128, 10, torch.float32), (33, 1000, torch.float32), (7, 37, BF16)])
def test_mixup_ce_schedule_independent(B, K, dtype):
    z, y, perm = ce_inputs(B, K, seed=B + K, dtype=dtype)
    assert_schedule_independent(lambda: loss_and_grad(M.mixup_cross_entropy_cuda, z, y, perm, 0.61, scale=0.5))


def test_mask_update_schedule_independent():
    g = torch.Generator().manual_seed(4)
    n = 20000
    mask0, grad, buf0 = torch.rand(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    floor = torch.full((n,), 0.05)

    def run():
        mask, buf = mask0.clone(), buf0.clone()
        MU.mask_update_cuda(mask, grad, buf, floor, torch.tensor([0.2]), 0.9, 1e-3)
        return mask, buf

    assert_schedule_independent(run)
