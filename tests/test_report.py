"""Report folders: plots need the optional ``report`` extra (matplotlib); without it the
report says so instead of silently dropping them."""
import sys

import numpy as np
import pytest

from nft_fast.app.report import write_report

REPORT = {"before": {"acc": 0.9, "asr": 0.99, "ra": 0.01}, "after": {"acc": 0.88, "asr": 0.02, "ra": 0.85},
          "history": [{"round": 1, "acc": 0.89, "asr": 0.1, "ra": 0.8}]}
MASKS = {"layer1.0.bn1": np.linspace(0.1, 1.0, 8, dtype=np.float32)}


def test_plots_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    files = write_report(tmp_path, REPORT, MASKS, [0.3])
    names = {f.name for f in files}
    assert {"report.json", "report.md", "masks_heatmap.png", "masks_hist.png", "rounds.png"} <= names
    assert all((tmp_path / n).stat().st_size > 0 for n in names)


def test_without_matplotlib_the_report_says_how_to_get_plots(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.warns(UserWarning, match=r"nft_fast\[report\]"):
        files = write_report(tmp_path, REPORT, MASKS, [0.3])
    assert {f.name for f in files} == {"report.json", "report.md"}
    assert not list(tmp_path.glob("*.png"))
    assert 'pip install "nft_fast[report]"' in (tmp_path / "report.md").read_text()
