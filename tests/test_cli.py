"""End-to-end tests of the ``nft-fast`` command line (``nft_fast.app.cli.main``).

Everything runs on tiny models (ResNet-18 of width 4 on 8x8 grey images) so the whole
file takes seconds on a CPU.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nft_fast import models
from nft_fast.app.cli import main
from nft_fast.io import load_state_dict, save_state_dict

NUM_CLASSES = 3
SIZE = 8
FAST = ["--steps", "10", "--rounds", "2", "--batch-size", "16", "--no-progress"]


# --- helpers -------------------------------------------------------------------------

def build(arch: str = "resnet18", num_classes: int = NUM_CLASSES, width: int = 4, image_size: int = SIZE):
    torch.manual_seed(0)
    return models.build(arch, num_classes=num_classes, in_channels=1, width=width, image_size=image_size)


def save_checkpoint(path: Path, state, wrap: bool = False) -> Path:
    """``.safetensors`` via nft_fast.io, anything else via ``torch.save`` (optionally wrapped)."""
    state = state.state_dict() if isinstance(state, torch.nn.Module) else state
    if path.suffix == ".safetensors":
        save_state_dict(state, path)
    else:
        torch.save({"state_dict": state} if wrap else state, path)
    return path


def write_data(path: Path, n: int = 24, num_classes: int = NUM_CLASSES, channels: int = 1, size: int = SIZE,
               labels=None, y_target=None, bad_value=None) -> Path:
    rng = np.random.default_rng(0)
    x = rng.random((n, channels, size, size), dtype=np.float32)
    y = np.asarray(labels if labels is not None else np.arange(n) % num_classes, dtype=np.int64)
    if bad_value is not None and n:
        x[n // 2, 0, 1, 1] = bad_value
    arrays = dict(x=x, y=y)
    if y_target is not None:
        arrays["y_target"] = np.full(n, y_target, dtype=np.int64)
    np.savez(path, **arrays)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cli(capsys):
    """Run ``main(argv)`` in-process; returns ``(exit_code, stdout, stderr)``."""

    def run(*argv):
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture
def files(tmp_path):
    """A resnet18 checkpoint, a clean set, a test set and a poisoned test set."""
    return {
        "ckpt": save_checkpoint(tmp_path / "model.safetensors", build()),
        "data": write_data(tmp_path / "clean.npz"),
        "test": write_data(tmp_path / "test.npz", n=12),
        "poison": write_data(tmp_path / "poison.npz", n=12, y_target=0),
        "out": tmp_path / "out",
    }


def purify_argv(ckpt, data, out, *extra, arch="resnet18"):
    return ["purify", "--checkpoint", ckpt, "--arch", arch, "--data", data, "--out", out, *FAST, *extra]


def assert_usage_error(result, out_dir: Path, *needles: str) -> str:
    """Exit code 2, one ``nft-fast: error:`` line on stderr naming the problem, no model written."""
    rc, _, err = result
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    msg = lines[0]
    assert msg.startswith("nft-fast: error:"), msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert not (out_dir / "purified.safetensors").exists()
    return msg


# --- happy path ----------------------------------------------------------------------

def _check_outputs(out: Path, rounds: int, original_keys) -> None:
    for name in ("purified.safetensors", "masks.safetensors", "report.json", "report.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert {"before", "after", "history"} <= report.keys()
    assert len(report["history"]) == rounds
    assert report["before"] and report["after"]
    m = report["machine"]  # every measurement names its machine
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and m["threads"] >= 1 and m["torch"]
    assert f"({m['cpu_capability']}, " in (out / "report.md").read_text()
    purified = load_state_dict(out / "purified.safetensors")
    assert set(purified) == set(original_keys)
    build().load_state_dict(purified, strict=True)
    assert load_state_dict(out / "masks.safetensors")


def test_purify_safetensors_checkpoint(cli, files):
    before = sha256(files["ckpt"])
    rc, out, err = cli(*purify_argv(files["ckpt"], files["data"], files["out"],
                                    "--test-data", files["test"], "--poison-data", files["poison"]))
    assert rc == 0, err
    assert "purified model:" in out
    _check_outputs(files["out"], rounds=2, original_keys=build().state_dict().keys())
    assert sha256(files["ckpt"]) == before


def test_purify_from_an_image_folder(cli, files, tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c in range(NUM_CLASSES):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    rc, _, err = cli(*purify_argv(files["ckpt"], root, files["out"], "--test-data", root))
    assert rc == 0, err
    report = json.loads((files["out"] / "report.json").read_text())
    assert report["clean_samples"] == 4 * NUM_CLASSES and report["after"]["n_clean"] == 4 * NUM_CLASSES


def test_purify_is_reproducible(cli, files, tmp_path):
    """Same inputs and seed, same purified model, byte for byte; another seed differs."""
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(outs, ("0", "0", "1")):
        assert cli(*purify_argv(files["ckpt"], files["data"], out, "--seed", seed, "--lr", "1.0"))[0] == 0
    digests = [sha256(o / "purified.safetensors") for o in outs]
    assert digests[0] == digests[1] != digests[2]


def test_purify_wrapped_pt_checkpoint(cli, files, tmp_path):
    ckpt = save_checkpoint(tmp_path / "model.pt", build(), wrap=True)
    before = sha256(ckpt)
    rc, _, err = cli(*purify_argv(ckpt, files["data"], files["out"],
                                  "--test-data", files["test"], "--poison-data", files["poison"]))
    assert rc == 0, err
    _check_outputs(files["out"], rounds=2, original_keys=build().state_dict().keys())
    assert sha256(ckpt) == before


# --- errors: the checkpoint ----------------------------------------------------------

def test_missing_checkpoint(cli, files, tmp_path):
    result = cli(*purify_argv(tmp_path / "nope.safetensors", files["data"], files["out"]))
    assert_usage_error(result, files["out"], "checkpoint not found", "nope.safetensors")


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


CORRUPT = {
    "random.pt": lambda tmp: (tmp / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096)),
    "truncated.pt": lambda tmp: _truncated(save_checkpoint(tmp / "full.pt", build()), tmp / "truncated.pt"),
    "random.safetensors": lambda tmp: (tmp / "random.safetensors").write_bytes(np.random.default_rng(1).bytes(4096)),
    "truncated.safetensors": lambda tmp: _truncated(save_checkpoint(tmp / "full.safetensors", build()),
                                                    tmp / "truncated.safetensors"),
}


@pytest.mark.parametrize("name", [
    "random.pt", "truncated.pt", "random.safetensors", "truncated.safetensors",
])
def test_corrupt_checkpoint(cli, files, tmp_path, name):
    CORRUPT[name](tmp_path)
    msg = assert_usage_error(cli(*purify_argv(tmp_path / name, files["data"], files["out"])), files["out"],
                             "cannot read checkpoint", "corrupt")
    assert "execute code" not in msg


class _Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class _Custom:
    def __init__(self) -> None:
        self.weight = torch.zeros(2)


@pytest.mark.parametrize("payload", ["reduce", "custom_class"])
def test_pickle_needing_code_execution_is_refused(cli, files, tmp_path, payload):
    pwned = tmp_path / "PWNED"
    obj = _Exploit(pwned) if payload == "reduce" else {"state_dict": _Custom()}
    ckpt = tmp_path / "evil.pt"
    torch.save(obj, ckpt)
    assert_usage_error(cli(*purify_argv(ckpt, files["data"], files["out"])), files["out"],
                       "refusing", "execute code")
    assert not pwned.exists()
    if payload == "reduce":  # the payload is live: an unsafe load would have run it
        torch.load(ckpt, weights_only=False)
        assert pwned.exists()


def test_checkpoint_of_another_architecture(cli, files, tmp_path):
    ckpt = save_checkpoint(tmp_path / "mlp.safetensors", build("mlp"))
    assert_usage_error(cli(*purify_argv(ckpt, files["data"], files["out"])), files["out"],
                       "does not match the architecture", "missing", "conv1.weight")


def test_checkpoint_with_mismatched_shapes(cli, files, tmp_path):
    # A width-4 resnet18 whose layer1 comes from a width-8 one: conv1/linear say width 4.
    state = build(width=4).state_dict()
    state.update({k: v for k, v in build(width=8).state_dict().items() if k.startswith("layer1.")})
    ckpt = save_checkpoint(tmp_path / "mixed.safetensors", state)
    assert_usage_error(cli(*purify_argv(ckpt, files["data"], files["out"])), files["out"],
                       "does not match the architecture", "shape", "layer1.0.conv1.weight")


def test_unknown_arch(cli, files):
    assert_usage_error(cli(*purify_argv(files["ckpt"], files["data"], files["out"], arch="vgg99")), files["out"],
                       "unknown --arch", "vgg99")


# --- errors: the data ----------------------------------------------------------------

def test_empty_clean_set(cli, files, tmp_path):
    data = write_data(tmp_path / "empty.npz", n=0)
    assert_usage_error(cli(*purify_argv(files["ckpt"], data, files["out"])), files["out"], "clean set", "empty.npz",
                       "is empty")


def test_clean_set_missing_classes(cli, files, tmp_path):
    ckpt = save_checkpoint(tmp_path / "four.safetensors", build(num_classes=4))
    data = write_data(tmp_path / "two.npz", labels=np.arange(24) % 2)
    assert_usage_error(cli(*purify_argv(ckpt, data, files["out"])), files["out"], "no samples of", "[2, 3]")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_clean_set(cli, files, tmp_path, bad):
    data = write_data(tmp_path / "bad.npz", bad_value=bad)
    assert_usage_error(cli(*purify_argv(files["ckpt"], data, files["out"])), files["out"], "clean set", "NaN/inf")


def test_non_finite_test_set(cli, files, tmp_path):
    test = write_data(tmp_path / "bad_test.npz", n=12, bad_value=np.nan)
    result = cli(*purify_argv(files["ckpt"], files["data"], files["out"], "--test-data", test))
    assert_usage_error(result, files["out"], "test set", "NaN/inf", "bad_test.npz")


@pytest.mark.parametrize("which", ["--data", "--test-data"])
def test_data_with_wrong_channel_count(cli, files, tmp_path, which):
    rgb = write_data(tmp_path / "rgb.npz", channels=3)
    data, extra = (rgb, []) if which == "--data" else (files["data"], ["--test-data", rgb])
    assert_usage_error(cli(*purify_argv(files["ckpt"], data, files["out"], *extra)), files["out"], "channel")


# --- errors: nothing to mask ---------------------------------------------------------

def test_exclude_everything(cli, files):
    result = cli(*purify_argv(files["ckpt"], files["data"], files["out"], "--exclude", "*"))
    assert_usage_error(result, files["out"], "nothing to mask", "--exclude *")


def test_norm_free_model_without_neurons(cli, files, tmp_path):
    ckpt = save_checkpoint(tmp_path / "mlp.safetensors", build("mlp"))
    msg = assert_usage_error(cli(*purify_argv(ckpt, files["data"], files["out"], arch="mlp")), files["out"],
                             "nothing to mask")
    assert "--neurons" in msg


# --- errors: the output directory ----------------------------------------------------

def test_out_dir_under_a_regular_file(cli, files, tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    out = tmp_path / "afile" / "out"
    assert_usage_error(cli(*purify_argv(files["ckpt"], files["data"], out)), out, "cannot be written", "afile")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_out_dir(cli, files, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert_usage_error(cli(*purify_argv(files["ckpt"], files["data"], out)), out, "cannot be written")
    finally:
        out.chmod(0o700)


def test_out_would_overwrite_the_checkpoint(cli, files, tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    ckpt = save_checkpoint(out / "purified.safetensors", build())
    before = sha256(ckpt)
    rc, _, err = cli(*purify_argv(ckpt, files["data"], out))
    assert rc == 2, err
    assert err.startswith("nft-fast: error:") and len(err.strip().splitlines()) == 1, err
    assert "refusing to overwrite the input" in err
    assert sha256(ckpt) == before
    assert not (out / "report.json").exists()


# --- help, info, entry points --------------------------------------------------------

@pytest.mark.parametrize("argv", [[], ["purify"], ["demo"], ["info"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: nft-fast" in capsys.readouterr().out


def test_python_m_info():
    proc = subprocess.run([sys.executable, "-m", "nft_fast", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "cpp_compiled" in info["build"]
    assert info["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(info["machine"]["cpu_native_bf16"], bool) and isinstance(info["notes"], list)


@pytest.mark.skipif(shutil.which("nft-fast") is None, reason="console script nft-fast not on PATH")
def test_console_script_help():
    proc = subprocess.run([shutil.which("nft-fast"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "purify" in proc.stdout


def test_purify_strong_preset_reports_the_signal(cli, files, tmp_path):
    out = tmp_path / "strong"
    argv = [a if a != files["out"] else out for a in purify_argv(files["ckpt"], files["data"], files["out"],
                                                                  "--test-data", files["test"],
                                                                  "--poison-data", files["poison"])]
    rc, _, err = cli(*argv, "--preset", "strong")
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["trigger_weight"] > 0 and not report["config"]["bn_recalibrate"]
    sig = report["signal"]
    scan_keys = {"trigger_anomaly", "trigger_suspect", "trigger_norm"}
    assert scan_keys <= sig["before"].keys() <= sig["after"].keys() | {
        "trigger_seconds", "trigger_unlearning", "trigger_search", "trigger_mode", "universal_success",
        "universal_low_success"}
    assert sig["before"]["trigger_mode"] in ("confident+universal", "patch+universal")
    assert isinstance(sig["backdoor_likely"], bool) and "Verdict" in (out / "report.md").read_text()
    assert "Poison-free signal" in (out / "report.md").read_text()
    assert f"Decision (`{sig['before']['trigger_mode']}`)" in (out / "report.md").read_text()


def test_preset_values_are_kept_unless_given():
    """`--preset strong` is NFTConfig.preset("strong") (400 steps, 4 rounds): the hyper-parameter
    flags replace a preset's value only when given (their old defaults silently overrode it)."""
    from nft_fast.app import cli as C
    from nft_fast.config import NFTConfig

    p = C.build_parser()
    args = p.parse_args(["purify", "--out", "x", "--preset", "strong"])
    assert C._cfg_from(args) == NFTConfig.preset("strong")
    assert C._cfg_from(p.parse_args(["purify", "--out", "x"])) == NFTConfig()
    cfg = C._cfg_from(p.parse_args(["purify", "--out", "x", "--preset", "strong", "--steps", "80", "--lr", "0.2",
                                    "--precision", "bf16", "--seed", "3"]))
    assert cfg == NFTConfig.preset("strong", steps=80, lr=0.2, precision="bf16", seed=3)
