"""Bad inputs end cleanly: on the command line one line ``nft-fast: error: ...``, exit code 2,
nothing written into ``--out`` (not even an empty folder) and no input changed; in the Python
API a ValueError / TypeError naming the argument, raised before anything is changed.

Everything runs on a PreActResNet-18 of width 2 on 8x8 grey images with a 20-image clean set.
"""
from __future__ import annotations

import copy
import hashlib
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import nft_fast
import nft_fast.machine
from nft_fast import models
from nft_fast.app import pipeline
from nft_fast.harness import datasets
from nft_fast.harness.runs import BackdoorSpec
from nft_fast.app.cli import main
from nft_fast.config import MAX_STEPS
from nft_fast.io import CheckpointError, save_state_dict

CLASSES, SIZE, N = 4, 8, 20
FAST = ["--steps", "2", "--rounds", "1", "--batch-size", "8", "--no-progress"]


def build(width: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build("preactresnet18", num_classes=CLASSES, in_channels=1, width=width, image_size=SIZE)


def write_npz(path: Path, n: int = N, x=None, y=None, **extra) -> Path:
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, SIZE, SIZE), dtype=np.float32) if x is None else x
    y = np.arange(n) % CLASSES if y is None else y
    np.savez(path, x=x, y=y, **extra)
    return path


def digest(paths) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    ckpt = d / "model.safetensors"
    save_state_dict(build().state_dict(), ckpt)
    return {"ckpt": ckpt, "data": write_npz(d / "clean.npz"), "test": write_npz(d / "test.npz", n=12),
            "out": tmp_path / "out", "dir": d}


@pytest.fixture
def refused(capsys, files):
    """Run the CLI in-process; assert the one-line refusal, exit code 2, nothing written, inputs unchanged."""

    def run(argv, *needles, out=None):
        out = Path(out or files["out"])
        before_out = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        inputs = [p for p in files["dir"].rglob("*")] + ([p for p in out.rglob("*")] if out.is_dir() else [])
        before = digest(inputs)
        rc = main([str(a) for a in argv])
        _, err = capsys.readouterr()
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nft-fast: error: "), err
        for needle in needles:
            assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
        if before_out is None:
            assert not out.exists(), f"{out} was created"
        else:
            assert sorted(p.name for p in out.iterdir()) == before_out
        assert digest(inputs) == before
        return lines[0]

    return run


def purify_argv(files, *extra, ckpt=None, data=None, out=None):
    return ["purify", "--checkpoint", ckpt or files["ckpt"], "--arch", "preactresnet18", "--data", data or files["data"],
            "--out", out or files["out"], *FAST, *extra]


def test_legitimate_inputs_still_purify(files, capsys):
    """The control: a batch above the clean set (drawn with replacement), one image per class."""
    rc = main([str(a) for a in purify_argv(files, "--test-data", files["test"], "--poison-data", files["test"],
                                           "--target", "3", "--per-class", "1", "--batch-size", "100")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((files["out"] / "report.json").read_text())
    assert report["clean_samples"] == CLASSES
    for name in ("purified.safetensors", "masks.safetensors", "report.md", "masks_hist.png", "rounds.png"):
        assert (files["out"] / name).is_file(), name


# --- 1. sizes declared by files are checked before anything is allocated --------------------

def test_checkpoint_declaring_an_absurd_width(files, refused, tmp_path):
    state = build().state_dict()
    state["conv1.weight"] = torch.empty(10**6, 1, 0, 0)
    ckpt = files["dir"] / "wide.safetensors"
    save_state_dict(state, ckpt)
    refused(purify_argv(files, ckpt=ckpt), "wide.safetensors", "width 1000000", "memory")


def test_checkpoint_larger_than_the_memory(files, refused, monkeypatch):
    pt = files["dir"] / "model.pt"
    torch.save(build().state_dict(), pt)
    monkeypatch.setattr(nft_fast.machine, "available_memory", lambda: 1000)
    refused(purify_argv(files), "model.safetensors", "memory")
    refused(purify_argv(files, ckpt=pt), "model.pt", "memory")


def test_safetensors_header_inconsistent_with_the_file(files, refused):
    header = json.dumps({"conv1.weight": {"dtype": "F32", "shape": [10**9, 10**6], "data_offsets": [0, 4 * 10**15]}})
    ckpt = files["dir"] / "lies.safetensors"
    ckpt.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 64)
    refused(purify_argv(files, ckpt=ckpt), "lies.safetensors", "conv1.weight")


def test_npz_declaring_more_than_the_memory(files, refused):
    """Only the .npy headers are read: the declared x (a terabyte) is refused, not allocated."""
    path = files["dir"] / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for name, shape, dtype in (("x", (10**7, 3, 224, 224), "<f4"), ("y", (10**7,), "<i8")):
            with zf.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
    refused(purify_argv(files, data=path), "huge.npz", "memory")


@pytest.mark.skipif(not (datasets.data_dir() / "train-images-idx3-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist not installed")
def test_run_json_with_an_absurd_width(files, refused, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    spec = BackdoorSpec(arch="preactresnet18", width=1000000).to_dict()
    (run / "run.json").write_text(json.dumps({"spec": spec}))
    save_state_dict(build().state_dict(), run / "model.safetensors")
    refused(["purify", "--run", run, "--out", files["out"], *FAST], "run.json", "width 1000000", "memory")


# --- 2. run.json ----------------------------------------------------------------------------

@pytest.mark.parametrize("content,needle", [
    ({"attack": {}}, '"spec"'), ("not json", "not valid JSON"), ({"spec": {"width": "wide"}}, "width"),
    ({"spec": {"arch": "nosuch"}}, "arch"),
])
def test_broken_run_json(files, refused, tmp_path, content, needle):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(content if isinstance(content, str) else json.dumps(content))
    refused(["purify", "--run", run, "--out", files["out"], *FAST], "run.json", needle)


# --- 3.-4. data that does not fit the model -------------------------------------------------

def test_clean_set_of_the_wrong_rank(files, refused):
    data = write_npz(files["dir"] / "clips.npz", x=np.random.default_rng(0).random((N, 1, 2, SIZE, SIZE), np.float32))
    refused(purify_argv(files, data=data), "clips.npz", "(1, 2, 8, 8)", "(C, H, W)")


def test_test_set_labels_beyond_the_classes(files, refused):
    test = write_npz(files["dir"] / "bad_test.npz", n=12, y=np.arange(12) % (CLASSES + 2))
    refused(purify_argv(files, "--test-data", test), "bad_test.npz", "labels outside 0..3")
    poison = write_npz(files["dir"] / "bad_poison.npz", n=12, y_target=np.full(12, 7))
    refused(purify_argv(files, "--poison-data", poison), "bad_poison.npz", "y_target", "outside")


@pytest.mark.parametrize("which", ["--data", "--test-data"])
def test_x_and_y_of_different_lengths(files, refused, which):
    rng = np.random.default_rng(0)
    bad = write_npz(files["dir"] / "uneven.npz", x=rng.random((30, 1, SIZE, SIZE), np.float32), y=np.arange(20) % CLASSES)
    argv = purify_argv(files, data=bad) if which == "--data" else purify_argv(files, "--test-data", bad)
    refused(argv + ["--per-class", "1"], "uneven.npz", "x has 30 samples but y has 20")


# --- 5. magnitudes, and non-finite results ----------------------------------------------------

def test_absurd_input_magnitude(files, refused):
    x = np.random.default_rng(0).random((N, 1, SIZE, SIZE)).astype(np.float32)
    x[3] = 1e30
    data = write_npz(files["dir"] / "huge_values.npz", x=x)
    refused(purify_argv(files, data=data), "clean set", "magnitude", "[3]")
    refused(purify_argv(files, "--test-data", data), "huge_values.npz", "magnitude")


def test_non_finite_result_is_not_written(files, refused, monkeypatch):
    real = pipeline.purify

    def nan_bn(model, *a, **kw):
        res = real(model, *a, **kw)
        res.model.layer1[0].bn2.running_var.fill_(float("nan"))
        return res

    monkeypatch.setattr(pipeline, "purify", nan_bn)
    refused(purify_argv(files), "non-finite", "nothing was written", "running_var")


def test_save_state_dict_refuses_non_finite(tmp_path):
    with pytest.raises(CheckpointError, match="NaN/inf"):
        save_state_dict({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "w.safetensors")
    assert not list(tmp_path.iterdir())


# --- 6. option and type errors ----------------------------------------------------------------

def test_negative_per_class(files, refused):
    refused(purify_argv(files, "--per-class", "-1"), "--per-class", "-1")


def test_complex_labels(files, refused):
    data = write_npz(files["dir"] / "complex.npz", y=(np.arange(N) % CLASSES).astype(np.complex64))
    refused(purify_argv(files, data=data), "complex.npz", "integer")


def test_integer_weights(files, refused):
    state = build().state_dict()
    state["linear.weight"] = state["linear.weight"].round().to(torch.int32)
    ckpt = files["dir"] / "int.safetensors"
    save_state_dict(state, ckpt)
    refused(purify_argv(files, ckpt=ckpt), "int.safetensors", "linear.weight", "integer")


@pytest.mark.parametrize("target", ["99", "-1", "4"])
def test_target_outside_the_classes(files, refused, target):
    refused(purify_argv(files, "--target", target), "--target", "0..3")


# --- 7. bounds on the work asked for ----------------------------------------------------------

@pytest.mark.parametrize("steps,needle", [("1e23", "invalid int"), (str(10**23), f"at most {MAX_STEPS}")])
def test_absurd_steps(files, refused, steps, needle):
    refused(purify_argv(files, "--steps", steps), "--steps", needle)


def test_batch_far_above_the_clean_set(files, refused):
    refused(purify_argv(files, "--batch-size", "100000"), "batch_size 100000", "20 samples")


def test_argparse_errors_are_one_line_too(files, refused):
    refused(["purify", "--out", files["out"], "--no-such-option"], "--no-such-option")


# --- 8.-9. the output folder ------------------------------------------------------------------

@pytest.mark.parametrize("name", pipeline.OUTPUTS)
def test_input_named_like_an_output(files, refused, tmp_path, name):
    out = tmp_path / "shared"
    out.mkdir()
    ckpt = out / name
    if name.endswith(".safetensors"):
        save_state_dict(build().state_dict(), ckpt)
    else:  # a torch file by any other name is still a checkpoint
        torch.save(build().state_dict(), ckpt)
    refused(purify_argv(files, "--test-data", files["test"], ckpt=ckpt, out=out), "refusing to overwrite", name, out=out)


def test_data_file_named_like_a_plot(files, refused, tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    test = write_npz(out / "rounds.png", n=12)
    refused(purify_argv(files, "--test-data", test, out=out), "refusing to overwrite", "rounds.png", out=out)


def test_output_path_taken_by_a_directory(files, refused, tmp_path):
    out = tmp_path / "taken"
    (out / "report.md").mkdir(parents=True)
    refused(purify_argv(files, out=out), "report.md", "not a regular file", out=out)


def test_out_below_a_regular_file(files, refused, tmp_path):
    (tmp_path / "afile").write_text("x")
    refused(purify_argv(files, out=tmp_path / "afile" / "sub" / "out"), "not a directory")


def test_console_entry_point(files):
    """The same refusal through ``python -m nft_fast``."""
    argv = [str(a) for a in purify_argv(files, "--target", "99")]
    proc = subprocess.run([sys.executable, "-m", "nft_fast", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("nft-fast: error:")
    assert not files["out"].exists()


# --- 10.-12. the Python API -------------------------------------------------------------------

def clean_set(n: int = N):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, SIZE, SIZE, generator=g), torch.arange(n) % CLASSES)


CFG = nft_fast.NFTConfig(steps=2, rounds=1, batch_size=8)


def snapshot(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lam", [float("nan"), 2.0, -1.0, float("inf")])
def test_step_lam_checked_before_anything_changes(lam):
    model = build()
    nft_fast.attach_masks(model)
    p = nft_fast.Purifier(model, CFG)
    before = snapshot(model)
    x, y = clean_set(8).tensors
    with pytest.raises(ValueError, match="lam"):
        p.step(x, y, lam=lam, perm=torch.randperm(8))
    assert same(before, snapshot(model)) and p.steps_done == 0
    x[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        p.step(x, y)
    assert same(before, snapshot(model))
    p.step(*clean_set(8).tensors, lam=0.3, perm=torch.randperm(8))  # a good step still works


def test_purify_inplace_on_nan_data_leaves_the_model_alone():
    model = build().eval()
    before = snapshot(model)
    x, y = clean_set().tensors
    x[5] = float("nan")
    for data in (TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=8)):
        with pytest.raises(ValueError, match="NaN/inf"):
            nft_fast.purify(model, data, CFG, inplace=True, progress=False)
        assert same(before, snapshot(model)) and not nft_fast.mask_parameters(model) and not model.training
        assert all(p.requires_grad for p in model.parameters())


class DictSet(Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"image": torch.rand(1, SIZE, SIZE), "label": i % CLASSES}


class NanAt(Dataset):
    """A map-style dataset (not tensors): checked sample by sample."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        x = torch.rand(1, SIZE, SIZE)
        return (x * float("nan") if i == 7 else x), i % CLASSES


def test_api_argument_errors():
    model, data = build(), clean_set()
    before = snapshot(model)
    with pytest.raises(TypeError, match="clean_data.*dict.*image"):
        nft_fast.purify(model, DataLoader(DictSet(), batch_size=4), CFG, inplace=True, progress=False)
    with pytest.raises(TypeError, match="clean_data.*dict"):
        nft_fast.purify(model, DictSet(), CFG, inplace=True, progress=False)
    with pytest.raises(ValueError, match="item 7.*NaN/inf"):
        nft_fast.purify(model, NanAt(), CFG, inplace=True, progress=False)
    with pytest.raises(TypeError, match="cfg must be an NFTConfig"):
        nft_fast.purify(model, data, {"steps": 2}, inplace=True, progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        nft_fast.purify(model, data, CFG, num_classes=0, inplace=True, progress=False)
    with pytest.raises(ValueError, match="labels outside 0..3"):
        nft_fast.purify(model, TensorDataset(data.tensors[0], data.tensors[1] + 1), CFG, inplace=True, progress=False)
    with pytest.raises(ValueError, match="do not fit the model"):
        nft_fast.purify(model, TensorDataset(torch.rand(N, 3, 2, SIZE, SIZE), data.tensors[1]), CFG, inplace=True,
                        progress=False)
    with pytest.raises(ValueError, match="batch_size 100000"):
        nft_fast.purify(model, data, CFG.replace(batch_size=100000), inplace=True, progress=False)
    assert same(before, snapshot(model)) and not nft_fast.mask_parameters(model)
    with torch.device("meta"):
        meta = build()
    with pytest.raises(ValueError, match="meta device"):
        nft_fast.purify(meta, data, CFG, progress=False)
    with pytest.raises(ValueError, match="meta device"):
        nft_fast.Purifier(meta, CFG)
    with pytest.raises(TypeError, match="cfg must be an NFTConfig"):
        nft_fast.Purifier(model, CFG.to_dict())


@pytest.mark.parametrize("field,value", [("steps", -5), ("lr", float("nan")), ("rounds", 3), ("precision", "fp8")])
def test_config_changed_after_creation(field, value):
    cfg = copy.copy(CFG)
    setattr(cfg, field, value)
    model = build()
    with pytest.raises(ValueError, match=f"changed after creation.*{field}"):
        nft_fast.purify(model, clean_set(), cfg, inplace=True, progress=False)
    assert not nft_fast.mask_parameters(model)
    nft_fast.attach_masks(model)
    with pytest.raises(ValueError, match=f"changed after creation.*{field}"):
        nft_fast.Purifier(model, cfg)


def test_steps_have_an_upper_limit():
    with pytest.raises(ValueError, match=f"steps must be at most {MAX_STEPS}"):
        nft_fast.NFTConfig(steps=10**23, rounds=1)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("inplace", [True, False])
def test_returned_models_keep_the_callers_mode_and_flags(train, inplace):
    model = build().train(train)
    model.linear.weight.requires_grad_(False)  # the caller froze the head only
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    res = nft_fast.purify(model, clean_set(), CFG, inplace=inplace, progress=False)
    assert res.model.training == train
    assert all(p.requires_grad == flags.get(n, True) for n, p in res.model.named_parameters())
    plain = res.folded()
    assert plain.training == train and {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    if inplace:
        assert model.training == train
    else:
        assert model.training == train and {n: p.requires_grad for n, p in model.named_parameters()} == flags
