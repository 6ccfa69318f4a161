"""Merge the baseline grid (docs/grid) with the strong-preset grid (docs/grid_strong) into one
table per setting, written into docs/purification.md between the GRID markers.

    python docs/merge_grids.py
"""
import json
from pathlib import Path

from nft_fast.harness.grid import _table

root = Path(__file__).parent
rows = json.loads((root / "grid" / "grid.json").read_text())
new = json.loads((root / "grid_strong" / "grid.json").read_text())
extra = root / "grid_oneshot" / "grid.json"  # one-shot baselines for the other attacks
if extra.is_file():
    new += [r for r in json.loads(extra.read_text()) if r["defense"] != "none"]
seen = {(r["attack"], r["setting"], r["defense"]) for r in new}
rows = [r for r in rows if (r["attack"], r["setting"], r["defense"]) not in seen] + new
defenses = ["none", "ft", "ft_mixup", "anp", "nft", "nft_strong"]
order = ["badnets", "blend", "trojan", "sig", "wanet", "inputaware"]
rows.sort(key=lambda r: order.index(r["attack"]) if r["attack"] in order else 99)
md = []
for setting, n in (("1pct", 600), ("oneshot", 10)):
    md += [f"### {setting} ({n} clean images)", ""] + _table(rows, defenses, setting) + [""]
text = (root / "purification.md").read_text()
a, b = text.index("<!-- GRID -->"), text.index("<!-- /GRID -->")
(root / "purification.md").write_text(text[:a] + "<!-- GRID -->\n" + "\n".join(md) + text[b:])
