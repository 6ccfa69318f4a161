"""The CUDA emulator (nft_fast._cuda_emu, csrc/testing/cuda_emu/): the CUDA kernels compiled as C++
and run on the CPU with fibers as CUDA threads, so CI (no GPU) tests the kernels' logic. A test tool,
built only on request (NFT_FAST_BUILD_CUDA_EMU=1 at install time; .ci/setup asks for it).

Self-test kernels (csrc/testing/cuda_emu/selftest.cu) check the emulated primitives against independent
expectations written here from the CUDA documentation: shared-memory block reductions with
__syncthreads, every shuffle variant (width, partial warps), votes, atomics, bf16 rounding
(bit-exact vs torch), launch forms and configuration errors, and that broken kernels raise
(deadlock, divergent __syncthreads, __trap) instead of hanging.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from tests.helpers.ext_build import load_module_snippet

import nft_fast
from nft_fast import _build, ops


def _off(var):
    return os.environ.get(var, "0") not in ("", "0")


@pytest.mark.skipif(_off("NFT_FAST_NO_EXT") or not _off("NFT_FAST_BUILD_CUDA_EMU") or not shutil.which("c++"),
                    reason="the emulator is built on request (NFT_FAST_BUILD_CUDA_EMU=1), not asked for here")
def test_emulator_module_was_built():
    """When this environment asks for the emulator, the installed build has it."""
    info = nft_fast.build_info()
    assert info["cuda_emu_built"], info["cuda_emu_error"]
    assert info["cuda_emu_enabled"] == _build.cuda_emu_requested()


emu = pytest.importorskip("nft_fast._cuda_emu", reason=f"CUDA emulator module not built ({_build.EMU_BUILD_HINT})")
st = emu.selftest


def p(t):
    return t.data_ptr()


def ints(n, lo, hi, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n,), generator=g).to(dtype)


# --------------------------------------------------------------------------- block level


@pytest.mark.parametrize("n,blocks,bx,by", [(10_000, 3, 256, 1), (5000, 2, 16, 8), (3000, 1, 1024, 1), (7, 4, 32, 1)])
def test_block_sum_shared_memory_tree(n, blocks, bx, by):
    x = ints(n, -8, 9, seed=n)  # small integers: every order of summation is exact
    out = torch.full((blocks,), float("nan"))
    st.block_sum(p(x), p(out), n, blocks, bx, by)
    nt = bx * by
    block_of = (torch.arange(n) // nt) % blocks  # grid-stride loop: chunk c of nt goes to block c % blocks
    want = torch.zeros(blocks).index_add_(0, block_of, x)
    assert torch.equal(out, want)


def test_barriers_many_blocks_and_launch_overhead():
    blocks, threads, barriers = 64, 256, 8
    out = torch.empty(blocks * threads)
    st.barrier_bench(p(out), blocks, threads, barriers)  # warm: stacks mapped, pages touched
    v = torch.arange(threads, dtype=torch.float32)
    for _ in range(barriers // 2):
        v = v + torch.roll(v, -1)  # v_t += v_{t+1}: reads what the neighbour wrote before the barrier
    assert torch.equal(out.view(blocks, threads), v.expand(blocks, threads))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        st.barrier_bench(p(out), blocks, threads, barriers)
        best = min(best, time.perf_counter() - t0)
    # a guard against pathological launch/barrier costs (threads created per launch: seconds), not a
    # benchmark: loose enough for a loaded 2-core machine and for the race checker's instrumentation
    limit = 1.0 if os.environ.get("NFT_FAST_CUDA_EMU_RACECHECK") else 0.25
    assert best < limit, f"64 blocks x 256 threads x 8 barriers took {best * 1e3:.1f} ms"


@pytest.mark.parametrize("threads", [32, 80, 1024])
def test_votes_and_syncthreads_reductions(threads):
    g = torch.Generator().manual_seed(threads)
    pred = (torch.rand(threads, generator=g) < 0.5).to(torch.int32)
    if threads == 32:
        pred.fill_(1)  # __all_sync / __syncthreads_and true
    outs = [torch.full((threads,), -7, dtype=torch.int32) for _ in range(7)]
    st.votes(p(pred), *(p(o) for o in outs), threads)
    ballot, all_, any_, red, bcount, band, bor = outs
    for t in range(threads):
        w0 = t - t % 32
        lanes = pred[w0:min(w0 + 32, threads)].tolist()
        want_ballot = sum(1 << i for i, v in enumerate(lanes) if v)
        assert ballot[t].item() & 0xFFFFFFFF == want_ballot
        assert all_[t].item() == int(all(lanes)) and any_[t].item() == int(any(lanes))
        assert red[t].item() == sum(lanes)
    total = int(pred.sum())
    assert (bcount == total).all() and (band == int(total == threads)).all() and (bor == int(total > 0)).all()


# ---------------------------------------------------------------------------- warp level


def shfl_expect(x, threads, mode, arg, width):
    """CUDA's documented shuffle semantics; a source lane beyond the block yields the own value."""
    out = []
    for t in range(threads):
        lane, base = t % 32, t - t % 32
        seg = lane & ~(width - 1)
        if mode == 0:  # __shfl_sync: lane arg of the width-segment
            src = seg + (arg & (width - 1))
        elif mode == 1:  # up: own value in the first `arg` lanes of each segment
            src = lane - arg if (lane & (width - 1)) >= arg else lane
        elif mode == 2:  # down: own value in the last `arg` lanes of each segment
            src = lane + arg if (lane & (width - 1)) + arg < width else lane
        else:  # xor: earlier segments reachable, later ones give the own value
            src = lane ^ arg if (lane ^ arg) < seg + width else lane
        if base + src >= threads:
            src = lane
        out.append(x[base + src])
    return out


@pytest.mark.parametrize("is64", [False, True], ids=["int32", "float64"])
@pytest.mark.parametrize("threads", [64, 48, 7])
def test_shuffles_match_documented_semantics(is64, threads):
    dtype = torch.float64 if is64 else torch.int32
    x = (torch.arange(threads) * 3 + 1).to(dtype)
    if is64:
        x = x + 0.25
    cases = [(0, 0, 32), (0, 5, 32), (0, 37, 32), (0, 3, 8), (1, 1, 32), (1, 4, 32), (1, 2, 8), (2, 1, 32),
             (2, 16, 32), (2, 3, 4), (3, 1, 32), (3, 16, 32), (3, 31, 32), (3, 4, 8), (3, 9, 8), (0, 1, 1)]
    xs = x.tolist()
    for mode, arg, width in cases:
        out = torch.full_like(x, -1)
        st.shfl_probe(p(x), p(out), is64, threads, mode, arg, width)
        assert out.tolist() == shfl_expect(xs, threads, mode, arg, width), (mode, arg, width)


def test_warp_reductions_xor_and_down():
    blocks, threads = 3, 96
    n = blocks * threads - 10  # the last warp reads zeros past n
    x = ints(n, -50, 51, seed=1)
    out_xor = torch.full((blocks * threads,), float("nan"))
    out_down = torch.full((blocks * threads // 32,), float("nan"))
    st.warp_sums(p(x), p(out_xor), p(out_down), n, blocks, threads)
    warp_tot = torch.nn.functional.pad(x, (0, 10)).view(-1, 32).sum(1)
    assert torch.equal(out_down, warp_tot)
    assert torch.equal(out_xor, warp_tot.repeat_interleave(32))  # every lane holds the butterfly total


def test_half_warp_masks():
    threads = 64
    x = (torch.arange(threads, dtype=torch.int32) * 7) % 23
    out = torch.zeros(threads, dtype=torch.int32)
    st.half_masks(p(x), p(out), threads)
    pair = x + x.view(-1, 2).flip(1).reshape(-1)  # v += shfl_xor(v, 1)
    first = pair.view(-1, 16)[:, :1].expand(-1, 16).reshape(-1)  # broadcast from lane 0 / 16
    assert torch.equal(out, pair + first)


# ------------------------------------------------------------------------ atomics, bf16


def test_atomics_across_blocks():
    n = 1000
    x = ints(n, 0, 21, seed=2)
    fsum, dsum = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    icount, imax = torch.zeros(1, dtype=torch.int32), torch.full((1,), -5, dtype=torch.int32)
    usum = torch.zeros(1, dtype=torch.int64)
    st.atomics(p(x), n, p(fsum), p(icount), p(imax), p(usum), p(dsum), 5, 64)
    assert fsum.item() == x.sum().item() and dsum.item() == x.sum().item() and usum.item() == int(x.sum())
    assert icount.item() == n and imax.item() == int(x.max())


def _bf16_inputs():
    g = torch.Generator().manual_seed(3)
    n = 4096
    normal = torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 40, (n,), generator=g).float())
    hi = torch.randint(0, 1 << 16, (n,), generator=g, dtype=torch.int64)
    lo = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF], dtype=torch.int64)[torch.arange(n) % 5]
    near_ties = ((hi << 16) | lo).to(torch.int64)
    sub_bits = torch.cat([torch.randint(1, 1 << 23, (n // 2,), generator=g),  # subnormals
                          torch.tensor([0x8000, 0x18000, 0x7FFF, 0x1, 0x807FFFFF - (1 << 32)] * 4)])
    special = torch.tensor([0x7FC00000, 0x7FC00001, 0xFFC00000 - (1 << 32), 0x7F800001, 0x7F800000,
                            0xFF800000 - (1 << 32), 0x00000000, 0x80000000 - (1 << 32), 0x7F7FFFFF, 0x7F7F8000,
                            0x7F7F7FFF, 0xFF7FFFFF - (1 << 32), 0x00800000, 0x3F808000, 0x3F818000])
    bits = torch.cat([near_ties, sub_bits, special]).to(torch.int64)
    bits = torch.where(bits >= (1 << 31), bits - (1 << 32), bits).to(torch.int32)
    x = torch.cat([normal, bits.view(torch.float32)])
    return x if x.numel() % 2 == 0 else torch.cat([x, torch.ones(1)])


def test_bf16_round_trip_bit_exact_vs_torch():
    x = _bf16_inputs()
    n = x.numel()
    bits, bits2 = torch.zeros(n, dtype=torch.int16), torch.zeros(n, dtype=torch.int16)
    back, back2 = torch.zeros(n), torch.zeros(n)
    st.bf16_roundtrip(p(x), p(bits), p(back), p(bits2), p(back2), n)
    got = bits.to(torch.int32) & 0xFFFF
    assert torch.equal(got, bits2.to(torch.int32) & 0xFFFF), "__floats2bfloat162_rn differs from __float2bfloat16"
    want = x.to(torch.bfloat16)
    nan = torch.isnan(x)
    want_bits = want.view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(got[~nan], want_bits[~nan])
    assert (got[nan] == 0x7FFF).all(), "NaN becomes CUDA's canonical bf16 NaN 0x7fff (torch writes 0x7fc0)"
    assert torch.equal(back[~nan], want.float()[~nan]) and torch.isnan(back[nan]).all()
    assert torch.equal(back2[~nan], back[~nan]) and torch.isnan(back2[nan]).all()


def test_math_surface_and_rounding():
    a = 1 + 2.0 ** -12
    c = -(1 + 2.0 ** -11)  # a * a = 1 + 2^-11 + 2^-24: a float product rounds the 2^-24 away (tie, even)
    inp = torch.tensor([a, c, 0, 0, 1, 2, 3, 4], dtype=torch.float32)
    out = torch.full((13,), -1.0)
    st.math(p(inp), p(out))
    assert out[0].item() == 2.0 ** -24 and out[1].item() == 2.0 ** -24, "fmaf / __fmaf_rn are fused"
    assert out[2].item() == 0.0, "__fmul_rn then __fadd_rn round twice"
    assert out[3].item() == 0.5 + 1 + 0.25 + 3 + 1
    assert out[4].item() == float("inf") and out[5].item() == 2.0
    assert out[6].item() == 3.0 - 3.0 + 1.0  # max, min(int), fminf ignores NaN
    assert out[7].item() == 10.0  # float4 __ldg of in[4..7], float2 sum
    assert out[8].item() == 1.0 + 1.015625  # bf16 ties to even: 1+2^-8 -> 1, 1+3*2^-8 -> 1+2^-6
    assert out[9].item() == 8 + 4 + 31 and out[10].item() == 2.5
    assert out[11].item() == 3.25  # bf16 * and + (one rounding each)
    assert 1 <= out[12].item() <= 32  # __activemask: the lanes alive (convergence is not modelled)


# ---------------------------------------------------------------- launches, broken kernels


def test_launch_forms_template_alias_and_one_arg_template():
    x = torch.randn(300, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(300)
    st.template_launches(p(y), p(x), 300)
    want = torch.zeros(300)
    for k in (3.0, 2.0, 1.0):
        want = want + (k * x if k != 1.0 else x)
    assert torch.equal(y, want)


@pytest.mark.parametrize("blocks,threads", [(0, 32), (1, 0), (1, 2048), (-1, 32)])
def test_invalid_launch_configuration_is_reported(blocks, threads):
    with pytest.raises(RuntimeError, match="config_launch: invalid configuration argument"):
        st.config_launch(blocks, threads)
    st.config_launch(1, 1024)  # the error was consumed; a valid launch passes


def _still_works():
    x = ints(512, -3, 4, seed=5)
    out = torch.zeros(1)
    st.block_sum(p(x), p(out), 512, 1, 256, 1)
    assert out.item() == x.sum().item()


def test_shuffle_against_syncthreads_deadlock_raises():
    out = torch.zeros(64)
    with pytest.raises(RuntimeError, match=r"emulated kernel deadlock: kernel 'deadlock_kernel'.*__syncthreads"):
        st.deadlock_shfl_vs_sync(p(out), 64)
    _still_works()


def test_full_mask_shuffle_after_early_exit_deadlock_raises():
    x, out = torch.ones(32), torch.zeros(32)
    with pytest.raises(RuntimeError, match=r"emulated kernel deadlock.*lanes \{0-19\} wait at __shfl\*_sync.*"
                                           r"lanes \{20-31\} that exited"):
        st.shfl_after_exit(p(x), p(out), 20, 32)
    st.shfl_after_exit(p(x), p(out), 32, 32)  # no lane exits early: fine
    assert torch.equal(out, torch.full((32,), 2.0))


def test_divergent_syncthreads_raises():
    out = torch.zeros(64)
    with pytest.raises(RuntimeError, match=r"divergent __syncthreads .*selftest\.cu:\d+.*selftest\.cu:\d+"):
        st.divergent_sync(p(out), 64)
    st.divergent_sync(p(out), 16)  # every thread takes the same branch: one statement, fine
    _still_works()


def test_trap_raises_with_thread():
    with pytest.raises(RuntimeError, match=r"emulated kernel failed: kernel 'trap_kernel_impl'.*thread \(5,0,0\).*__trap"):
        st.trap_kernel(32)
    _still_works()


def test_ucontext_fallback_switch():
    """The portable ucontext fiber switch (default off x86-64) gives the same results."""
    code = (
        load_module_snippet(name="e")  # the module under test (a sanitizer build when one is set)
        + "import array\n"
        "assert e.switch_backend() == 'ucontext'\n"
        "out = array.array('f', [0.0]) * (4 * 64)\n"
        "e.selftest.barrier_bench(out.buffer_info()[0], 4, 64, 6)\n"
        "v = list(range(64))\n"
        "for _ in range(3): v = [v[t] + v[(t + 1) % 64] for t in range(64)]\n"
        "assert list(out) == v * 4, (list(out)[:8], v[:8])\n"
        "x = array.array('f', range(32)); o = array.array('f', [0.0]) * 32\n"
        "try:\n"
        "    e.selftest.shfl_after_exit(x.buffer_info()[0], o.buffer_info()[0], 20, 32)\n"
        "except RuntimeError as err:\n"
        "    assert 'deadlock' in str(err)\n"
        "else:\n"
        "    raise AssertionError('no deadlock error')\n"
    )
    env = dict(os.environ, NFT_FAST_CUDA_EMU_UCONTEXT="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


# -------------------------------------------------------------------- dispatch, mask_update


def test_dispatch_under_emulation(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("NFT_FAST_CUDA_EMU", "1")
    assert _build.cuda_emu_enabled() and ops.backend_available("cuda")
    assert _build.cuda_ext(cpu) is emu
    with nft_fast.use_backend("cuda"):
        assert ops.resolved_backend("mask_update", cpu) == "cuda"
    assert ops.resolved_backend("mask_update", cpu) != "cuda", "auto on CPU never picks the emulator"
    monkeypatch.setenv("NFT_FAST_CUDA_EMU", "0")
    assert not _build.cuda_emu_enabled()
    with pytest.raises(RuntimeError, match="NFT_FAST_CUDA_EMU=1"):
        _build.cuda_ext(cpu)
    if not torch.cuda.is_available():
        assert not ops.backend_available("cuda")
        with pytest.raises(ops.BackendUnavailable, match="NFT_FAST_CUDA_EMU"):
            nft_fast.set_backend("cuda")


def test_mask_update_cuda_kernel_on_emulator_bit_equal(monkeypatch):
    from nft_fast.ops.mask_update import mask_update_cuda, mask_update_torch

    monkeypatch.setenv("NFT_FAST_CUDA_EMU", "1")
    g = torch.Generator().manual_seed(6)
    n = 70_001  # 274 blocks of 256: the last one partial
    m = torch.rand(n, generator=g) * 1.3 - 0.1
    m[::5] = 1.0
    a = [m, torch.randn(n, generator=g) * 0.1, torch.randn(n, generator=g) * 0.05, torch.rand(n, generator=g) * 0.5]
    b = [t.clone() for t in a]
    launches = emu.launch_count()
    for lr, mom, reg in [(0.05, 0.95, 2e-5), (0.0229, 0.5, 0.1)]:
        mask_update_torch(*a, lr, mom, reg)
        mask_update_cuda(*b, lr, mom, reg)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert emu.launch_count() == launches + 2, "the kernel ran on the emulator"


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="needs a C++ compiler")
def test_plain_shared_declaration_does_not_compile_on_the_emulator():
    """`__shared__ T x[n]` must be NFT_SHARED(T, x, [n]): the emulator found plain ones through an
    ELF section, which GCC silently drops for a static local of a function template, so those
    arrays were never poisoned (the masked-BN reductions' were not). Now it is a compile error."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cxx = shutil.which("c++") or shutil.which("g++")
    src = ('#include "cuda/compat.h"\n'
           "template <typename T> __global__ void k(T* out) { NFT_SHARED(T, ok, [32]); ok[threadIdx.x] = out[0]; }\n"
           "template void k<float>(float*);\n")
    bad = src + "__global__ void j(float* out) { __shared__ float s[32]; s[threadIdx.x] = out[0]; }\n"
    run = lambda code: subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-DNFT_CUDA_EMU", "-I", os.path.join(root, "csrc"),
                                       "-x", "c++", "-"], input=code, capture_output=True, text=True, timeout=120)
    assert run(src).returncode == 0, run(src).stderr[-2000:]
    r = run(bad)
    assert r.returncode != 0 and "NFT_SHARED" in r.stderr, r.stderr[-2000:]
