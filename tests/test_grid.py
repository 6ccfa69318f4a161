"""The grid's tables: one backdoored model per (attack, seed); several seeds give mean, sd and
the worst model."""
import json

import pytest

from nft_fast.harness import grid


def _row(attack, defense, seed, acc, asr, ra):
    return {"attack": attack, "setting": "1pct", "defense": defense, "seed": seed, "clean_samples": 600,
            "acc": acc, "asr": asr, "ra": ra, "seconds": 1.0, "acc_before": 0.9, "asr_before": 1.0, "ra_before": 0.0}


def test_seed_tables_give_mean_sd_and_worst(tmp_path):
    rows = [_row("badnets", "nft", 0, 0.88, 0.02, 0.85), _row("badnets", "nft", 1, 0.86, 0.10, 0.80),
            _row("badnets", "nft", 2, 0.87, 0.03, 0.90)]
    grid.write_tables(rows, ["nft"], tmp_path, "nft-fast grid ...")
    md = (tmp_path / "grid.md").read_text()
    # ASR: mean 5.00, sample sd 4.36, worst = highest 10.00; ACC: mean 87.00, sd 1.00, worst = lowest 86.00
    assert "| badnets | nft | 3 (0,1,2) | 5.00 | 4.36 | 10.00 | 87.00 | 1.00 | 86.00 | 3.00 | 85.00 | 80.00 |" in md
    assert "87.00 ± 1.00 / 5.00 ± 4.36 / 85.00 ± 5.00" in md
    assert json.loads((tmp_path / "grid.json").read_text()) == rows


def test_one_seed_keeps_the_single_model_table(tmp_path):
    grid.write_tables([_row("blend", "nft", 0, 0.88, 0.02, 0.85)], ["nft"], tmp_path, "cmd")
    md = (tmp_path / "grid.md").read_text()
    assert "| blend | 88.00 / 2.00 / 85.00 |" in md and "worst" not in md


def test_seeds_must_be_distinct(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        grid.run_grid(tmp_path, attacks=["badnets"], seeds=[1, 1])


def test_cli_seeds(monkeypatch, tmp_path):
    from nft_fast.app import cli

    seen = {}
    monkeypatch.setattr(grid, "run_grid", lambda out, **kw: seen.update(kw, out=out) or [])
    assert cli.main(["grid", "--seeds", "0,1,2", "--attacks", "badnets", "--out", str(tmp_path)]) == 0
    assert seen["seeds"] == [0, 1, 2] and seen["attacks"] == ["badnets"]
    assert cli.main(["grid", "--seed", "4", "--out", str(tmp_path)]) == 0 and seen["seeds"] == [4]
    assert cli.main(["grid", "--seeds", "0,x", "--out", str(tmp_path)]) == 2
