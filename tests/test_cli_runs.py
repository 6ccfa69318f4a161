"""`train-backdoor` -> `purify --run` -> `evaluate --run` on real Fashion-MNIST (tiny and short)."""
import json

import pytest

from nft_fast.harness import datasets as D
from nft_fast.app.cli import main
from nft_fast.io import load_state_dict

pytestmark = pytest.mark.skipif(not (D.data_dir() / D.FASHION_MNIST_FILES["train"][0]).is_file(),
                                reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["train-backdoor", "--attack", "blend", "--arch", "preactresnet18", "--width", "4", "--epochs", "1",
               "--train-subset", "1500", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_train_backdoor_writes_a_run(run_dir):
    run = json.loads((run_dir / "run.json").read_text())
    assert run["spec"]["attack"] == "blend" and run["attack"]["name"] == "blend"
    assert {"acc", "asr", "ra"} <= run["metrics"].keys() and run["metrics"]["n_poison"] == 9000
    assert load_state_dict(run_dir / "model.safetensors")


def test_purify_and_evaluate_from_a_run(run_dir, tmp_path, capsys):
    out = tmp_path / "purified"
    rc = main(["purify", "--run", str(run_dir), "--per-class", "1", "--steps", "10", "--rounds", "2", "--batch-size",
               "16", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["clean_samples"] == 10 and report["arch"] == "preactresnet18"
    assert len(report["history"]) == 2 and "asr" in report["history"][-1]
    for png in ("masks_heatmap.png", "masks_hist.png", "rounds.png"):
        assert (out / png).stat().st_size > 1000
    capsys.readouterr()
    rc = main(["evaluate", "--run", str(run_dir), "--checkpoint", str(out / "purified.safetensors"), "--json"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["acc"] == pytest.approx(report["after"]["acc"]) and m["asr"] == pytest.approx(report["after"]["asr"])


def test_run_errors(tmp_path):
    assert main(["purify", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["train-backdoor", "--attack", "nosuch", "--train-subset", "100", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    assert main(["train-backdoor", "--arch", "nosuch", "--out", str(tmp_path / "r2")]) == 2
