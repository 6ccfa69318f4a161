"""One rank (or the single process) of the distributed-purification tests.

``purify OUT ARCH JSON``: purifies a small seeded model on seeded data; the writing rank saves
the masks, BN statistics and per-round losses to OUT.
``lockstep OUT ARCH JSON``: on every rank, a distributed Purifier and a single-process one take
the same 10 steps from the same state (re-synchronised after each step, so float rounding is
not amplified); the worst relative difference per step and whether every rank holds identical
masks are written to OUT (JSON) by rank 0."""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

import nft_fast
from nft_fast import distributed, models
from nft_fast import purifier as P
from nft_fast.config import NFTConfig


def _setup(arch: str, overrides: str):
    torch.manual_seed(0)
    over = json.loads(overrides)
    exclude = over.pop("_exclude", None)
    shape = (3, 4, 8, 8) if arch == "r3d18" else (3, 12, 12)
    model = models.build(arch, num_classes=5, in_channels=3, width=4, image_size=shape[-1])
    x = torch.rand((60,) + shape)
    y = torch.arange(60) % 5
    nft_fast.attach_masks(model, exclude=models.default_exclude(arch) if exclude is None else exclude)
    cfg = NFTConfig(**{"steps": 10, "rounds": 2, "batch_size": 24, **over})
    return model, x, y, cfg


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / (a.double().abs().max() + 1e-12))


def purify(out: str, arch: str, overrides: str) -> None:
    model, x, y, cfg = _setup(arch, overrides)
    res = nft_fast.purify(model, TensorDataset(x, y), cfg, progress=False, inplace=True)
    if distributed.is_writer():
        state = {k: v.detach().clone() for k, v in res.model.state_dict().items()
                 if k.endswith(("neuron_mask", "running_mean", "running_var"))}
        state["__losses__"] = torch.tensor([h["loss"] for h in res.history])
        torch.save(state, out)


def lockstep(out: str, arch: str, overrides: str) -> None:
    import copy

    model, x, y, cfg = _setup(arch, overrides)
    n_c = 12.0
    dist_p = P.Purifier(copy.deepcopy(model), cfg, n_c, 5)
    world = distributed.world
    distributed.world = lambda group=None: None  # the same process, undistributed
    try:
        one = P.Purifier(copy.deepcopy(model), cfg, n_c, 5)
    finally:
        distributed.world = world
    xs, ys = x[:40], y[:40]
    if cfg.trigger_weight > 0:
        for p in (one, dist_p):
            P._arm_triggers(p, xs, ys)
    g = torch.Generator().manual_seed(1)
    worst = []
    for _ in range(10):
        idx = torch.randint(0, 60, (cfg.batch_size,), generator=g)
        lam, perm = one.draw(cfg.batch_size)
        dist_p.draw(cfg.batch_size)
        a = one.step(x[idx], y[idx], lam, perm)
        b = dist_p.step(x[idx], y[idx], lam, perm)
        bufs_a, bufs_b = dict(one.model.named_buffers()), dict(dist_p.model.named_buffers())
        diffs = [_rel(one._mask, dist_p._mask), abs(a["loss"] - b["loss"]) / abs(a["loss"])]
        diffs += [_rel(bufs_a[k], bufs_b[k]) for k in bufs_a if k.endswith(("running_mean", "running_var"))]
        worst.append(max(diffs))
        with torch.no_grad():  # back to the same state: rounding differences are not amplified
            dist_p._mask.copy_(one._mask)
            dist_p._buf.copy_(one._buf)
            for k in bufs_a:
                bufs_b[k].copy_(bufs_a[k])
            for ta, tb in zip(one.triggers, dist_p.triggers):
                if isinstance(ta, P.Perturbation):
                    tb.delta = ta.delta.clone()
    gathered = [torch.empty_like(dist_p._mask) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, dist_p._mask)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"worst": worst, "ranks_equal": all(torch.equal(gathered[0], t) for t in gathered),
                       "world": dist_p.world.size}, f)


if __name__ == "__main__":
    on = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if on:
        dist.init_process_group("gloo")
    try:
        {"purify": purify, "lockstep": lockstep}[sys.argv[1]](*sys.argv[2:5])
    finally:
        if on:
            dist.destroy_process_group()
    if on:  # torch 2.13 with gloo can abort in interpreter teardown after a finished run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
