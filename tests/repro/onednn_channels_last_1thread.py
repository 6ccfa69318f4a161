"""Heap corruption in plain PyTorch (no nft_fast import): training a tiny channels_last ResNet
with one intra-op thread aborts with glibc 'corrupted double-linked list' / 'double free or
corruption' inside mkldnn_convolution_backward_weights.

Seen with torch 2.13.0+cpu (oneDNN v3.12.0) on an AMD EPYC whose torch reports
'CPU capability usage: AVX2' (no AVX-512), and on AVX-512 CPUs with ONEDNN_MAX_CPU_ISA=AVX2.
Not seen with NCHW, or with torch.backends.mkldnn.enabled = False; with 2 threads it can hang
instead. The faulty kernel and the exact trigger: nft_fast/layout.py.

Usage: python onednn_channels_last_1thread.py THREADS MKLDNN(0|1) [LAYOUT(cl|nchw)]
  python onednn_channels_last_1thread.py 1 1 cl     -> aborts on such a CPU
  python onednn_channels_last_1thread.py 2 1 cl     -> ok
  python onednn_channels_last_1thread.py 1 0 cl     -> ok
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

threads, mkldnn = int(sys.argv[1]), sys.argv[2] == "1"
cl = (sys.argv[3] if len(sys.argv) > 3 else "cl") == "cl"
torch.set_num_threads(threads)
torch.backends.mkldnn.enabled = mkldnn
torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o)
        self.c2, self.b2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
        self.sc = (nn.Sequential() if stride == 1 and i == o
                   else nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o)))

    def forward(self, x):
        out = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(out)) + self.sc(x))


w = 4
model = nn.Sequential(
    nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
    Block(w, w, 1), Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 2 * w, 1),
    Block(2 * w, 4 * w, 2), Block(4 * w, 4 * w, 1), Block(4 * w, 8 * w, 2), Block(8 * w, 8 * w, 1),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, 4))
fmt = torch.channels_last if cl else torch.contiguous_format
model = model.to(memory_format=fmt)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for _ in range(200):
    x = torch.rand(32, 1, 12, 12).contiguous(memory_format=fmt)
    y = torch.randint(0, 4, (32,))
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
print("ok", sys.argv[1:], torch.__version__)
