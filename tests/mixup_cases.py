"""Inputs and one loss/gradient run of a MixUp cross-entropy implementation, shared by the
per-backend tests (tests/ops/test_mixup*.py)."""
import torch


def ce_inputs(B, K, seed, dtype=torch.float32):
    """``(logits, y, perm)``: logits (B, K) spread like a trained net's, labels, a permutation."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, K, generator=g) * 3).to(dtype)
    y = torch.randint(0, K, (B,), generator=g)
    perm = torch.randperm(B, generator=g)
    return z, y, perm


def loss_and_grad(fn, z, y, perm, lam, scale=1.0):
    """``fn``'s loss and the gradient of ``scale * loss`` w.r.t. the logits (through .backward())."""
    z = z.detach().clone().requires_grad_()
    loss = fn(z, y, perm, lam)
    (loss * scale).backward()
    return loss.detach(), z.grad
