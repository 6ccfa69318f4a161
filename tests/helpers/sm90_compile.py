"""Compile every Triton kernel launch for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter (TRITON_INTERPRET=1) checks what a kernel computes, not that it compiles:
types, layouts and register/shared-memory limits only meet the real compiler on a GPU.

    python tests/helpers/sm90_compile.py record LAUNCHES.json   # (interpreter) run the ops, record launches
    python tests/helpers/sm90_compile.py compile LAUNCHES.json  # (no interpreter) compile each for sm_80/sm_90

`record` runs every op forward and backward on small inputs in fp32 and bf16, NCHW and
channels_last, and records each distinct launch: the kernel, its argument types and constexpr
values, num_warps/num_stages. `compile` builds each with triton's own ptxas.
"""
from __future__ import annotations

import importlib
import json
import sys

_DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.int64": "i64",
           "torch.int32": "i32", "torch.bool": "i1", "torch.uint8": "u8"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _record(path: str) -> None:
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1", "record runs under TRITON_INTERPRET=1"
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    launches = {}
    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        import inspect

        params = list(inspect.signature(self.fn).parameters)
        values = dict(zip(params, args))
        values.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
        sig, consts = {}, {}
        for n in params:
            v = values.get(n)
            ann = inspect.signature(self.fn).parameters[n].annotation
            if "constexpr" in str(ann):
                consts[n] = v
            elif isinstance(v, torch.Tensor):
                sig[n] = "*" + _DTYPES[str(v.dtype)]
            elif isinstance(v, bool):
                sig[n] = "i1"
            elif isinstance(v, int):
                sig[n] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                sig[n] = "fp32"
            elif v is None:
                consts[n] = None
            else:
                raise TypeError(f"{self.fn.__name__}: cannot type argument {n}={v!r}")
        opts = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
        rec = {"module": self.fn.__module__, "name": self.fn.__name__, "signature": sig, "constexprs": consts,
               "options": opts}
        launches[json.dumps(rec, sort_keys=True)] = rec
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    _exercise(torch)
    with open(path, "w") as f:
        json.dump(list(launches.values()), f, indent=1)
    print(f"recorded {len(launches)} distinct launches")


def _exercise(torch) -> None:
    """Every op forward + backward on the triton backend, in the dtypes and layouts it supports."""
    import nft_fast
    from nft_fast import ops

    nft_fast.set_backend("triton")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        # (the widest tiles come from C >= 64 channels_last: 32 x 64)
        for shape, fmt in (((4, 6, 5, 5), None), ((4, 6, 5, 5), torch.channels_last), ((9, 5), None),
                           ((2, 3, 3, 4, 4), torch.channels_last_3d), ((2, 70, 3, 3), torch.channels_last)):
            C = shape[1]
            for relu, res in ((False, False), (True, False), (True, True)):
                x = torch.randn(shape, generator=g).to(dtype)
                x = x.contiguous(memory_format=fmt) if fmt is not None else x
                x.requires_grad_(True)
                m = torch.rand(C, requires_grad=True)
                r = torch.randn(shape, generator=g).to(dtype).requires_grad_(True) if res else None
                y = ops.masked_batch_norm(x, torch.zeros(C), torch.ones(C), torch.rand(C) + 0.5, torch.randn(C), m,
                                          True, 0.1, 1e-5, r, relu)
                y.float().sum().backward()
            ops.masked_batch_norm(x.detach(), torch.zeros(C), torch.ones(C), torch.ones(C), None, m, False, 0.1, 1e-5)
        for D in (33, 768):  # 768: ViT-B's width, the large-tile path
            x = torch.randn(7, D, generator=g).to(dtype).requires_grad_(True)
            w, b, m = torch.rand(D), torch.randn(D), torch.rand(D, requires_grad=True)
            ops.masked_layer_norm(x, (D,), w, b, m, 1e-5).float().sum().backward()
        for M, N, K in ((7, 10, 33), (130, 130, 100)):  # the second takes the 128 x 128 GEMM tiles
            x = torch.randn(M, K, generator=g).to(dtype).requires_grad_(True)
            lin = torch.randn(N, K, generator=g).to(dtype)
            ops.masked_linear(x, lin, torch.randn(N).to(dtype), torch.rand(N, requires_grad=True)).float().sum().backward()
        for fmt in (torch.contiguous_format, torch.channels_last):
            z = torch.randn(4, 6, 5, 5, generator=g).to(dtype).contiguous(memory_format=fmt).requires_grad_(True)
            ops.masked_conv(z, lambda t: t * 1.0, torch.randn(6), torch.rand(6, requires_grad=True)).float().sum().backward()
        xb = torch.randn(5, 3, 4, 4, generator=g).to(dtype)
        perm = torch.randperm(5, generator=g)
        for cl in (False, True):
            ops.mixup_batch(xb, perm, 0.3, channels_last=cl)
            ops.mixup_batch(xb, perm, torch.tensor(0.3), dtype=torch.bfloat16, channels_last=cl)
        for K in (37, 1001):
            logits = torch.randn(5, K, generator=g).to(dtype).requires_grad_(True)
            y5 = torch.randint(0, K, (5,), generator=g)
            ops.mixup_cross_entropy(logits, y5, perm, 0.3).backward()
            ops.mixup_cross_entropy(logits, y5, perm, torch.tensor(0.3)).backward()
    n = 1000
    mk, gr, buf, fl = torch.rand(n), torch.randn(n), torch.zeros(n), torch.full((n,), 0.1)
    ops.mask_update_(mk, gr, buf, fl, 0.05, 0.9, 1e-3)
    ops.mask_update_(mk, gr, buf, fl, torch.tensor([0.05]), 0.9, 1e-3)


def _compile(path: str) -> int:
    import os

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compile runs without TRITON_INTERPRET"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with open(path) as f:
        launches = json.load(f)
    bad = 0
    for rec in launches:
        fn = getattr(importlib.import_module(rec["module"]), rec["name"])
        names = fn.arg_names
        signature = {n: ("constexpr" if n in rec["constexprs"] else rec["signature"][n]) for n in names}
        consts = {(names.index(k),): v for k, v in rec["constexprs"].items()}
        for cc in (80, 90):
            try:
                ck = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                    target=GPUTarget("cuda", cc, 32), options=rec["options"])
                md = ck.metadata
                if md.shared > 227 * 1024:
                    raise RuntimeError(f"needs {md.shared} bytes of shared memory")
            except Exception as e:  # report every failure, not only the first
                bad += 1
                print(f"FAIL sm_{cc} {rec['name']} {rec['constexprs']} {rec['signature']}: {str(e)[:400]}")
    print(f"compiled {len(launches)} launches x 2 targets, {bad} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "record":
        _record(sys.argv[2])
    else:
        sys.exit(_compile(sys.argv[2]))
