"""Segmentation fault in plain PyTorch (no nft_fast import): the CPU backward of group_norm on a
channels_last (or channels_last_3d) input that does not require grad, with a weight that does.

Seen with torch 2.13.0+cpu on an AVX-512 Intel Xeon, with 1 and 2 intra-op threads, for 4-D and
5-D inputs and any group count tried. NCHW inputs, or inputs that require grad, are fine. A
mask on a GroupNorm behind frozen layers is exactly this case, so
nft_fast.ops.masked_group_norm hands group_norm an NCHW copy of such inputs.

Usage: python groupnorm_channels_last_wgrad.py [LAYOUT(cl|nchw)] [DIMS(4|5)]
  python groupnorm_channels_last_wgrad.py cl 4     -> SIGSEGV
  python groupnorm_channels_last_wgrad.py nchw 4   -> ok
"""
import sys

import torch
import torch.nn.functional as F

layout = sys.argv[1] if len(sys.argv) > 1 else "cl"
dims = int(sys.argv[2]) if len(sys.argv) > 2 else 4
x = torch.randn((6, 4, 8, 8) if dims == 4 else (6, 4, 3, 8, 8))
if layout == "cl":
    x = x.contiguous(memory_format=torch.channels_last if dims == 4 else torch.channels_last_3d)
weight = torch.rand(4, requires_grad=True)
F.group_norm(x, 2, weight, torch.zeros(4), 1e-5).sum().backward()
print("ok", torch.__version__)
