"""Property tests of the command line on generated inputs: checkpoints (safetensors and torch
files of random keys, shapes and dtypes, NaN/inf, cut short), data files (.npz, .safetensors,
image folders: dtypes, ranks, shapes, labels negative/huge/float/complex, NaN/inf, lengths that
differ), Fashion-MNIST folders and option values, valid and not.

Every run of ``purify``, ``evaluate`` and ``train-backdoor`` ends in one of two ways:

- exit 0 with the complete outputs the command promises (every file, loadable, finite values);
- exit 2 with exactly one stderr line ``nft-fast: error: ...`` naming the file or option at
  fault, and nothing created in ``--out``;

never a traceback, a signal or another exit code. The runs call ``main(argv)`` in this process
(its exit code is the command's); a few go through ``python -m nft_fast`` as well.

The inputs come from tests/helpers/cli_inputs.py. A small, reproducible budget here (hypothesis
derandomized, no example database); ``python bench/properties.py --examples N`` runs the same
properties with N examples each (``NFT_FAST_PROPERTY_EXAMPLES``). Inputs that once broke the
contract are kept as explicit examples.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

import nft_fast
from nft_fast.config import PRESETS
from tests.helpers.cli_inputs import (CLASSES, FM_FILES, SIZE, check_evaluated, check_outcome, check_purified,
                                      check_trained, checkpoints, data_files, fm_folders, good_checkpoint, good_data,
                                      good_labels, image_folders, listing, option_argv, purify_options, run_cli,
                                      tiny_state, train_options, write_checkpoint, write_data, write_fm_folder,
                                      write_image_folder)

pytestmark = pytest.mark.usefixtures("one_thread", "quick_presets")

EXAMPLES = int(os.environ.get("NFT_FAST_PROPERTY_EXAMPLES", "0"))
FAST = {"--steps": "2", "--rounds": "1", "--batch-size": "4"}


def budget(n: int):
    """``n`` examples here (reproducible), or NFT_FAST_PROPERTY_EXAMPLES (random) when set."""
    return settings(max_examples=EXAMPLES or n, deadline=None, derandomize=not EXAMPLES, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def quick_presets():
    """The strong and auto presets with a 3-step trigger search (150 steps per class otherwise):
    the same code paths, a fraction of the time."""
    with mock.patch.dict(PRESETS["strong"], trigger_steps=3), mock.patch.dict(PRESETS["auto"], trigger_steps=3):
        yield


def purify_argv(folder: Path, ckpt: Path, data: Path, out: Path, options: dict = (), extra=()) -> list:
    opts = dict(FAST, **{k: v for k, v in dict(options).items() if v is not None})  # None: not given
    return ["purify", "--checkpoint", ckpt, "--arch", "preactresnet18", "--data", data, "--out", out, "--no-progress",
            *option_argv(opts), *extra]


def check_purify(argv: list, out: Path, names: tuple) -> int:
    """Run ``purify`` and check the contract; returns the exit code."""
    before = listing(out)
    res = run_cli(argv)
    check_outcome(res, out, before, check_purified(out), names, resume="--resume" in argv)
    return res.rc


# --- purify ---------------------------------------------------------------------------------

@budget(50)
@given(ckpt=checkpoints)
@example(ckpt=good_checkpoint())
@example(ckpt=good_checkpoint(edits=[("dtype", 0, "f8")]))  # float8 weights: isfinite not implemented
@example(ckpt=good_checkpoint(edits=[("classes", 0)]))  # a head of no classes
@example(ckpt=good_checkpoint(edits=[("reshape", 0, (2, 3, 3, 3))]))  # conv1 of 3 input channels
@example(ckpt=good_checkpoint(edits=[("fill", 5, "huge")]))  # 1e38 in a weight: purification overflows
@example(ckpt=good_checkpoint(edits=[("fill", 105, "huge")]))  # a 1e38 logit bias: clean_loss inf
def test_purify_any_checkpoint(ckpt):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        path = write_checkpoint(ckpt, d)
        data = write_data(good_data(), d)
        check_purify(purify_argv(d, path, data, d / "out"), d / "out", (path.name, data.name))


@budget(60)
@given(data=data_files)
@example(data=good_data(dtype="uint64", y=good_labels(dtype="uint64", mode="const", lo=2**62)))
def test_purify_any_clean_set(data):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        path = write_data(data, d)
        check_purify(purify_argv(d, write_checkpoint(good_checkpoint(), d), path, d / "out"), d / "out", (path.name,))


@budget(40)
@given(test=st.one_of(st.none(), data_files), poison=st.one_of(st.none(), data_files), target=st.sampled_from([0, 3]))
@example(test=good_data(n=0), poison=None, target=0)  # an empty test set
@example(test=None, poison=good_data(y=good_labels(mode="const", lo=2)), target=2)  # every sample of the target class
def test_purify_any_evaluation_sets(test, poison, target):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        extra, names = ["--target", target], ["--target"]
        for opt, spec in (("--test-data", test), ("--poison-data", poison)):
            if spec is not None:
                path = write_data(spec, d, opt.strip("-"))
                extra += [opt, path]
                names.append(path.name)
        argv = purify_argv(d, write_checkpoint(good_checkpoint(), d), write_data(good_data(), d), d / "out", extra=extra)
        check_purify(argv, d / "out", tuple(names))


@budget(20)
@given(folder=image_folders)
def test_purify_any_image_folder(folder):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        root = write_image_folder(folder, d)
        argv = purify_argv(d, write_checkpoint(good_checkpoint(), d), root, d / "out")
        check_purify(argv, d / "out", (root.name,))


def test_purify_image_folder_of_a_decompression_bomb(tmp_path):
    """PIL refuses an image of too many pixels (DecompressionBombError, not an OSError): the
    limit lowered so that 8x8 images stand in for a huge one."""
    from PIL import Image

    root = write_image_folder({"classes": CLASSES, "per_class": 2, "size": (SIZE, SIZE), "mode": "L", "bad": None}, tmp_path)
    with mock.patch.object(Image, "MAX_IMAGE_PIXELS", 10):
        rc = check_purify(purify_argv(tmp_path, write_checkpoint(good_checkpoint(), tmp_path), root, tmp_path / "out"),
                          tmp_path / "out", ("0.png",))
    assert rc == 2


def _option_names(argv: list) -> tuple:
    names = [a.split("=")[0] for a in map(str, argv) if str(a).startswith("--")]
    return tuple(names + [n.strip("-") for n in names] + [n.strip("-").replace("-", "_") for n in names])


@budget(60)
@given(options=purify_options, out_exists=st.booleans())
@example(options={"--seed": "-5"}, out_exists=False)  # numpy's "expected non-negative integer"
@example(options={"--seed": str(2**70)}, out_exists=False)  # "Overflow when unpacking long long"
@example(options={"--batch-size": "1"}, out_exists=False)  # BatchNorm: one value per channel
@example(options={"--per-class": "4"}, out_exists=True)  # more per class than the clean set has
@example(options={"--lr": "1e+308"}, out_exists=False)  # accepted: the round's learning rate inf in report.json
@example(options={"--lr": "1e+308", "--backend": "torch"}, out_exists=False)  # RuntimeError: overflow in float32
@example(options={"--lr": "3e+38", "--backend": "torch"}, out_exists=True)  # the largest accepted: float32
def test_purify_any_options(options, out_exists):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        out = d / "out"
        if out_exists:
            out.mkdir()
        argv = purify_argv(d, write_checkpoint(good_checkpoint(), d), write_data(good_data(), d), out, options)
        check_purify(argv, out, _option_names(argv))


# --- evaluate -------------------------------------------------------------------------------

def mostly(good, strategy):
    """``good`` in about half the draws, else ``strategy``'s."""
    return st.one_of(st.just(good), strategy)


@budget(60)
@given(ckpt=mostly(good_checkpoint(), checkpoints), test=mostly(good_data(), st.one_of(st.none(), data_files)),
       poison=st.one_of(st.none(), mostly(good_data(), data_files)),
       target=mostly("0", st.sampled_from(["3", "-1", "4", "x"])),
       arch=mostly("preactresnet18", st.sampled_from([None, "nosuch"])), as_json=st.booleans())
@example(ckpt=good_checkpoint(edits=[("fill", 105, "huge")]), test=good_data(), poison=None, target="0",
         arch="preactresnet18", as_json=True)  # a 1e38 logit bias: clean_loss Infinity printed as JSON
def test_evaluate_any_inputs(ckpt, test, poison, target, arch, as_json):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        path = write_checkpoint(ckpt, d)
        argv, names = ["evaluate", "--checkpoint", path, "--target", target], [path.name]
        if arch:
            argv += ["--arch", arch]
        for opt, spec in (("--test-data", test), ("--poison-data", poison)):
            if spec is not None:
                p = write_data(spec, d, opt.strip("-"))
                argv += [opt, p]
                names.append(p.name)
        if as_json:
            argv.append("--json")
        before = listing(d)
        res = run_cli(argv)
        check_outcome(res, d, before, check_evaluated, tuple(names) + _option_names(argv))
        assert listing(d) == before


# --- train-backdoor -------------------------------------------------------------------------

GOOD_FM = {"train": 60, "test": 20, "side": SIZE, "classes": 10, "shift": 0, "file": 0, "change": None}


@budget(50)
@given(fm=mostly(GOOD_FM, fm_folders), options=train_options, out_exists=st.booleans())
@example(fm=dict(GOOD_FM, change="truncate"), options={}, out_exists=False)  # EOFError from gzip
@example(fm=dict(GOOD_FM, change="short_header"), options={}, out_exists=False)  # struct.error
@example(fm=dict(GOOD_FM, file=1, change="count"), options={}, out_exists=False)  # 60 images, 59 labels: accepted
@example(fm=dict(GOOD_FM, shift=250), options={}, out_exists=False)  # labels beyond the 10 classes
@example(fm=dict(GOOD_FM, test=1), options={}, out_exists=False)  # only the target class: ASR NaN in run.json
@example(fm=GOOD_FM, options={"--epochs": str(10**30)}, out_exists=False)  # accepted: 10**30 epochs
@example(fm=GOOD_FM, options={"--train-subset": "-3"}, out_exists=False)  # accepted: all but 3 samples
@example(fm=GOOD_FM, options={"--lr": "nan"}, out_exists=False)  # error named a staging file
@example(fm=GOOD_FM, options={"--clean-fraction": "0.999"}, out_exists=False)  # nothing left to train on
@example(fm=GOOD_FM, options={"--batch-size": "1"}, out_exists=False)  # BatchNorm: one value per channel
@example(fm=GOOD_FM, options={"--batch-size": "1000"}, out_exists=False)  # accepted: not one batch trained
@example(fm=GOOD_FM, options={"--lr": "1e30", "flags": ["--resume"]}, out_exists=True)  # diverges after --resume's note
def test_train_backdoor_any_inputs(fm, options, out_exists):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        root, out = write_fm_folder(fm, d), d / "out"
        if out_exists:
            out.mkdir()
        opts = dict({"--width": "2", "--epochs": "1", "--batch-size": "16"},
                    **{k: v for k, v in options.items() if v is not None})
        argv = ["train-backdoor", "--data-dir", root, "--out", out, "--no-progress", *option_argv(opts)]
        before = listing(out)
        res = run_cli(argv)
        attack = opts.get("--attack") or "badnets"  # the attacks' own errors start with its name
        check_outcome(res, out, before, check_trained(out), (root.name, attack, *FM_FILES, *_option_names(argv)),
                      resume="--resume" in argv)


# --- the same contract through `python -m nft_fast` (exit codes, signals, stderr) ------------

@pytest.mark.parametrize("case", ["good", "cut-checkpoint", "nan-data", "fm-truncated"])
def test_console_entry_point_contract(tmp_path, case):
    d = tmp_path
    ckpt = write_checkpoint(good_checkpoint(truncate=100 if case == "cut-checkpoint" else None), d)
    data = write_data(good_data(bad="nan" if case == "nan-data" else None), d)
    out = d / "out"
    if case == "fm-truncated":
        fm = {"train": 60, "test": 20, "side": SIZE, "classes": 10, "shift": 0, "file": 1, "change": "truncate"}
        argv = ["train-backdoor", "--data-dir", write_fm_folder(fm, d), "--width", "2", "--epochs", "1", "--out", out,
                "--no-progress"]
        on_success = check_trained(out)
    else:
        argv = purify_argv(d, ckpt, data, out)
        on_success = check_purified(out)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-m", "nft_fast", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    from tests.helpers.cli_inputs import Outcome

    check_outcome(Outcome(proc.returncode, proc.stdout, proc.stderr), out, None, on_success)
    assert (proc.returncode == 0) == (case == "good")


# --- the Python API: labels checked before a step, a lazy dataset not read whole ------------

def _masked_model():
    from nft_fast import models

    model = models.build("preactresnet18", num_classes=CLASSES, in_channels=1, width=2, image_size=SIZE)
    model.load_state_dict(tiny_state())
    nft_fast.attach_masks(model)
    return model


@budget(15)
@given(labels=st.lists(st.integers(-3, 2**40), min_size=2, max_size=6), given_classes=st.booleans())
@example(labels=[0, 1, 2, 4], given_classes=True)
@example(labels=[3, 2**40], given_classes=False)
def test_step_checks_labels_before_computing(labels, given_classes):
    """Labels outside the classes are refused before the step computes anything (with
    ``num_classes`` not even a forward pass; without, one eval-mode pass that changes nothing)."""
    model = _masked_model()
    p = nft_fast.Purifier(model, nft_fast.NFTConfig(steps=2, rounds=1, batch_size=4),
                          num_classes=CLASSES if given_classes else None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = torch.tensor(labels)
    x = torch.rand(len(labels), 1, SIZE, SIZE)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    if all(0 <= v < CLASSES for v in labels):
        p.step(x, y)
        assert calls and p.steps_done == 1
        return
    with pytest.raises(ValueError, match=f"labels must lie in 0..{CLASSES - 1}"):
        p.step(x, y)
    assert len(calls) == (0 if given_classes else 1) and p.steps_done == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class LongLazySet(Dataset):
    """A million samples made on demand; counts the ones read."""

    def __init__(self, n: int = 10**6) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        g = torch.Generator().manual_seed(int(i))
        return torch.rand(1, SIZE, SIZE, generator=g), int(i) % CLASSES


def test_check_clean_data_reads_a_bounded_part_of_a_long_dataset():
    from nft_fast._loop import CHECK_ITEMS, check_clean_data

    data = LongLazySet()
    x0, classes = check_clean_data(_masked_model(), data, "purify")
    assert classes == CLASSES and x0.shape == (1, 1, SIZE, SIZE)
    assert 0 < data.reads <= 2 * CHECK_ITEMS + 1


def test_check_clean_data_still_finds_a_bad_item_among_the_first():
    from nft_fast._loop import check_clean_data

    class NanAt(LongLazySet):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x * float("nan") if i == 5 else x), y

    with pytest.raises(ValueError, match="item 5.*NaN/inf"):
        check_clean_data(_masked_model(), NanAt(), "purify")


def test_purify_with_a_long_lazy_dataset_reads_what_it_uses():
    """The up-front check and the batches drawn, not the million items."""
    from nft_fast._loop import CHECK_ITEMS

    data = LongLazySet()
    nft_fast.purify(_masked_model(), data, nft_fast.NFTConfig(steps=2, rounds=1, batch_size=4), progress=False)
    assert data.reads <= 2 * CHECK_ITEMS + 1 + 2 * 4
