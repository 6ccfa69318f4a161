"""Writes small BackdoorBench attack folders for the tests (tests/test_backdoorbench.py).

The layout follows BackdoorBench (github.com/SCLBD/BackdoorBench): ``utils/save_load_attack.py``
``save_attack_result`` (the keys of ``attack_result.pt``), ``utils/bd_dataset_v2.py``
(``prepro_cls_DatasetBD_v2.retrieve_state`` and its ``poisonedCLSDataContainer``: the poisoned
images saved as ``<save folder>/<true label>/<index>.png``, paths relative to their checkout),
``models/preact_resnet.py`` (the PreActResNet-18 key layout, here at a small width) and
torchvision's CIFAR-10 python batches for the original dataset. A checkout looks like::

    root/record/<name>/attack_result.pt
    root/record/<name>/bd_test_dataset/<label>/<index>.png
    root/record/<name>/bd_train_dataset/<label>/<index>.png
    root/data/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch}
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES, TARGET = 10, 0


class PreActBlock(nn.Module):
    """BackdoorBench's pre-activation block (models/preact_resnet.py), written out for the tests."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + sc


class PreActResNet18(nn.Module):
    """BackdoorBench's PreActResNet-18 at ``width`` (64 there): no BN after the last stage."""

    def __init__(self, num_classes: int = CLASSES, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        c, layers = width, []
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2 ** i
            layers.append(nn.Sequential(PreActBlock(c, planes, stride), PreActBlock(planes, planes, 1)))
            c = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).flatten(1))


def tiny_model(width: int = 4, seed: int = 0) -> PreActResNet18:
    torch.manual_seed(seed)
    m = PreActResNet18(CLASSES, width)
    with torch.no_grad():  # non-trivial BN statistics, so a wrong mapping shows
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
    return m.eval()


def write_cifar10(root: Path, n_train: int = 2000, n_test: int = 60, seed: int = 0) -> Path:
    """torchvision's CIFAR-10 python batches (five train batches and test_batch) of random
    images with balanced labels, under ``root/cifar-10-batches-py``."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    per = n_train // 5
    batches = [(f"data_batch_{i + 1}", per) for i in range(5)] + [("test_batch", n_test)]
    for name, n in batches:
        labels = [int(v) for v in np.arange(n) % CLASSES]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"img_{i}.png" for i in range(n)]}, f, protocol=2)
    return d


def _badnet(img: np.ndarray) -> np.ndarray:
    """A 3x3 white patch in the lower right corner, on an (H, W, C) uint8 image."""
    out = img.copy()
    out[-4:-1, -4:-1] = 255
    return out


def _test_images(root: Path) -> tuple:
    with open(root / "data" / "cifar10" / "cifar-10-batches-py" / "test_batch", "rb") as f:
        d = pickle.load(f, encoding="latin1")
    return d["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(d["labels"])


def _dataset_state(container: Dict[str, Any], index: np.ndarray, indicator: np.ndarray) -> Dict[str, Any]:
    """``prepro_cls_DatasetBD_v2.retrieve_state()``."""
    return {"bd_data_container": container, "getitem_all": True, "getitem_all_switch": False,
            "original_index_array": index, "poison_indicator": indicator,
            "save_folder_path": container["save_folder_path"]}


def write_attack(root: Path, name: str = "badnet_tiny", *, in_pickle: bool = False, model_name: str = "preactresnet18",
                 state: Optional[Dict[str, torch.Tensor]] = None, extra: Optional[Dict[str, Any]] = None,
                 drop: tuple = (), width: int = 4, n_train: int = 2000) -> Path:
    """A BackdoorBench checkout under ``root`` with one BadNets attack ``record/<name>``; returns
    the attack folder. ``in_pickle``: the poisoned images inside attack_result.pt as PIL images
    (their container without a save folder) instead of PNG files. ``state``: the model's state
    dict (default: :func:`tiny_model`'s); ``extra`` entries are added to the saved dict,
    ``drop`` keys removed from it."""
    from PIL import Image

    root = Path(root)
    if not (root / "data" / "cifar10" / "cifar-10-batches-py").is_dir():
        write_cifar10(root / "data" / "cifar10", n_train=n_train)
    folder = root / "record" / name
    folder.mkdir(parents=True)
    save_path = f"./record/{name}"  # BackdoorBench's paths are relative to its checkout

    x, y = _test_images(root)
    indicator = (y != TARGET).astype(np.float64)  # generate_poison_index_from_label_transform(train=False)
    container: Dict[str, Any] = {"save_folder_path": None if in_pickle else f"{save_path}/bd_test_dataset",
                                 "data_dict": {}, "save_file_format": ".png"}
    for i in np.arange(len(y)):  # numpy int64 keys, as prepro_backdoor iterates original_index_array
        if indicator[i] != 1:
            continue
        img = Image.fromarray(_badnet(x[i]))
        label = int(y[i])
        if in_pickle:
            container["data_dict"][i] = (img, TARGET, label)
        else:
            sub = folder / "bd_test_dataset" / str(label)
            sub.mkdir(parents=True, exist_ok=True)
            img.save(sub / f"{i}.png")
            container["data_dict"][i] = {"path": f"{container['save_folder_path']}/{label}/{i}.png",
                                         "other_info": [TARGET, label]}
    bd_test = _dataset_state(container, np.where(indicator == 1)[0], indicator)

    # bd_train: a few poisoned training samples, as files (not read by the loader)
    train_ind = np.zeros(n_train)
    train_ind[[3, 7]] = 1
    train_cont: Dict[str, Any] = {"save_folder_path": f"{save_path}/bd_train_dataset", "data_dict": {},
                                  "save_file_format": ".png"}
    for i in np.where(train_ind == 1)[0]:
        sub = folder / "bd_train_dataset" / "1"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(sub / f"{i}.png")
        train_cont["data_dict"][i] = {"path": f"{train_cont['save_folder_path']}/1/{i}.png", "other_info": [TARGET, 1]}
    bd_train = _dataset_state(train_cont, np.arange(n_train), train_ind)

    save = {"model_name": model_name, "num_classes": CLASSES,
            "model": tiny_model(width).state_dict() if state is None else state,
            "data_path": "./data/cifar10", "img_size": (32, 32, 3), "clean_data": "cifar10",
            "bd_train": bd_train, "bd_test": bd_test}
    save.update(extra or {})
    for k in drop:
        save.pop(k)
    torch.save(save, folder / "attack_result.pt")
    return folder


class Malicious:
    """Runs ``touch <marker>`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)
