"""Ten Purifier steps with the triton backend match the torch backend (masks, rtol 1e-4).

On CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest); models stay tiny.
"""
import pytest
import torch

pytest.importorskip("triton")

import nft_fast  # noqa: E402
from nft_fast import ops  # noqa: E402
from nets import TinyViT, TVResNet, Video3D, user_sequential  # noqa: E402

CASES = {
    "resnet": (lambda: TVResNet(num_classes=5, width=4), (6, 3, 16, 16), 5, {}),
    "resnet_neurons": (lambda: TVResNet(num_classes=5, width=4), (6, 3, 16, 16), 5, {"neurons": True, "mask_head": True}),
    "video3d": (lambda: Video3D(num_classes=4, width=3), (4, 3, 4, 8, 8), 4, {}),
    "vit": (lambda: TinyViT(num_classes=5, dim=12, depth=1, heads=2, patch=4, image=8), (5, 3, 8, 8), 5, {"neurons": True}),
    "sequential_bn1d": (lambda: user_sequential(num_classes=4), (6, 1, 12, 12), 4, {"neurons": True}),
}


def _run(case, backend, steps=10):
    build, shape, k, kw = CASES[case]
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    y = torch.randint(0, k, (shape[0],), generator=g)
    nft_fast.attach_masks(model, example_input=x if kw.get("neurons") else None, **kw)
    # a high learning rate so ten steps move the masks well away from their start
    p = nft_fast.Purifier(model, nft_fast.NFTConfig(lr=0.5, seed=3), samples_per_class=2.0)
    losses = []
    with nft_fast.use_backend(backend):
        for _ in range(steps):
            losses.append(p.step(x, y)["loss"])
    bn_state = {n: b.clone() for n, b in model.named_buffers()}
    return p.flat_masks(), losses, bn_state


@pytest.mark.parametrize("case", sorted(CASES))
def test_ten_steps_triton_match_torch(case, one_thread):
    m0, l0, s0 = _run(case, "torch")
    m1, l1, s1 = _run(case, "triton")
    assert (m0 - 1).abs().max() > 1e-3, "the masks must move for the comparison to mean anything"
    torch.testing.assert_close(m1, m0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-4, atol=1e-5)
    for n in s0:
        torch.testing.assert_close(s1[n].float(), s0[n].float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_triton_backend_is_used():
    seen = set()
    build, shape, k, kw = CASES["vit"]
    model = build()
    nft_fast.attach_masks(model, example_input=torch.randn(shape), **kw)
    with nft_fast.use_backend("triton"):
        for op in ("masked_bn", "masked_ln", "masked_linear", "mask_update"):
            if "triton" in ops.implementations().get(op, ()):
                seen.add(ops.resolved_backend(op, torch.device("cpu")))
    assert seen == {"triton"}
