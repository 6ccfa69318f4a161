"""Three guarantees of ``nft-fast purify`` (and Ctrl-C in the other long commands):

1. Ctrl-C ends in one line on stderr (what was saved, how to continue), no traceback, exit 130.
2. The state is saved at every round boundary into ``--out/.resume``; a run killed (SIGKILL) at
   any point and resumed with ``--resume`` ends with masks, model and report bit-identical to an
   uninterrupted run's (timings and paths aside); a state of other inputs or options is refused.
3. One run, one consistent set of outputs: staged and moved into place together, one run per
   ``--out`` at a time (a lock), earlier outputs replaced only with ``--overwrite`` and nothing
   else in ``--out`` touched, no stale file left next to new ones.

A PreActResNet-18 of width 2 on 8x8 grey images, 20 clean images, 4 rounds of 10 steps.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nft_fast import NFTConfig, models, purify
from nft_fast.app import pipeline
from nft_fast.app.cli import main
from nft_fast.data import ArrayDataset
from nft_fast.harness import datasets, grid
from nft_fast.harness.train import train_classifier
from nft_fast.io import save_state_dict
from nft_fast.outdir import LOCK_NAME
from nft_fast.purifier import Purifier
from nft_fast.resume import StateError, StateFolder

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, SIZE, N = 4, 8, 20
FAST = ["--steps", "40", "--rounds", "4", "--batch-size", "8", "--no-progress"]
OUTPUTS = {"purified.safetensors", "masks.safetensors", "report.json", "report.md", "masks_heatmap.png",
           "masks_hist.png", "rounds.png"}

# Runs the command line in a fresh process, stopped at a chosen point: "step=K" SIGKILLs itself
# before step K, "mid-save" between the tensors and the JSON of round 2's state, "commit" after
# two outputs were moved into place, "epoch" once the first epoch's state is saved, "pause"
# sleeps once round 1's state is saved (the test then signals it).
HELPER = r"""
import os, signal, sys, time
import torch
torch.set_num_threads(1)
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever the test runner set
from nft_fast import resume
from nft_fast.purifier import Purifier
from nft_fast.app.cli import main

mode, argv = sys.argv[1], sys.argv[2:]
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if mode.startswith("step="):
    k, step = int(mode[5:]), Purifier.step
    def stop(self, *a, **kw):
        if self.steps_done == k:
            kill()
        return step(self, *a, **kw)
    Purifier.step = stop
elif mode == "mid-save":
    write = resume._atomic_write
    def stop(path, fn):
        write(path, fn)
        if path.name == "round-0002.safetensors":
            kill()
    resume._atomic_write = stop
elif mode == "commit":
    replace, moved = os.replace, []
    def stop(src, dst):
        if ".staging-" in str(src) and ".staging-" not in str(dst):
            if len(moved) == 2:
                kill()
            moved.append(dst)
        return replace(src, dst)
    os.replace = stop
elif mode == "epoch":
    save = resume.RunFolder.save
    def stop(self, state):
        save(self, state)
        if state.round == 1:
            kill()
    resume.RunFolder.save = stop
elif mode == "pause":
    save = resume.RunFolder.save
    def stop(self, state):
        save(self, state)
        if state.round == 1:
            time.sleep(300)
    resume.RunFolder.save = stop
sys.exit(main(argv))
"""


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build("preactresnet18", num_classes=CLASSES, in_channels=1, width=2, image_size=SIZE)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    save_state_dict(build().state_dict(), d / "model.safetensors")
    rng = np.random.default_rng(0)
    for name, n in (("clean", N), ("test", 12)):
        np.savez(d / f"{name}.npz", x=rng.random((n, 1, SIZE, SIZE), dtype=np.float32), y=np.arange(n) % CLASSES)
    return d


def argv(files: Path, out: Path, *extra) -> list:
    return ["purify", "--checkpoint", str(files / "model.safetensors"), "--arch", "preactresnet18",
            "--data", str(files / "clean.npz"), "--test-data", str(files / "test.npz"), "--out", str(out), *FAST,
            *map(str, extra)]


def cli(capsys, args) -> tuple:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, err


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def comparable(report: dict) -> dict:
    """report.json without timings and paths."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if "seconds" not in k and k not in ("model", "masks")}
        return [strip(v) for v in o] if isinstance(o, list) else o
    return strip(report)


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """An uninterrupted run: its output files' digests and its report."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(argv(files, out)) == 0
    return {n: sha(out / n) for n in ("purified.safetensors", "masks.safetensors")}, \
        json.loads((out / "report.json").read_text())


def assert_like_reference(out: Path, reference) -> None:
    digests, report = reference
    for name, digest in digests.items():
        assert sha(out / name) == digest, f"{name} differs from the uninterrupted run's"
    mine = json.loads((out / "report.json").read_text())
    assert comparable(mine) == comparable(report)
    assert mine["outputs"]["model_sha256"] == digests["purified.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS), "a lock, state or staging folder was left"


def helper(mode: str, args: list, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", HELPER, mode, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


# --- 2. SIGKILL at any point, then --resume --------------------------------------------------

@pytest.mark.parametrize("mode,resumed_after", [("step=25", 2), ("mid-save", 1), ("commit", 4)])
def test_sigkill_then_resume_is_bit_identical(files, tmp_path, reference, capsys, mode, resumed_after):
    out = tmp_path / "out"
    proc = helper(mode, argv(files, out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert (out / LOCK_NAME).is_file()  # left by the dead process
    shown = OUTPUTS & {p.name for p in out.iterdir()}
    if mode == "commit":  # two files of the new set in place, its report.json not yet: an incomplete set
        assert len(shown) == 2 and "report.json" not in shown, shown
    else:
        assert not shown, shown
    rc, err = cli(capsys, argv(files, out, "--resume"))
    assert rc == 0, err
    assert f"taking over the lock of {out} from process {proc.pid}, which is no longer running" in err
    assert f"resuming {out} after round {resumed_after} of 4" in err
    assert_like_reference(out, reference)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_signal_after_the_first_round_then_resume(files, tmp_path, reference, capsys, sig):
    """Killed from outside once round 1's state is on disk; Ctrl-C ends in one line, exit 130."""
    out = tmp_path / "out"
    proc = helper("pause", argv(files, out))
    deadline = time.monotonic() + 240
    while not (out / ".resume" / "round-0001.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert err.splitlines() == [f"nft-fast: interrupted: the state after round 1 of 4 is saved in "
                                    f"{out / '.resume'}; run the same command with --resume to continue"], err
        assert not (out / LOCK_NAME).exists()
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not OUTPUTS & {p.name for p in out.iterdir()}  # nothing half-written in sight
    rc, err = cli(capsys, argv(files, out, "--resume"))
    assert rc == 0, err
    assert_like_reference(out, reference)


# --- the same in-process: API, refusals ------------------------------------------------------

def _interrupt_at(monkeypatch, k: int) -> None:
    step = Purifier.step

    def stop(self, *a, **kw):
        if self.steps_done == k:
            raise KeyboardInterrupt
        return step(self, *a, **kw)

    monkeypatch.setattr(Purifier, "step", stop)


def test_interrupted_run_refusals_then_resume(files, tmp_path, reference, capsys, monkeypatch):
    out = tmp_path / "out"
    (out / "notes.txt").parent.mkdir()
    (out / "notes.txt").write_text("mine")
    with monkeypatch.context() as m:
        _interrupt_at(m, 30)
        rc, err = cli(capsys, argv(files, out))
    assert rc == 130 and len(err.splitlines()) == 1 and "after round 3 of 4" in err and "--resume" in err, err
    state = {p.name: sha(p) for p in (out / ".resume").iterdir()}

    def refused(args, *needles):
        rc, err = cli(capsys, args)
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("nft-fast: error: "), err
        for needle in needles:
            assert needle in err, err
        assert {p.name: sha(p) for p in (out / ".resume").iterdir()} == state
        assert sorted(p.name for p in out.iterdir()) == [".resume", "notes.txt"]

    refused(argv(files, out), "interrupted run (after round 3 of 4)", "--resume", "--overwrite")
    refused(argv(files, out, "--resume", "--lr", "0.5"), "cannot --resume", "config: lr 0.05 -> 0.5", "--overwrite")
    refused(argv(files, out, "--resume", "--per-class", "2"), "cannot --resume", "the clean set")
    rc, err = cli(capsys, argv(files, out, "--resume"))
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert_like_reference(out, reference)
    refused_done = cli(capsys, argv(files, out, "--resume"))
    assert refused_done[0] == 2 and "no interrupted run to resume" in refused_done[1]


@pytest.mark.parametrize("stop", [0, 10, 25])
def test_api_resume_with_triggers_is_bit_identical(tmp_path, monkeypatch, stop):
    """purify(checkpoint=...) with trigger unlearning (patch + universal, refreshed), adversarial
    steps, augmentation (the global RNG) and BN recalibration, stopped before step ``stop``."""
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(N, 1, SIZE, SIZE, generator=g), torch.arange(N) % CLASSES, augment=True)
    cfg = NFTConfig.preset("strong", steps=40, rounds=4, batch_size=8, trigger_steps=5, adv_eps=0.05, adv_steps=1)
    plain = purify(build(), data, cfg, progress=False)
    folder = StateFolder(tmp_path / "state")
    with monkeypatch.context() as m:
        _interrupt_at(m, stop)
        with pytest.raises(KeyboardInterrupt):
            purify(build(), data, cfg, progress=False, checkpoint=folder)
    assert folder.latest_meta()["round"] == stop // 10
    with pytest.raises(StateError, match="steps 40 -> 80"):
        purify(build(), data, NFTConfig.preset("strong", steps=80, rounds=4, batch_size=8, trigger_steps=5, adv_eps=0.05,
                                               adv_steps=1), progress=False, checkpoint=folder)
    resumed = purify(build(), data, cfg, progress=False, checkpoint=folder)
    for k, v in plain.masks().items():
        assert torch.equal(v, resumed.masks()[k]), k
    a, b = plain.folded().state_dict(), resumed.folded().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert comparable(json.loads(json.dumps(plain.history, default=float))) == comparable(resumed.history)


# --- 3. one run, one consistent output set ----------------------------------------------------

def test_outputs_replaced_as_a_set(files, tmp_path, capsys, monkeypatch):
    """Run B (--overwrite, no test set: no rounds.png) pauses after its first file while another
    run is refused (the lock) and readers still see run A's complete, consistent set; then B's
    set replaces A's whole, with no stale rounds.png, nothing else touched, modes from the umask."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli(capsys, argv(files, out))[0] == 0
    first = json.loads((out / "report.json").read_text())
    assert first["outputs"]["model_sha256"] == sha(out / "purified.safetensors")
    rc, err = cli(capsys, argv(files, out, "--seed", "1"))
    assert rc == 2 and "--overwrite" in err and "notes.txt" not in err
    assert json.loads((out / "report.json").read_text()) == first

    save, seen = pipeline.save_state_dict, []

    def paused(state, path):
        save(state, path)
        if not seen:
            seen.append(path)
            assert path.parent != out and path.parent.parent == out  # staged privately inside --out
            assert OUTPUTS <= {p.name for p in out.iterdir()}
            report = json.loads((out / "report.json").read_text())
            assert report == first and report["outputs"]["model_sha256"] == sha(out / "purified.safetensors")
            other = main([str(a) for a in argv(files, out, "--overwrite", "--seed", "2")])
            err = capsys.readouterr().err
            assert other == 2 and f"is in use by another nft-fast run (pid {os.getpid()}" in err, err

    monkeypatch.setattr(pipeline, "save_state_dict", paused)
    mask = os.umask(0o027)
    try:
        args = [a for a in argv(files, out, "--overwrite", "--seed", "1") if a not in ("--test-data",)]
        args.remove(str(files / "test.npz"))
        rc, err = cli(capsys, args)
    finally:
        os.umask(mask)
    assert rc == 0 and seen, err
    names = {p.name for p in out.iterdir()}
    assert names == OUTPUTS - {"rounds.png"} | {"notes.txt"}, names
    assert (out / "notes.txt").read_text() == "mine"
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"]["model_sha256"] == sha(out / "purified.safetensors") != first["outputs"]["model_sha256"]
    assert report["config"]["seed"] == 1
    for n in OUTPUTS - {"rounds.png"}:
        assert (out / n).stat().st_mode & 0o777 == 0o640, n


# --- 1. Ctrl-C in the other long commands -----------------------------------------------------

def one_line_130(capsys, args, *needles) -> str:
    rc, err = cli(capsys, args)
    assert rc == 130 and len(err.splitlines()) == 1 and err.startswith("nft-fast: interrupted"), err
    for needle in needles:
        assert needle in err, err
    return err


def _ctrl_c(*a, **kw):
    raise KeyboardInterrupt


def test_ctrl_c_in_train_backdoor_and_demo(tmp_path, capsys, monkeypatch):
    from nft_fast.app import demo
    from nft_fast.harness import runs

    monkeypatch.setattr(runs, "train", _ctrl_c)
    one_line_130(capsys, ["train-backdoor", "--out", tmp_path / "run", "--no-progress"], "nothing was saved")
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(demo, "cached_run", _ctrl_c)
    one_line_130(capsys, ["demo", "--out", tmp_path / "demo", "--no-progress"], "run the demo again")


def test_grid_skips_finished_cells(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the third cell; the rerun computes only the cells grid.json does not hold."""
    class Run:
        model, attack = None, None

        class data:
            test_loader = staticmethod(lambda: None)
            clean_set = staticmethod(lambda per_class, seed: (torch.zeros(2), torch.zeros(2)))

    done = []

    def row(attack, setting, d, *a):
        if len(done) == 2 and not rerun:
            raise KeyboardInterrupt
        done.append((attack, setting, d))
        return {"attack": attack, "setting": setting, "defense": d, "clean_samples": 2, "acc": 0.9, "asr": 0.1,
                "ra": 0.5, "seconds": 1.0, "acc_before": 0.9, "asr_before": 1.0, "ra_before": 0.0}

    monkeypatch.setattr(grid, "cached_run", lambda *a, **kw: Run())
    monkeypatch.setattr(grid, "poison_loader", lambda *a: None)
    monkeypatch.setattr(grid, "evaluate", lambda *a: {"acc": 0.9, "asr": 1.0, "ra": 0.0})
    monkeypatch.setattr(grid, "_run_row", row)
    args = ["grid", "--attacks", "badnets,blend", "--defenses", "none,nft", "--settings", "1pct", "--out", tmp_path,
            "--no-progress"]
    rerun = False
    one_line_130(capsys, args, "2 finished rows", "grid.json", "run the same command again")
    rerun = True
    assert cli(capsys, args)[0] == 0
    assert done == [("badnets", "1pct", "none"), ("badnets", "1pct", "nft"), ("blend", "1pct", "none"),
                    ("blend", "1pct", "nft")]
    rows = json.loads((tmp_path / "grid.json").read_text())
    assert [(r["attack"], r["defense"], r["width"]) for r in rows] == [("badnets", "none", 8), ("badnets", "nft", 8),
                                                                        ("blend", "none", 8), ("blend", "nft", 8)]
    assert cli(capsys, args)[0] == 0 and len(done) == 4  # all finished: nothing runs
    assert cli(capsys, args + ["--width", "4"])[0] == 0 and len(done) == 8  # another model: nothing reused
    assert not (tmp_path / LOCK_NAME).exists()


# --- train-backdoor at epoch boundaries -------------------------------------------------------

class Trap(torch.utils.data.Dataset):
    """Ctrl-C at the ``at``-th item read (in the middle of an epoch)."""

    def __init__(self, x, y, at=None):
        self.x, self.y, self.at, self.reads = x, y, at, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            raise KeyboardInterrupt
        return self.x[i], self.y[i]


def test_api_training_resume_is_bit_identical(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, SIZE, SIZE, generator=g), torch.arange(64) % CLASSES
    kw = dict(epochs=3, batch_size=16, lr=0.05, seed=1, progress=False)
    plain = train_classifier(build(), Trap(x, y), **kw).state_dict()
    folder = StateFolder(tmp_path / "state")
    with pytest.raises(KeyboardInterrupt):
        train_classifier(build(), Trap(x, y, at=64 + 40), checkpoint=folder, **kw)
    assert folder.latest_meta()["round"] == 1
    resumed = train_classifier(build(), Trap(x, y), checkpoint=folder, **kw).state_dict()
    assert all(torch.equal(plain[k], resumed[k]) for k in plain)


@pytest.mark.skipif(not (datasets.data_dir() / datasets.FASHION_MNIST_FILES["train"][0]).is_file(),
                    reason="dataset-fashion-mnist not installed")
def test_train_backdoor_sigkill_then_resume(tmp_path, capsys):
    args = ["train-backdoor", "--width", "2", "--epochs", "2", "--train-subset", "256", "--batch-size", "64",
            "--no-progress", "--out"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert cli(capsys, args + [ref])[0] == 0
    proc = helper("epoch", args + [str(out)])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, ".resume"]
    rc, err = cli(capsys, args + [out])
    assert rc == 2 and "interrupted run (after epoch 1 of 2)" in err, err
    rc, err = cli(capsys, args + [out, "--resume"])
    assert rc == 0 and "resuming" in err and "after epoch 1 of 2" in err, err
    assert sha(out / "model.safetensors") == sha(ref / "model.safetensors")
    runs = [json.loads((d / "run.json").read_text()) for d in (ref, out)]
    assert comparable(runs[0]) == comparable(runs[1])
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "run.json"]
    rc, err = cli(capsys, args + [out])
    assert rc == 2 and "--overwrite" in err, err
