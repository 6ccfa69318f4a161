"""pytest-benchmark microbenchmarks of each nft_fast op, per backend, beside its torch implementation.

    python -m pytest bench/test_ops_bench.py -q -p no:cacheprovider                 # CPU: torch/cpp rows
    python -m pytest bench/test_ops_bench.py -q --benchmark-json bench/results/ops.json
    python bench/test_ops_bench.py bench/results/ops.json                         # -> ops.md (ratios to torch)

Shapes are NFT's own on CUDA (ResNet-50 layer1 BN, ViT-B/16 LayerNorm and MLP, ImageNet
MixUp batch, 1000-way CE) and small on CPU. Each row calls the implementation that
``nft_fast.use_backend(backend)`` resolves to and is skipped when the op has none for that
backend (no silent fall-back to torch). Triton rows are skipped on CPU: the interpreter is
far too slow to time. These files live in bench/, so ``pytest tests`` never runs them.
"""
from __future__ import annotations

import functools
import importlib
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest
import torch

import nft_fast
from nft_fast import ops

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEV.type == "cuda"
HALF = torch.bfloat16 if CUDA else torch.float32  # activations' dtype on CUDA (bf16 autocast)


def _gen() -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(0)


def _r(*shape, dtype=torch.float32, g=None) -> torch.Tensor:
    return torch.randn(*shape, device=DEV, generator=g).to(dtype)


# Each case: op key -> (module to import, builder(impl) -> (run(), description)).

def _bn(impl: Callable, dtype: torch.dtype = HALF) -> Tuple[Callable, str]:
    """Masked BN forward + backward (dx, dmask) in training mode; weights frozen; activations in
    ``dtype`` (bf16 on CUDA: the autocast step's)."""
    shape = (128, 256, 56, 56) if CUDA else (16, 64, 16, 16)
    g = _gen()
    C = shape[1]
    x = _r(*shape, dtype=dtype, g=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.rand(C, device=DEV, generator=g) + 0.5, _r(C, g=g)
    m = torch.rand(C, device=DEV, generator=g).requires_grad_()
    rm, rv = torch.zeros(C, device=DEV), torch.ones(C, device=DEV)
    dy = _r(*shape, dtype=dtype, g=g).contiguous(memory_format=torch.channels_last)

    def run():
        y = impl(x, rm, rv, w, b, m, True, 0.1, 1e-5, None, False)
        return torch.autograd.grad(y, (x, m), dy)
    return run, f"{shape} {str(dtype)[6:]} channels_last, fwd+bwd"


def _ln(impl: Callable) -> Tuple[Callable, str]:
    """Masked LayerNorm forward + backward (dx, dmask); ViT-B/16 token rows."""
    shape = (64, 197, 768) if CUDA else (8, 65, 192)
    D = shape[-1]
    g = _gen()
    x = _r(*shape, dtype=HALF, g=g).requires_grad_()
    # parameters in the activations' dtype: torch's CUDA layer_norm wants them to match
    w, b = _r(D, dtype=HALF, g=g), _r(D, dtype=HALF, g=g)
    m = torch.rand(D, device=DEV, generator=g).to(HALF).requires_grad_()
    dy = _r(*shape, dtype=HALF, g=g)

    def run():
        y = impl(x, (D,), w, b, m, 1e-6)
        return torch.autograd.grad(y, (x, m), dy)
    return run, f"{shape} {str(HALF)[6:]}, fwd+bwd"


def _linear(impl: Callable) -> Tuple[Callable, str]:
    """Masked Linear forward + backward (dx, dmask); ViT-B/16 fc1 (768 -> 3072)."""
    rows, K, N = (64 * 197, 768, 3072) if CUDA else (8 * 65, 192, 768)
    g = _gen()
    x = _r(rows, K, dtype=HALF, g=g).requires_grad_()
    w = (_r(N, K, g=g) / K ** 0.5).to(HALF)
    b = _r(N, g=g)
    m = torch.rand(N, device=DEV, generator=g).requires_grad_()
    dy = _r(rows, N, g=g)

    def run():
        y = impl(x, w, b, m)
        return torch.autograd.grad(y, (x, m), dy)
    return run, f"x {(rows, K)} W {(N, K)} {str(HALF)[6:]}, fwd+bwd"


def _mask_update(impl: Callable) -> Tuple[Callable, str]:
    """The fused mask update over ResNet-50's 26,560 masks (flat fp32)."""
    n = 26560
    g = _gen()
    mask = torch.rand(n, device=DEV, generator=g) * 0.5 + 0.5
    grad, buf = _r(n, g=g) * 1e-3, torch.zeros(n, device=DEV)
    floor = torch.full((n,), 0.1, device=DEV)

    def run():
        impl(mask, grad, buf, floor, 0.05, 0.95, 2e-5)
    return run, f"{n} fp32"


def _mixup_batch(impl: Callable, out_dtype: torch.dtype = HALF) -> Tuple[Callable, str]:
    """MixUp of an NCHW fp32 batch into the model's dtype (or ``out_dtype``), channels_last."""
    shape = (128, 3, 224, 224) if CUDA else (64, 3, 32, 32)
    g = _gen()
    x = _r(*shape, g=g)
    perm = torch.randperm(shape[0], device=DEV, generator=g)

    def run():
        return impl(x, perm, 0.37, out_dtype, True)
    return run, f"{shape} fp32 -> {str(out_dtype)[6:]} channels_last"


def _mixup_ce(impl: Callable, K: int = 10) -> Tuple[Callable, str]:
    """Two-label MixUp cross-entropy forward + backward (dlogits); CPU: ``K`` classes."""
    B, K = (128, 1000) if CUDA else (128, K)
    g = _gen()
    z = (_r(B, K, g=g) * 3).requires_grad_()
    y = torch.randint(0, K, (B,), device=DEV, generator=g)
    perm = torch.randperm(B, device=DEV, generator=g)

    def run():
        return torch.autograd.grad(impl(z, y, perm, 0.37), (z,))
    return run, f"logits {(B, K)} fp32, fwd+bwd"


CASES: Dict[str, Tuple[str, Callable]] = {
    "masked_bn": ("nft_fast.ops.masked_bn", _bn),
    "masked_ln": ("nft_fast.ops.masked_layer_norm", _ln),
    "masked_linear": ("nft_fast.ops.masked_neuron", _linear),
    "mask_update": ("nft_fast.ops.mask_update", _mask_update),
    "mixup_batch": ("nft_fast.ops.mixup", _mixup_batch),
    "mixup_ce": ("nft_fast.ops.mixup", _mixup_ce),
    # CPU-only variants (on CUDA the rows above have these shapes): case -> the op it times
    "masked_bn_bf16": ("nft_fast.ops.masked_bn", functools.partial(_bn, dtype=torch.bfloat16)),
    "mixup_batch_bf16": ("nft_fast.ops.mixup", functools.partial(_mixup_batch, out_dtype=torch.bfloat16)),
    "mixup_ce_k1000": ("nft_fast.ops.mixup", functools.partial(_mixup_ce, K=1000)),
}
VARIANT_OF = {"masked_bn_bf16": "masked_bn", "mixup_batch_bf16": "mixup_batch", "mixup_ce_k1000": "mixup_ce"}


def _impl(case: str, backend: str) -> Callable:
    """The implementation of ``case``'s op that ``use_backend(backend)`` resolves to on DEV (skips otherwise)."""
    module, _ = CASES[case]
    op = VARIANT_OF.get(case, case)
    if case != op and CUDA:
        pytest.skip(f"{case}: a CPU-only variant of {op}")
    try:
        importlib.import_module(module)  # registers the op's implementations
    except ImportError as e:
        pytest.skip(f"{module} is not importable: {e}")
    if backend == "triton" and not CUDA:
        pytest.skip("triton on CPU runs under the interpreter: far too slow to time")
    if backend == "cuda" and not CUDA:
        pytest.skip("cuda on CPU runs on the emulator (NFT_FAST_CUDA_EMU=1): a correctness tool, not timed")
    if not (ops.backend_available(backend) and ops._device_ok(backend, DEV)):
        pytest.skip(f"backend {backend} is not usable on {DEV}")
    if backend not in ops.implementations().get(op, ()):
        pytest.skip(f"{op} has no {backend} implementation")
    with nft_fast.use_backend(backend):
        if ops.resolved_backend(op, DEV) != backend:
            pytest.skip(f"{op}: {backend} resolves to {ops.resolved_backend(op, DEV)} on {DEV}")
        return ops.resolve(op, DEV)


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("op", list(CASES))
def test_op(benchmark, op: str, backend: str) -> None:
    impl = _impl(op, backend)
    run, what = CASES[op][1](impl)

    def timed():
        out = run()
        if CUDA:
            torch.cuda.synchronize()
        return out

    for _ in range(3):  # compilation / autotuning / allocator warm-up stay out of the timings
        timed()
    benchmark.group = f"{op}: {what}"
    benchmark.extra_info.update(op=op, backend=backend, shape=what, device=str(DEV))
    benchmark(timed)


# --------------------------------------------------------------------------- summary

def summarize(path: Path) -> str:
    """A markdown table of a ``--benchmark-json`` file: median per op and backend, ratio to torch."""
    data = json.loads(Path(path).read_text())
    rows: Dict[str, Dict[str, float]] = {}
    shapes: Dict[str, str] = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        op, backend = info.get("op"), info.get("backend")
        if op is None:
            continue
        rows.setdefault(op, {})[backend] = b["stats"]["median"]
        shapes[op] = info.get("shape", "")
    mi = data.get("machine_info", {})
    lines = ["# nft_fast ops: median per call (pytest-benchmark)", "",
             f"{data.get('datetime', '')}; {mi.get('cpu', {}).get('brand_raw', '')}; "
             f"device {next((b.get('extra_info', {}).get('device') for b in data['benchmarks']), '')}", "",
             "| op | shape | backend | median us | torch / backend |", "|---|---|---|---:|---:|"]
    for op, per in rows.items():
        t = per.get("torch")
        for backend, med in sorted(per.items(), key=lambda kv: kv[0] != "torch"):
            ratio = f"{t / med:.2f}x" if t else ""
            lines.append(f"| {op} | {shapes[op]} | {backend} | {med * 1e6:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    src = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".md")
    out.write_text(summarize(src))
    print(out.read_text())
