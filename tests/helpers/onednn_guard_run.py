"""Runs nft_fast's training and purification entry points on a width-4 ResNet-18 whose
downsampling shortcuts are 1x1 stride-2 convolutions with 4 input channels: the pattern
that corrupts the heap in oneDNN's AVX2 kernel (see nft_fast.layout). With one intra-op
thread an unguarded run aborts within seconds, with two it hangs. tests/test_onednn_guard.py
runs this in a subprocess, so an abort or a hang fails that test instead of the whole suite.

Usage: python tests/helpers/onednn_guard_run.py THREADS STEP[,STEP...] [IMAGE_SIZE (16)]
  train       nft_fast.harness.train.train_classifier (converts the model to channels_last)
  cl          model.to(memory_format=torch.channels_last), as a user would
  finetune    nft_fast.harness.baselines.finetune (every weight trains)
  inputaware  the input-aware attack's joint training of the model and its generators
  purify      nft_fast.purify (frozen weights)
"""
import sys

import torch
from torch.utils.data import TensorDataset

threads, steps = int(sys.argv[1]), sys.argv[2].split(",")
size = int(sys.argv[3]) if len(sys.argv) > 3 else 16
torch.set_num_threads(threads)

import nft_fast  # noqa: E402
from nft_fast import layout, models  # noqa: E402
from nft_fast.harness import attacks, baselines, datasets as data  # noqa: E402
from nft_fast.harness.train import train_classifier  # noqa: E402

torch.manual_seed(0)
model = models.build("resnet18", num_classes=4, in_channels=1, width=4, image_size=size)
x, y = data.toy_images(320, num_classes=4, size=size, seed=0)
ds = TensorDataset(x, y)
print("affected convolutions:", sum(layout.affected_conv(m) for m in model.modules()),
      "| guard active:", layout.onednn_avx2_bug(), flush=True)
for step in steps:
    if step == "train":
        train_classifier(model, ds, epochs=3, batch_size=32, progress=False)
    elif step == "cl":
        model.to(memory_format=torch.channels_last)
    elif step == "finetune":
        baselines.finetune(model, ds, steps=20, rounds=1, batch_size=32, progress=False)
    elif step == "inputaware":
        atk = attacks.build_attack("inputaware", num_classes=4, width=4, mask_epochs=1)
        attacks.train_backdoored(model, x, y, atk, rate=0.1, epochs=1, batch_size=32, progress=False)
    elif step == "purify":
        nft_fast.purify(model, ds, nft_fast.NFTConfig(steps=10, rounds=1, batch_size=32), progress=False)
    else:
        raise SystemExit(f"unknown step {step!r}")
    print("done", step, flush=True)
print("ok")
