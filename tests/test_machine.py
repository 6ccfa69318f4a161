"""Machine facts (nft_fast.machine) and the bf16 advice on CPUs without native bf16."""
import warnings

import pytest
import torch

import nft_fast
from nft_fast import machine, models


def test_machine_info_names_what_speed_depends_on():
    info = machine.machine_info()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    assert isinstance(info["cpu_native_bf16"], bool) and info["cpu"]
    line = machine.describe(info)
    assert info["cpu_capability"] in line and f"{info['threads']} threads" in line and torch.__version__ in line
    assert ("no native bf16" in line) is (not info["cpu_native_bf16"])


def _purifier(precision):
    torch.manual_seed(0)
    model = models.build("resnet18", num_classes=4, in_channels=1, width=4, image_size=12)
    nft_fast.attach_masks(model, exclude=("bn1",))
    return nft_fast.Purifier(model, nft_fast.NFTConfig(precision=precision))


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_is_flagged(monkeypatch, native):
    monkeypatch.setattr(machine, "native_bf16_cpu", lambda: native)
    note = machine.cpu_bf16_warning()
    assert (note is None) is native
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _purifier("bf16")
        _purifier("fp32")
    msgs = [str(w.message) for w in seen if "native bf16" in str(w.message)]
    assert msgs == ([] if native else [note])
    if not native:
        assert "slower than fp32" in note and torch.backends.cpu.get_cpu_capability() in note
