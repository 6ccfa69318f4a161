"""End to end on a real backdoor: Fashion-MNIST, BadNets, a tiny PreActResNet-18, NFT.

The backdoored model is trained here (CI has no cache): width 4, 12,000 attacker images,
2 epochs, then NFT with the reference settings (1000 steps) on the 600-image clean set.
About 45 s on 2 CPU cores. Measured: ACC 82.97 -> 79.50, ASR 98.06 -> 86.16: the reference
NFT lowers this backdoor but does not remove it.
"""
import pytest
import torch

import nft_fast
from nft_fast.harness import datasets as D

pytestmark = pytest.mark.skipif(not (D.data_dir() / D.FASHION_MNIST_FILES["train"][0]).is_file(),
                                reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    from nft_fast.harness.runs import BackdoorSpec, load_run, train

    spec = BackdoorSpec(attack="badnets", attack_params={"target": 0}, arch="preactresnet18", width=4, epochs=2,
                        train_subset=12000, seed=0)
    folder = tmp_path_factory.mktemp("run")
    train(spec, folder, progress=False)
    return load_run(folder)


def test_nft_lowers_asr_and_keeps_acc(backdoored):
    from nft_fast.harness.runs import poison_loader

    run = backdoored
    test, poison = run.data.test_loader(), poison_loader(run.attack, run.data)
    before = nft_fast.evaluate(run.model, test, poison)
    assert before["acc"] > 0.75 and before["asr"] > 0.9, f"the attack did not take: {before}"
    x, y = run.data.clean
    assert x.shape[0] == 600
    cfg = nft_fast.NFTConfig()
    res = nft_fast.purify(run.model, torch.utils.data.TensorDataset(x, y), cfg, exclude=(), progress=False,
                          test_loader=test, poison_loader=poison)
    after = nft_fast.evaluate(res.folded(), test, poison)
    assert after["acc"] >= before["acc"] - 0.05, (before, after)
    assert after["asr"] <= before["asr"] - 0.05, (before, after)
    assert res.history[-1]["asr"] == pytest.approx(after["asr"], abs=1e-9)
