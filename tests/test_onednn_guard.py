"""The guard against oneDNN's AVX2 1x1 strided weight-gradient bug (nft_fast.layout).

The end-to-end tests run tests/helpers/onednn_guard_run.py in a subprocess with
``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN then picks its AVX2 kernels on any x86 CPU, AVX-512 ones
included, so the faulty kernel is exercised on every CI machine. An abort or a hang fails the
test instead of the suite.
"""
import copy
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_fast import layout, models

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = os.path.join(HERE, "helpers", "onednn_guard_run.py")

x86_onednn = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available(),
    reason="the bug is in oneDNN's x86 AVX2 kernels")


def _run(threads: int, steps: str, guard: str = "", timeout: float = 300.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(ONEDNN_MAX_CPU_ISA="AVX2", NFT_FAST_ONEDNN_GUARD=guard)
    return subprocess.run([sys.executable, RUN, str(threads), steps], env=env, capture_output=True, text=True,
                          timeout=timeout)


@x86_onednn
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("steps", ["train,finetune,purify", "cl,finetune", "cl,inputaware"])
def test_training_and_purification_survive_the_avx2_kernel(threads, steps):
    """train_classifier (which converts to channels_last), the fine-tuning baseline and the
    input-aware attack's training on a model the user converted, and purify: unguarded, one
    thread aborts ('corrupted double-linked list') and two threads can hang."""
    try:
        r = _run(threads, steps)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{steps} with {threads} thread(s) hung (> 300 s) under ONEDNN_MAX_CPU_ISA=AVX2")
    assert r.returncode == 0, f"{steps}, {threads} thread(s): exit {r.returncode}\n{r.stdout}\n{r.stderr[-2000:]}"
    assert "guard active: True" in r.stdout and r.stdout.rstrip().endswith("ok"), r.stdout


@x86_onednn
@pytest.mark.skipif(not torch.__version__.startswith("2.13."), reason="the abort is established for torch 2.13 only")
def test_the_same_run_aborts_without_the_guard():
    """What the test above protects against is real on this torch: when this fails, oneDNN is
    fixed and nft_fast.layout's guard can go."""
    try:
        r = _run(1, "cl,finetune", guard="0", timeout=120)
    except subprocess.TimeoutExpired:
        return  # a hang is the bug too
    assert r.returncode != 0, "the unguarded run passed: drop the oneDNN guard in nft_fast.layout?"


def test_detection(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for force, want in (("1", True), ("0", False)):
        monkeypatch.setenv("NFT_FAST_ONEDNN_GUARD", force)
        assert layout.onednn_avx2_bug() is want
    monkeypatch.delenv("NFT_FAST_ONEDNN_GUARD")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert layout.onednn_avx2_bug()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert not layout.onednn_avx2_bug()
    for isa, want in (("AVX2", True), ("avx2_vnni", True), ("SSE41", True), ("AVX512_CORE", False), ("ALL", False)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert layout.onednn_avx2_bug() is want, isa
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not layout.onednn_avx2_bug()


def test_affected_convolutions():
    assert layout.affected_conv(nn.Conv2d(4, 8, 1, stride=2))
    assert layout.affected_conv(nn.Conv2d(7, 3, 1, stride=(1, 2)))
    assert layout.affected_conv(nn.Conv2d(16, 8, 1, stride=2, groups=4))  # 4 channels per group
    for m in (nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 3, stride=2),
              nn.Conv3d(4, 8, 1, stride=2), nn.Linear(4, 8)):
        assert not layout.affected_conv(m), m
    # the zoo's ResNet-18: shortcuts with 2-7 input channels at widths 2 and 4, none from width 8
    assert sum(map(layout.affected_conv, models.build("resnet18", num_classes=4, width=4).modules())) == 1
    assert sum(map(layout.affected_conv, models.build("resnet18", num_classes=4, width=2).modules())) == 2
    assert not any(map(layout.affected_conv, models.build("resnet18", num_classes=4, width=8).modules()))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 1, stride=2)
        self.b = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        return self.b(self.down(self.a(x)))


def test_guard_hands_the_convolution_nchw_and_changes_no_value(monkeypatch):
    monkeypatch.setenv("NFT_FAST_ONEDNN_GUARD", "1")
    torch.manual_seed(0)
    net = _Net()
    plain = copy.deepcopy(net)
    net.to(memory_format=torch.channels_last)  # the 1x1 weight now has channels_last strides
    assert layout.guard_convs(net) == 1 and layout.guard_convs(net) == 1  # idempotent
    assert len(net.down._forward_pre_hooks) == 1 and not net.a._forward_pre_hooks and not net.b._forward_pre_hooks
    seen = []
    net.down.register_forward_hook(lambda m, a, out: seen.append((a[0].is_contiguous(), m.weight.stride())))
    weight = net.down.weight
    x = torch.randn(5, 3, 10, 10)
    out = net(x.contiguous(memory_format=torch.channels_last))
    assert seen == [(True, (4, 1, 1, 1))]  # NCHW input and canonical NCHW weight strides
    assert net.down.weight is weight and torch.equal(weight, plain.down.weight)
    ref = plain(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (n, p), q in zip(net.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    twin = copy.deepcopy(net)  # a copy (fold_masks, purify) keeps the guard
    assert len(twin.down._forward_pre_hooks) == 1
    monkeypatch.setenv("NFT_FAST_ONEDNN_GUARD", "0")
    assert layout.guard_convs(_Net()) == 0


def test_one_layout_policy():
    assert layout.memory_format(4, True) == torch.channels_last
    assert layout.memory_format(5, True) == torch.channels_last_3d
    assert layout.memory_format(4, False) == layout.memory_format(3, True) == torch.contiguous_format
    net = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4))
    assert layout.wants_channels_last(net) and not layout.wants_channels_last(net, False)
    assert not layout.wants_channels_last(nn.Sequential(nn.Linear(3, 3))) and layout.wants_channels_last(nn.Linear(3, 3), True)
    layout.to_channels_last(net)  # 5-D weights, which model.to(memory_format=channels_last) refuses
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last_3d) and not net[0].weight.is_contiguous()
    y = F.conv3d(layout.like_model(torch.randn(2, 2, 4, 5, 6), True), net[0].weight)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
