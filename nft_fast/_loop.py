"""Shared pieces of the training loops (NFT, the baselines, classifier training): clean data,
batches and progress bars."""
from __future__ import annotations

import contextlib
from typing import Iterator, Union

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

CleanData = Union[Dataset, DataLoader]


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
