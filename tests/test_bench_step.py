"""bench/step.py runs end to end on tiny shapes, sequential and interleaved, and its ratios are
computed from the rows it measured."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def step_mod():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = mod
    spec.loader.exec_module(mod)
    return mod


TINY = ["--workloads", "resnet18_cifar", "--device", "cpu", "--width", "4", "--batch", "4", "--size", "16",
        "--steps", "2", "--warmup", "1", "--variants", "reference,nft_fast[torch],floor"]


@pytest.mark.parametrize("passes", [1, 3])
def test_step_bench_rows_and_ratios(step_mod, tmp_path, passes):
    assert step_mod.main(TINY + ["--passes", str(passes), "--results", str(tmp_path), "--tag", "t"]) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    rows = res["workloads"]["resnet18_cifar"]["rows"]
    assert set(rows) == {"reference", "nft_fast[torch]", "floor"}
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["steps"] == 2 * passes and r["median_ms"] > 0
        assert r["speedup_vs_reference"] == pytest.approx(rows["reference"]["median_ms"] / r["median_ms"])
        assert r["ratio_to_floor"] == pytest.approx(r["median_ms"] / rows["floor"]["median_ms"])
    r, ref, fl = rows["nft_fast[torch]"], rows["reference"], rows["floor"]
    if passes == 1:
        assert "pass_median_ms" not in r
    else:
        assert len(r["pass_median_ms"]) == passes
        assert r["speedup_vs_reference_by_pass"] == pytest.approx(
            [a / b for a, b in zip(ref["pass_median_ms"], r["pass_median_ms"])])
        assert r["ratio_to_floor_by_pass"] == pytest.approx(
            [a / b for a, b in zip(r["pass_median_ms"], fl["pass_median_ms"])])
        md = (tmp_path / "t.md").read_text()
        assert f"{passes} interleaved passes" in md and "vs reference by pass" in md


def test_interleaved_failing_variant_is_an_error_row(step_mod):
    calls = []

    def ok(i):
        calls.append(i)

    def bad(i):
        if i >= 1:  # fails after its warm-up, in the first timed pass
            raise RuntimeError("boom")

    rows = step_mod.measure_interleaved({"a": ok, "b": bad}, steps=2, warmup=1, passes=3,
                                        device=step_mod.torch.device("cpu"))
    assert rows["b"]["error"] == "RuntimeError: boom"
    assert rows["a"]["steps"] == 6 and len(rows["a"]["pass_median_ms"]) == 3
    assert calls == [0, 1, 2, 3, 4, 5, 6]  # warm-up step 0, then fresh step indices in every pass
