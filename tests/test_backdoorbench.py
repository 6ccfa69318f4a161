"""BackdoorBench attack folders as inputs (nft_fast.harness.backdoorbench, ``purify --backdoorbench``):
loading round-trips against a replica of their model, the command line purifies end to end, pickled
objects need --trust-pickle (and a malicious pickle never runs without it), bad folders fail in one line."""
import gzip
import json
import re
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from nft_fast import models
from nft_fast.app.cli import main
from nft_fast.harness import backdoorbench as BB
from nft_fast.io import load_state_dict
from tests.helpers import backdoorbench_writer as W

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--steps", "3", "--rounds", "1", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A BackdoorBench checkout with one attack whose poisoned images are PNG files."""
    root = tmp_path_factory.mktemp("bb")
    return W.write_attack(root / "checkout")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("nft-fast: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


def test_load_round_trips(checkout):
    bb = BB.load_backdoorbench(checkout)
    assert (bb.arch, bb.model_name, bb.dataset, bb.num_classes) == ("preactresnet18_backdoorbench", "preactresnet18",
                                                                     "cifar10", 10)
    assert bb.arch_kwargs == {"num_classes": 10, "in_channels": 3, "width": 4, "image_size": 32}
    mean, std = bb.normalization
    assert mean == (0.4914, 0.4822, 0.4465) and std == (0.247, 0.243, 0.261)
    # the model computes what their PreActResNet-18 computes, on inputs normalised as theirs
    x = bb.test[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(bb.model.eval()(x), W.tiny_model()(x), rtol=0, atol=0)
    # the clean test set is the original test split; the poisoned one its non-target samples
    xte, yte = W._test_images(checkout.parent.parent)
    assert torch.equal(bb.test[1], torch.from_numpy(yte))
    keep = np.where(yte != W.TARGET)[0]
    xp, yp, ytp = bb.poison
    assert torch.equal(yp, torch.from_numpy(yte[keep])) and bool((ytp == W.TARGET).all())
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    first = np.array(Image.open(checkout / "bd_test_dataset" / str(yte[keep[0]]) / f"{keep[0]}.png"))
    torch.testing.assert_close(xp[0] * s + m, torch.from_numpy(first).permute(2, 0, 1).float() / 255)
    # the defender's clean data: 5% of the training split, drawn with the seed, or given indices
    assert bb.clean[0].shape == (100, 3, 32, 32) and bb.info["clean_ratio"] == BB.CLEAN_RATIO
    again = BB.load_backdoorbench(checkout)
    assert torch.equal(again.clean[0], bb.clean[0])
    assert not torch.equal(BB.load_backdoorbench(checkout, seed=1).clean[0], bb.clean[0])
    some = BB.load_backdoorbench(checkout, clean_index=list(range(20)))
    assert torch.equal(some.clean[1], torch.arange(20) % 10)


def test_cli_purifies_and_evaluates(checkout, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["purify", "--backdoorbench", str(checkout), "--out", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    for when in ("before", "after"):
        assert {"acc", "asr", "ra"} <= set(report[when]) and report[when]["n_poison"] == 54
    assert report["arch"] == "preactresnet18_backdoorbench"
    assert report["backdoorbench"]["model_name"] == "preactresnet18" and report["clean_samples"] == 100
    assert report["checkpoint"] == str(checkout / "attack_result.pt")
    # the purified model has their architecture: it loads strictly into the zoo's
    models.build("preactresnet18_backdoorbench", width=4).load_state_dict(load_state_dict(out / "purified.safetensors"))
    assert "NFT purified" in capsys.readouterr().out


def test_pickled_objects_need_trust_pickle(tmp_path, capsys, checkout):
    folder = W.write_attack(tmp_path / "c", in_pickle=True)  # PIL images inside attack_result.pt
    with pytest.raises(BB.BackdoorBenchError, match="PIL.Image.Image.*--trust-pickle"):
        BB.load_backdoorbench(folder)
    out = tmp_path / "out"
    assert main(["purify", "--backdoorbench", str(folder), "--out", str(out), *TINY]) == 2
    assert "--trust-pickle" in _one_error_line(capsys) and not out.exists()
    with pytest.warns(BB.TrustPickleWarning, match="runs any code"):
        bb = BB.load_backdoorbench(folder, trust_pickle=True)
    assert torch.equal(bb.poison[0], BB.load_backdoorbench(checkout).poison[0])


def test_malicious_pickle_is_not_run(tmp_path, capsys):
    marker = tmp_path / "marker"
    folder = W.write_attack(tmp_path / "c", extra={"bd_train": W.Malicious(marker)})
    with pytest.raises(BB.BackdoorBenchError, match="--trust-pickle"):
        BB.load_backdoorbench(folder)
    assert main(["purify", "--backdoorbench", str(folder), "--out", str(tmp_path / "out"), *TINY]) == 2
    assert "--trust-pickle" in _one_error_line(capsys)
    assert not marker.exists()


def _renamed(state):
    return {("fc.weight" if k == "linear.weight" else k): v for k, v in state.items()}


BAD = {
    "no folder": (lambda root, ck: root / "nowhere", "is not a directory"),
    "no attack_result.pt": (lambda root, ck: (ck / "attack_result.pt").unlink() or ck, "attack_result.pt is missing"),
    "missing key": (lambda root, ck: W.write_attack(root, "x", drop=("bd_test",)), "missing the keys bd_test"),
    "wrong keys": (lambda root, ck: W.write_attack(root, "x", state=_renamed(W.tiny_model().state_dict())),
                   "missing 1 keys .*linear.weight.*unexpected 1 keys .*fc.weight"),
    "unknown model": (lambda root, ck: W.write_attack(root, "x", model_name="vgg19_bn"),
                      "model 'vgg19_bn' is not supported; supported BackdoorBench models: preactresnet18"),
    "missing image": (lambda root, ck: next((ck / "bd_test_dataset").rglob("*.png")).unlink() or ck,
                      "poisoned test image .* is missing"),
    "no dataset": (lambda root, ck: shutil.rmtree(root / "data") or ck, "original cifar10 dataset is needed.*--data-dir"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_folders_fail_in_one_line(case, tmp_path, capsys, checkout):
    root = tmp_path / "checkout"
    shutil.copytree(checkout.parent.parent, root)
    make, message = BAD[case]
    folder = make(root, root / "record" / checkout.name)
    out = tmp_path / "out"
    assert main(["purify", "--backdoorbench", str(folder), "--out", str(out), *TINY]) == 2
    line = _one_error_line(capsys)
    assert re.search(message, line), line
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--arch", "resnet18"], "--backdoorbench brings the model and all data: drop --arch"),
    (["--trust-pickle"], "--trust-pickle applies only to --backdoorbench"),
])
def test_option_conflicts(args, message, tmp_path, capsys, checkout):
    argv = ["purify", "--out", str(tmp_path / "out"), *TINY, *args]
    if "--arch" in args:
        argv += ["--backdoorbench", str(checkout)]
    assert main(argv) == 2
    assert message in _one_error_line(capsys)


def test_model_names_map_onto_the_zoo():
    """torchvision's ResNets keep the zoo's (torchvision) key names; DataParallel's prefix goes."""
    state = models.build("resnet18_imagenet", width=4).state_dict()
    arch, mapped = BB.map_state_dict("resnet18", {"module." + k: v for k, v in state.items()})
    assert arch == "resnet18_imagenet" and list(mapped) == list(state)
    with pytest.raises(BB.BackdoorBenchError, match="not a state dict of tensors"):
        BB.map_state_dict("preactresnet18", {"conv1.weight": np.zeros(3)})


def test_reads_mnist_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    y = np.array([4, 0, 9], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 3, 28, 28)
                                                           + x.tobytes())
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + y.tobytes())
    xs, ys = BB.read_dataset("mnist", tmp_path, "test")
    assert xs.shape == (3, 1, 28, 28) and np.array_equal(xs[:, 0], x) and ys.tolist() == [4, 0, 9]
    with pytest.raises(ValueError, match="cifar-10-batches-py"):
        BB.read_dataset("cifar10", tmp_path, "train")
