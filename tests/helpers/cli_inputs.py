"""Generated inputs of the command line (``purify``, ``evaluate``, ``train-backdoor``) for the
property tests (tests/test_properties.py, bench/properties.py): hypothesis strategies that draw
plain descriptions of checkpoints, data files, Fashion-MNIST folders and option values, the
functions that write them, and the contract every run must keep.

The descriptions are plain tuples and dicts, so a failing case prints readably and can be kept
as an explicit ``@example``. Everything is sized for a PreActResNet-18 of width 2 on 8x8 grey
images of :data:`CLASSES` classes.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import struct
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from hypothesis import event, strategies as st
from hypothesis.control import currently_in_test_context

CLASSES, SIZE, WIDTH, N = 4, 8, 2, 12
ERROR = "nft-fast: error: "

_STATE: Dict[str, torch.Tensor] = {}


def tiny_state() -> Dict[str, torch.Tensor]:
    """The state dict every generated checkpoint starts from (built once, seed 0)."""
    if not _STATE:
        from nft_fast import models

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = models.build("preactresnet18", num_classes=CLASSES, in_channels=1, width=WIDTH, image_size=SIZE)
        _STATE.update(model.state_dict())
    return {k: v.clone() for k, v in _STATE.items()}


# --- checkpoints ----------------------------------------------------------------------------

TORCH_DTYPES = {
    "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64,
    "f8": torch.float8_e4m3fn, "i8": torch.int8, "i32": torch.int32, "i64": torch.int64, "u8": torch.uint8,
    "bool": torch.bool, "c64": torch.complex64,
}
VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e38, "big": 1e6, "zero": 0.0, "neg": -1.0}

#: One change to the state dict: ("drop", i), ("dtype", i, dtype), ("reshape", i, shape),
#: ("fill", i, value), ("add", name, shape, dtype), ("classes", n). ``i`` indexes the sorted
#: keys (modulo their number).
edits = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 200)),
    st.tuples(st.just("dtype"), st.integers(0, 200), st.sampled_from(sorted(TORCH_DTYPES))),
    st.tuples(st.just("reshape"), st.integers(0, 200), st.lists(st.integers(0, 5), max_size=4).map(tuple)),
    st.tuples(st.just("fill"), st.integers(0, 200), st.sampled_from(sorted(VALUES))),
    st.tuples(st.just("add"), st.sampled_from(["extra", "linear.extra", "", "conv1.weight.x"]),
              st.lists(st.integers(0, 4), max_size=3).map(tuple), st.sampled_from(sorted(TORCH_DTYPES))),
    st.tuples(st.just("classes"), st.sampled_from([0, 1, 2, 3, 5, 100])),
)

#: A checkpoint: its format ("safetensors", "pt", "pt-state_dict", "pt-model" (wrapped), "pt-list",
#: "garbage"), the edits and how many bytes to cut off its end (None: none).
checkpoints = st.fixed_dictionaries({
    "format": st.sampled_from(["safetensors", "safetensors", "pt", "pt-state_dict", "pt-model", "pt-list", "garbage"]),
    "edits": st.lists(edits, max_size=3),
    "truncate": st.one_of(st.none(), st.none(), st.integers(1, 10**6)),
})


def _apply(state: Dict[str, torch.Tensor], edit: tuple) -> None:
    keys = sorted(state)
    kind = edit[0]
    if kind == "add":
        _, name, shape, dtype = edit
        state[name] = torch.ones(shape).to(TORCH_DTYPES[dtype])
        return
    if kind == "classes":
        w = state.get("linear.weight")
        if w is not None:
            state["linear.weight"] = torch.zeros(edit[1], w.shape[-1] if w.dim() else 1)
            state["linear.bias"] = torch.zeros(edit[1])
        return
    if not keys:
        return
    key = keys[edit[1] % len(keys)]
    if kind == "drop":
        del state[key]
    elif kind == "dtype":
        with warnings.catch_warnings():  # complex -> real drops the imaginary part: as intended
            warnings.simplefilter("ignore")
            state[key] = state[key].to(TORCH_DTYPES[edit[2]])
    elif kind == "reshape":
        state[key] = torch.zeros(edit[2], dtype=state[key].dtype)
    elif kind == "fill":
        t = state[key]
        if t.is_floating_point() or t.is_complex():
            t = t.clone()
            t.view(-1)[:1] = VALUES[edit[2]]
            state[key] = t


def write_checkpoint(spec: dict, folder: Path) -> Path:
    """Write the checkpoint ``spec`` (from :data:`checkpoints`) into ``folder``; returns its path."""
    state = tiny_state()
    for edit in spec["edits"]:
        _apply(state, edit)
    fmt = spec["format"]
    path = folder / ("model.safetensors" if fmt in ("safetensors", "garbage") else "model.pt")
    if fmt == "garbage":
        path.write_bytes(bytes(range(256)) * 3)
    elif fmt == "safetensors":
        from safetensors.torch import save

        path.write_bytes(save({k: v.contiguous() for k, v in state.items()}))
    else:
        obj = {"pt": state, "pt-state_dict": {"state_dict": state, "epoch": torch.tensor(3)}, "pt-model": {"model": state},
               "pt-list": list(state.values())}[fmt]
        torch.save(obj, path)
    if spec["truncate"]:
        data = path.read_bytes()
        path.write_bytes(data[:max(0, len(data) - spec["truncate"])])
    return path


# --- data files -----------------------------------------------------------------------------

NP_DTYPES = ("float32", "float64", "float16", "uint8", "int16", "int64", "uint64", "bool", "complex64")
#: Labels: how they are made ("cycle": 0, 1, ..., classes - 1, 0, ...; "const"; "range": evenly
#: from lo to hi), their dtype, rank and how many more (or fewer) than the samples there are.
labels = st.fixed_dictionaries({
    "mode": st.sampled_from(["cycle", "cycle", "cycle", "const", "range"]),
    "lo": st.sampled_from([0, 0, 1, 3, -1, 4, 255, 2**40, -2**40]),
    "hi": st.sampled_from([3, 3, 4, 9, 2**62]),
    "dtype": st.sampled_from(["int64", "int64", "int32", "uint8", "int8", "uint64", "float32", "bool", "complex64"]),
    "rank": st.sampled_from([1, 1, 1, 1, 0, 2]),
    "extra": st.sampled_from([0, 0, 0, 0, 1, -1, -3]),
})

#: A data file: format, samples, x's dtype and per-sample shape, one special value written at
#: sample ``bad_at``, the labels, optional ``y_target``, arrays left out, bytes cut off the end.
data_files = st.fixed_dictionaries({
    "format": st.sampled_from(["npz", "npz", "safetensors"]),
    "n": st.sampled_from([N, N, N, 8, 4, 1, 0, 30]),
    "dtype": st.sampled_from(["float32", "float32", "float32"] + list(NP_DTYPES)),
    "shape": st.one_of(st.just((1, SIZE, SIZE)), st.just((1, SIZE, SIZE)), st.just((SIZE, SIZE)),
                       st.lists(st.integers(0, 9), max_size=4).map(tuple)),
    "bad": st.sampled_from([None, None, None] + sorted(VALUES)),
    "bad_at": st.integers(0, 40),
    "y": labels,
    "y_target": st.one_of(st.none(), st.none(), labels),
    "missing": st.sampled_from([None, None, None, None, "x", "y"]),
    "truncate": st.one_of(st.none(), st.none(), st.none(), st.integers(1, 10**5)),
})


def _labels(spec: dict, n: int) -> np.ndarray:
    m = max(0, n + spec["extra"])
    if spec["mode"] == "cycle":
        v = np.arange(m) % CLASSES
    elif spec["mode"] == "const":
        v = np.full(m, spec["lo"])
    else:
        v = np.linspace(spec["lo"], spec["hi"], m) if m else np.zeros(0)
    v = v.astype(np.float64).astype(spec["dtype"]) if spec["dtype"] in ("float32", "complex64") else \
        np.asarray(v).astype(np.int64).astype(spec["dtype"]) if spec["dtype"] != "bool" else np.asarray(v) != 0
    if spec["rank"] == 0:
        return v[:1].reshape(()) if v.size else np.zeros((), v.dtype)
    return v.reshape(-1, 1) if spec["rank"] == 2 else v


def data_arrays(spec: dict) -> Dict[str, np.ndarray]:
    """The arrays of the data file ``spec`` (from :data:`data_files`)."""
    n = spec["n"]
    rng = np.random.default_rng(spec["bad_at"])
    x = rng.random((n, *spec["shape"]))
    dtype = spec["dtype"]
    if dtype == "uint8":
        x = x * 255
    elif dtype in ("int16", "int64", "uint64"):
        x = x * 3
    if spec["bad"] and x.size and (dtype.startswith("float") or dtype == "complex64"):
        x.reshape(n, -1)[spec["bad_at"] % n, 0] = VALUES[spec["bad"]]
    with np.errstate(invalid="ignore", over="ignore"):
        x = x.astype(dtype) if dtype != "bool" else x > 0.5
    arrs = {"x": x, "y": _labels(spec["y"], n)}
    if spec["y_target"] is not None:
        arrs["y_target"] = _labels(spec["y_target"], n)
    if spec["missing"]:
        del arrs[spec["missing"]]
    return arrs


def write_data(spec: dict, folder: Path, name: str = "clean") -> Path:
    """Write the data file ``spec`` into ``folder``; returns its path."""
    arrs = data_arrays(spec)
    if spec["format"] == "npz":
        path = folder / f"{name}.npz"
        np.savez(path, **arrs)
    else:
        from safetensors.numpy import save

        path = folder / f"{name}.safetensors"
        path.write_bytes(save({k: np.ascontiguousarray(v) for k, v in arrs.items()}))
    if spec["truncate"]:
        data = path.read_bytes()
        path.write_bytes(data[:max(0, len(data) - spec["truncate"])])
    return path


def good_data(n: int = N, **changes) -> dict:
    """A data-file spec of ``n`` finite 8x8 grey images with cycling labels (``changes`` replace fields)."""
    spec = {"format": "npz", "n": n, "dtype": "float32", "shape": (1, SIZE, SIZE), "bad": None, "bad_at": 0,
            "y": good_labels(), "y_target": None, "missing": None, "truncate": None}
    spec.update(changes)
    return spec


def good_labels(**changes) -> dict:
    return dict({"mode": "cycle", "lo": 0, "hi": 3, "dtype": "int64", "rank": 1, "extra": 0}, **changes)


def good_checkpoint(**changes) -> dict:
    return dict({"format": "safetensors", "edits": [], "truncate": None}, **changes)


#: An image folder (one sub-folder per class): class count, images per class, their size and
#: mode, and an optional bad entry (a corrupt file, a folder named like an image, an odd size).
image_folders = st.fixed_dictionaries({
    "classes": st.sampled_from([CLASSES, CLASSES, CLASSES, 0, 1, 5]),
    "per_class": st.sampled_from([2, 2, 1, 0, 3]),
    "size": st.sampled_from([(SIZE, SIZE), (SIZE, SIZE), (SIZE, 5), (1, 1), (SIZE * 2, SIZE * 2)]),
    "mode": st.sampled_from(["L", "L", "RGB", "RGBA", "I;16"]),
    "bad": st.sampled_from([None, None, None, "corrupt", "dir", "odd", "empty"]),
})


def write_image_folder(spec: dict, folder: Path, name: str = "images") -> Path:
    from PIL import Image

    root = folder / name
    root.mkdir()
    rng = np.random.default_rng(0)
    for c in range(spec["classes"]):
        (root / f"class{c}").mkdir()
        for i in range(spec["per_class"]):
            h, w = spec["size"]
            arr = (rng.random((h, w)) * 255).astype(np.uint8)
            Image.fromarray(arr).convert(spec["mode"]).save(root / f"class{c}" / f"{i}.png")
    if spec["bad"] and spec["classes"]:
        bad = root / "class0" / "bad.png"
        if spec["bad"] == "corrupt":
            bad.write_bytes(b"\x89PNG not really")
        elif spec["bad"] == "dir":
            bad.mkdir()
        elif spec["bad"] == "odd":
            Image.fromarray(np.zeros((3, 7), np.uint8)).save(bad)
        else:
            bad.write_bytes(b"")
    return root


# --- Fashion-MNIST folders (train-backdoor's --data-dir) ------------------------------------

FM_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz")

#: A Fashion-MNIST folder of four IDX files: train/test sizes, image side, label classes (and a
#: label shift that takes them out of range), and one change to one file.
fm_folders = st.fixed_dictionaries({
    "train": st.sampled_from([60, 60, 40, 12, 1, 0]),
    "test": st.sampled_from([20, 20, 5, 1, 0]),
    "side": st.sampled_from([SIZE, SIZE, 12, 3, 1]),
    "classes": st.sampled_from([10, 10, 10, 3, 1]),
    "shift": st.sampled_from([0, 0, 0, 0, 250]),
    "file": st.integers(0, 3),
    "change": st.sampled_from([None, None, None, None, "truncate", "gunzip", "garbage", "short_header", "rank",
                               "huge_dims", "count", "missing", "dir"]),
})


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_fm_folder(spec: dict, folder: Path) -> Path:
    root = folder / "fashion"
    root.mkdir()
    rng = np.random.default_rng(0)
    arrays = []
    for n in (spec["train"], spec["test"]):
        arrays += [(rng.random((n, spec["side"], spec["side"])) * 255).astype(np.uint8),
                   ((np.arange(n) % spec["classes"]) + spec["shift"]).astype(np.uint8)]
    raw = [_idx(a) for a in arrays]
    i, change = spec["file"], spec["change"]
    if change == "rank":
        a = arrays[i]
        raw[i] = _idx(a.reshape(a.shape[0], 1, spec["side"] ** 2) if i % 2 == 0 else a.reshape(a.shape[0], 1))
    elif change == "short_header":
        raw[i] = raw[i][:6]
    elif change == "huge_dims":
        raw[i] = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**31, 2**31, 2**31)
    elif change == "count":
        raw[i] = _idx(arrays[i][:-1])
    elif change == "garbage":
        raw[i] = b"\x01\x02\x03"
    for k, (name, data) in enumerate(zip(FM_FILES, raw)):
        blob = gzip.compress(data, mtime=0)
        if k == i and change == "truncate":
            blob = blob[:len(blob) // 2]
        elif k == i and change == "gunzip":
            blob = data
        if k == i and change == "missing":
            continue
        if k == i and change == "dir":
            (root / name).mkdir()
            continue
        (root / name).write_bytes(blob)
    return root


# --- option values ----------------------------------------------------------------------------

def _arg(v):
    return v if isinstance(v, list) else str(v)


def options(table: Dict[str, Tuple[list, list]], flags: List[str]) -> st.SearchStrategy:
    """Option values as command-line strings (None: not given; ``--exclude`` a list): each option
    given or not, with one of its valid values, then up to two of them replaced by one of their
    invalid values; ``"flags"`` lists the flags given."""

    @st.composite
    def draw(draw):
        out = {k: draw(st.one_of(st.none(), st.sampled_from(valid).map(_arg))) for k, (valid, _) in table.items()}
        for k in draw(st.lists(st.sampled_from(list(table)), max_size=2, unique=True)):
            out[k] = draw(st.sampled_from(table[k][1]).map(_arg))
        out["flags"] = draw(st.lists(st.sampled_from(flags), max_size=3, unique=True))
        return out

    return draw()


GARBAGE = ["", "abc", "1e3", "0x10", "2.5", "-", "--", " 3", "nan"]
#: purify's options: valid values (alone; some combinations still fail), invalid values.
purify_options = options({
    "--steps": ([1, 2, 4], [0, -1, 3, 10**6 + 1, 10**23, *GARBAGE]),
    "--rounds": ([1, 1, 2], [0, -2, 7, 10**30, *GARBAGE]),
    "--batch-size": ([4, 8, 16, 128], [1, 0, -4, 129, 10**6, *GARBAGE]),
    "--lr": ([0.05, 0.5, 1e-6, 3e38], ["nan", "inf", "-inf", 0, -0.1, 1e308, 1e-320, "abc"]),
    "--seed": ([0, 1, 2**63 - 1], [-1, 2**63, 2**64, 2**70, -2**63, "x"]),
    "--per-class": ([1, 2], [0, -1, 4, 10**30, "one"]),
    "--target": ([0, 3], [-1, 4, 10**30, "a"]),
    "--preset": (["reference", "reference", "strong", "auto"], ["Reference", "bogus", ""]),
    "--precision": (["fp32", "bf16"], ["fp16", ""]),
    "--backend": (["auto", "torch", "cpp"], ["cuda", "nosuch"]),
    "--exclude": ([[], ["conv1"], ["linear"], ["layer1.0.bn1", "layer4"]], [["nosuch"], ["conv1", "bn"]]),
}, ["--neurons", "--augment", "--resume", "--overwrite", "--no-progress"])

#: train-backdoor's options (run on a small Fashion-MNIST folder of :data:`fm_folders`).
train_options = options({
    "--attack": (["badnets", "badnets", "blend", "sig", "trojan", "wanet", "inputaware"], ["nosuch", "BadNets"]),
    "--arch": (["preactresnet18", "preactresnet18", "mlp"], ["nosuch", "vit_tiny"]),
    "--width": ([1, 2], [0, -1, 10**6, "w"]),
    "--rate": ([0.1, 0.0, 1.0], [-0.5, 2, "nan", "inf", "x"]),
    "--target": ([0, 1], [-1, 10, 10**30]),
    "--epochs": ([1], [0, -1, 10**4 + 1, 10**30, "one"]),
    "--batch-size": ([4, 16, 1, 1000], [0, -2, "b"]),
    "--lr": ([0.05, 0.01], [0, -1, "nan", "inf", 1e30]),
    "--seed": ([0, 7], [-1, 2**64, 2**70, "s"]),
    "--clean-fraction": ([0.1, 0.2, 0.5], [0, 1, -0.1, 0.999, "nan"]),
    "--train-subset": ([5, 20, 10**9], [0, -3, "all"]),
    "--dataset": (["fashion-mnist"], ["nosuch", "mnist"]),
}, ["--all2all", "--resume", "--overwrite", "--no-progress"])


def option_argv(options: dict) -> List[str]:
    argv: List[str] = []
    for k, v in options.items():
        if k == "flags":
            argv += list(v)
        elif k == "--exclude":
            if v is not None:
                argv += [k, *v]
        elif v is not None:
            argv += [f"{k}={v}"] if v.startswith("-") or not v.strip() else [k, v]
    return argv


# --- running the command line and its contract -----------------------------------------------

class Outcome:
    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err

    def __repr__(self) -> str:
        return f"Outcome(rc={self.rc}, err={self.err[-2000:]!r})"


def run_cli(argv: List[str]) -> Outcome:
    """``nft_fast.app.cli.main(argv)`` in this process, its stdout and stderr captured; a warning
    counts as a stderr line, as it would be one in a terminal (Python's default filters)."""
    from nft_fast.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", cat)
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # what `python -m nft_fast` would turn into its exit code
            rc = e.code if isinstance(e.code, int) else 1
        finally:  # --backend is process-wide: a new process starts from "auto"
            import nft_fast

            nft_fast.set_backend("auto")
    text = err.getvalue() + "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
    return Outcome(rc, out.getvalue(), text)


def listing(folder: Path) -> Optional[List[str]]:
    """Every path under ``folder`` (None: it does not exist)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else None


def _finite_json(text: str, what: str):
    def bad(const):
        raise AssertionError(f"{what} holds {const}")

    return json.loads(text, parse_constant=bad)


#: What ``--resume`` says on stderr before it starts (the one kind of line an error may follow).
RESUME_NOTES = ("nft-fast: no saved state in ", "nft-fast: resuming ")


def check_outcome(res: Outcome, out: Optional[Path], before: Optional[List[str]],
                  on_success: Callable[[Outcome], None], names: Tuple[str, ...] = (), resume: bool = False) -> None:
    """The contract: exit 0 and ``on_success`` holds (the promised outputs, finite), or exit 2 with
    exactly one stderr line ``nft-fast: error: ...`` (naming one of ``names`` when given; with
    ``resume``, after --resume's note) and ``out`` as it was (not created). Never another code,
    never a traceback."""
    if currently_in_test_context():  # the share of each outcome: --hypothesis-show-statistics
        event(f"exit {res.rc}")
    assert res.rc in (0, 2), res
    assert "Traceback" not in res.err, res
    if res.rc == 2:
        lines = res.err.strip().splitlines()
        if resume and len(lines) == 2 and lines[0].startswith(RESUME_NOTES):
            lines = lines[1:]
        assert len(lines) == 1 and lines[0].startswith(ERROR), res
        if names:
            assert any(n in lines[0] for n in names), f"none of {names} named in {lines[0]!r}"
        if out is not None:
            assert listing(out) == before, f"{out} changed: {before} -> {listing(out)}"
    else:
        on_success(res)


def check_purified(out: Path) -> Callable[[Outcome], None]:
    """What a successful ``purify`` promises in ``out``: every output, loadable and finite."""

    def check(res: Outcome) -> None:
        from nft_fast.app.pipeline import OUTPUTS
        from nft_fast.app.report import PLOTS, ROUNDS
        from nft_fast.io import load_state_dict

        report = _finite_json((out / "report.json").read_text(), "report.json")
        try:  # the per-round plot needs metrics (a test or poisoned test set)
            import matplotlib  # noqa: F401
            expected = set(OUTPUTS) - ({ROUNDS} if not report["before"] else set())
        except ImportError:
            expected = set(OUTPUTS) - set(PLOTS)
        files = {p.name for p in out.iterdir()}
        assert files == expected, f"{out} holds {sorted(files)}"
        model, masks = load_state_dict(out / "purified.safetensors"), load_state_dict(out / "masks.safetensors")
        assert model and masks and report["mask_layers"] == len(masks)
        assert "purified model:" in res.out

    return check


def check_evaluated(res: Outcome) -> None:
    lines = res.out.strip().splitlines()
    assert lines, res
    if "--json" in res.out or lines[-1].startswith("{"):
        metrics = _finite_json(lines[-1], "evaluate --json")
        assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert "nan" not in res.out.lower().split(), res.out


def check_trained(out: Path) -> Callable[[Outcome], None]:
    """What a successful ``train-backdoor`` promises: model.safetensors and run.json (finite;
    attack.safetensors for attacks with learned state), nothing else."""

    def check(res: Outcome) -> None:
        from nft_fast.io import load_state_dict

        files = {p.name for p in out.iterdir()}
        assert {"model.safetensors", "run.json"} <= files <= {"model.safetensors", "run.json", "attack.safetensors"}, files
        run = _finite_json((out / "run.json").read_text(), "run.json")
        assert load_state_dict(out / "model.safetensors")
        if "attack.safetensors" in files:
            assert load_state_dict(out / "attack.safetensors")
        assert {"acc", "asr", "ra"} <= set(run["metrics"]), run["metrics"]

    return check
