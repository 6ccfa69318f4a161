"""Shared pieces of the training loops (NFT, the baselines, classifier training): clean data,
batches and progress bars."""
from __future__ import annotations

import contextlib
from typing import Iterator, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, TensorDataset

CleanData = Union[Dataset, DataLoader]
#: :func:`check_clean_data` reads at most this many leading items of a map-style Dataset, plus as
#: many drawn at random from the rest.
CHECK_ITEMS = 256


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval() mode with every parameter's requires_grad off (searches that optimise
    an input, not the weights); mode and flags restored on exit."""
    was = model.training
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)


def fork_rng(device: torch.device):
    """Fork the global RNG (CPU, and ``device`` if a GPU) so seeding it leaves the caller's state alone."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def num_samples(data: CleanData) -> int:
    """Samples in a clean Dataset / DataLoader; an empty clean set is an error."""
    n = len(data.dataset if isinstance(data, DataLoader) else data)
    if n == 0:
        raise ValueError("the clean set is empty")
    return n


def first_batch(data: CleanData) -> tuple:
    """The first batch of a DataLoader, or a Dataset's first sample as a batch of one."""
    if isinstance(data, DataLoader):
        return next(iter(data))
    x, y = data[0]
    return torch.as_tensor(x).unsqueeze(0), torch.as_tensor(y).view(1)


def infer_num_classes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Classes read off the model's logits on one sample (train/eval mode restored)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:1].to(model_device(model)))
    finally:
        model.train(was)
    if out.dim() != 2:
        raise ValueError(f"model output must be (batch, classes) logits, got shape {tuple(out.shape)}")
    return out.shape[1]


def check_model(model, owner: str) -> None:
    """``model`` is an ``nn.Module`` whose parameters and buffers hold data (not on the meta device)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(f"{owner}: model has {len(meta)} parameters/buffers on the meta device (no data), e.g. "
                         f"{meta[:3]}: materialize it first (model.to_empty(device=...) and load_state_dict)")


def _pair(item, owner: str, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` tensors of one item or batch of the clean data, or a TypeError naming what it was."""
    if isinstance(item, dict):
        raise TypeError(f"{owner}: clean_data must yield (x, y) pairs, but {where} is a dict with keys "
                        f"{sorted(map(str, item))[:6]}: wrap the dataset so that it returns (input, label)")
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"{owner}: clean_data must yield (x, y) pairs, but {where} is a {type(item).__name__}"
                        + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))
    out = []
    for name, v in (("input", item[0]), ("label", item[1])):
        if not isinstance(v, (torch.Tensor, np.ndarray, int, float, np.number)) or isinstance(v, bool):
            raise TypeError(f"{owner}: clean_data must yield tensors, but the {name} of {where} is a {type(v).__name__}")
        out.append(torch.as_tensor(v))
    x, y = out
    if not x.is_floating_point():
        raise TypeError(f"{owner}: clean_data's inputs must be floating-point tensors, got {x.dtype} ({where})")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{owner}: clean_data's labels must be integer class indices, got {y.dtype} ({where})")
    return x, y


def check_clean_data(model: torch.nn.Module, data: CleanData, owner: str) -> Tuple[torch.Tensor, int]:
    """Check a clean Dataset / DataLoader against ``model`` before anything is changed: (x, y)
    pairs of a floating-point input the model takes and integer labels in ``0 ..
    classes - 1``, every input finite and within :data:`nft_fast.data.MAX_ABS_INPUT`. Tensor
    datasets are checked whole as tensors. Other map-style datasets are checked sample by
    sample, but only the first :data:`CHECK_ITEMS` items and as many more drawn at random (a
    fixed seed) from the rest: reading a huge or lazily loaded dataset whole before purifying
    would cost more than the purification; every batch drawn later is checked again by
    :meth:`nft_fast.Purifier.step` (finite inputs, labels in range) before it is used. Their
    transforms draw from a forked global RNG, so the caller's stream is unchanged.
    Returns the first batch's inputs and the number of classes of the model's logits."""
    from .data import ArrayDataset, check_inputs, check_labels

    n = num_samples(data)
    loader = isinstance(data, DataLoader)
    first = next(iter(data)) if loader else data[0]
    x0, y0 = _pair(first, owner, "the first batch" if loader else "clean_data[0]")
    if not loader:
        x0, y0 = x0.unsqueeze(0), y0.reshape(1)
    try:
        classes = infer_num_classes(model, x0)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise ValueError(f"{owner}: clean_data's inputs of shape {tuple(x0.shape[1:])} ({x0.dtype}) do not fit the "
                         f"model: {str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}") from None
    what = "clean set (clean_data)"
    ds = data.dataset if loader else data
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        xs, ys = ds.tensors[0], ds.tensors[1]
    elif isinstance(ds, ArrayDataset):  # its augmentation (crop with zero padding, flip) keeps values
        xs, ys = ds.x, ds.y
    elif isinstance(ds, IterableDataset):
        return x0, classes  # no random access: only the first batch was checked
    else:
        items = torch.arange(min(n, CHECK_ITEMS))
        if n > 2 * CHECK_ITEMS:
            g = torch.Generator().manual_seed(0)
            items = torch.cat([items, torch.randint(CHECK_ITEMS, n, (CHECK_ITEMS,), generator=g).unique()])
        elif n > CHECK_ITEMS:
            items = torch.arange(n)
        with fork_rng(torch.device("cpu")):
            for i in items.tolist():
                x, y = _pair(ds[i], owner, f"clean_data item {i}")
                check_inputs(x.unsqueeze(0), f"{what} item {i}")
                check_labels(y.reshape(-1), classes, f"{what} item {i}")
        return x0, classes
    check_inputs(torch.as_tensor(xs), what)
    ys = torch.as_tensor(ys)
    if ys.is_floating_point() or ys.is_complex() or ys.dtype == torch.bool:
        raise TypeError(f"{owner}: clean_data's labels must be integer class indices, got {ys.dtype}")
    check_labels(ys.reshape(-1), classes, what)
    return x0, classes


def check_batch_size(batch_size: int, n: int, owner: str) -> None:
    """A Dataset is sampled with replacement, so a batch may repeat samples (the reference's
    one-shot setting draws batches of 128 from 10 images), but a batch above both the clean
    set and the reference's 128 only repeats samples at a higher cost: refused."""
    if batch_size > max(n, 128):
        raise ValueError(f"{owner}: batch_size {batch_size} is larger than the clean set ({n} samples): batches are "
                         f"drawn with replacement, so a larger batch only repeats samples; use at most {max(n, 128)}")


def check_norm_batch(model: torch.nn.Module, x0: torch.Tensor, batch_size: int, owner: str) -> None:
    """Refuse batches of one sample when a BatchNorm layer of ``model`` sees a 1x1 map (or a
    vector) on ``x0``'s samples: one value per channel has no batch statistics in training.
    Found with one eval-mode forward of one sample (nothing changes)."""
    if batch_size > 1:
        return
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    single = []
    hooks = [m.register_forward_pre_hook(lambda _, inp, name=name: single.append(name) if inp[0][0, 0].numel() == 1
                                         else None) for name, m in bns]
    try:
        infer_num_classes(model, x0)
    finally:
        for h in hooks:
            h.remove()
    if single:
        raise ValueError(f"{owner}: batch_size {batch_size} gives the BatchNorm layer {single[0]} one value per channel "
                         "(no batch statistics in training): use a batch size of at least 2")


class Batches:
    """Clean batches: a Dataset is sampled with replacement (a fresh sampler per ``take``,
    all drawn from one seeded generator); a DataLoader is used as given and restarted."""

    def __init__(self, data: CleanData, batch_size: int, gen: torch.Generator, num_workers: int = 0) -> None:
        self.data, self.batch_size, self.gen, self.num_workers = data, batch_size, gen, num_workers
        self.it = None

    def take(self, n: int) -> Iterator:
        if isinstance(self.data, DataLoader):
            for _ in range(n):
                try:
                    if self.it is None:
                        raise StopIteration
                    batch = next(self.it)
                except StopIteration:
                    self.it = iter(self.data)
                    batch = next(self.it)
                yield batch[0], batch[1]
        else:
            sampler = RandomSampler(self.data, replacement=True, num_samples=n * self.batch_size, generator=self.gen)
            yield from DataLoader(self.data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar (off when not a TTY), or a no-op one."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=None)
