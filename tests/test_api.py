"""nft_fast as a library: importing it changes no global state, every module's ``__all__``
holds its public names (and only existing ones), the errors share one base, ``py.typed``
ships, and docs/api.md is what docs/gen_api.py writes from the docstrings."""
import importlib
import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nft_fast

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
gen_api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_api)

# Public-looking names a module defines but does not export (helpers of the package itself).
NOT_EXPORTED = {
    "nft_fast.purifier": {"scan_kwargs"},
    "nft_fast.ops": {"cuda_launch"},
}

IMPORTED = ["nft_fast", "nft_fast.ops", "nft_fast.kernels", "nft_fast.harness", "nft_fast.app.cli",
            "nft_fast.harness.attacks", "nft_fast.harness.baselines", "nft_fast.harness.datasets",
            "nft_fast.harness.grid", "nft_fast.harness.runs", "nft_fast.harness.train", "nft_fast.app.demo",
            "nft_fast.app.pipeline", "nft_fast.app.report"] + gen_api.MODULES

# Runs in a fresh interpreter: the global state before and after importing the package.
_PROBE = r"""
import faulthandler, hashlib, importlib, json, logging, os, pickle, random, signal, sys, warnings
import numpy as np
import torch

def snapshot():
    digest = lambda obj: hashlib.sha256(pickle.dumps(obj)).hexdigest()
    return {
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.random.get_rng_state()": digest(torch.random.get_rng_state().numpy().tobytes()),
        "numpy.random.get_state()": digest(np.random.get_state()),
        "random.getstate()": digest(random.getstate()),
        "torch.get_default_dtype()": str(torch.get_default_dtype()),
        "torch.backends.cudnn.benchmark": torch.backends.cudnn.benchmark,
        "torch.backends.cudnn.deterministic": torch.backends.cudnn.deterministic,
        "torch.backends.mkldnn.enabled": torch.backends.mkldnn.enabled,
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
        "torch.is_anomaly_enabled()": torch.is_anomaly_enabled(),
        "torch.cuda.is_initialized()": torch.cuda.is_initialized(),
        "warnings.filters": [repr(f) for f in warnings.filters],
        "logging root level": logging.root.level,
        "logging root handlers": [repr(h) for h in logging.root.handlers],
        "logging.disable": logging.root.manager.disable,
        "os.environ": dict(os.environ),
        "os.getcwd()": os.getcwd(),
        "signal handlers": {int(s): repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)},
        "sys.excepthook": repr(sys.excepthook),
        "sys.getrecursionlimit()": sys.getrecursionlimit(),
        "faulthandler.is_enabled()": faulthandler.is_enabled(),
    }

before = snapshot()
imported = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if name != "nft_fast.kernels" or e.name != "nft_fast.kernels":
            raise
        continue
    imported.append(name)
after = snapshot()
print(json.dumps({"imported": imported, "changed": {k: [before[k], after[k]] for k in before if before[k] != after[k]}}))
"""


def test_import_changes_no_global_state():
    """Threads, RNGs, default dtype, backend flags, warning filters, logging, environment,
    signal handlers...: importing nft_fast and its layers leaves them as they were."""
    out = subprocess.run([sys.executable, "-c", _PROBE, *IMPORTED], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"nft_fast", "nft_fast.app.cli", "nft_fast.harness"} <= set(result["imported"])
    assert result["changed"] == {}


@pytest.mark.parametrize("modname", gen_api.MODULES)
def test_all_lists_existing_public_names(modname):
    module = importlib.import_module(modname)
    names = module.__all__
    assert len(names) == len(set(names)), f"{modname}.__all__ repeats a name"
    assert [n for n in names if not hasattr(module, n)] == []
    assert [n for n in names if n.startswith("_")] == []
    # every public class and function the module defines is exported (or deliberately not)
    defined = [n for n, obj in vars(module).items() if not n.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
               and getattr(obj, "__module__", None) == modname]
    missing = sorted(set(defined) - set(names) - NOT_EXPORTED.get(modname, set()))
    assert missing == [], (f"{modname} defines {missing}: add them to its __all__ (then run python docs/gen_api.py) "
                           "or to NOT_EXPORTED in tests/test_api.py")


def test_errors_share_one_base_and_keep_their_builtin_types():
    from nft_fast import data, errors, io, ops, outdir, resume
    from nft_fast.app.pipeline import UsageError

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.NFTError)
    for name in ("NFTError", "DataError", "CheckpointError", "StateError", "FolderError", "BackendUnavailable"):
        assert getattr(nft_fast, name) is getattr(errors, name)
    # the old homes name the same classes, of the same built-in types as before
    for module, name in ((data, "DataError"), (io, "CheckpointError"), (resume, "StateError"), (resume, "FolderError"),
                         (outdir, "Busy")):
        assert getattr(module, name) is getattr(errors, name)
        assert issubclass(getattr(module, name), ValueError)
    assert ops.BackendUnavailable is errors.BackendUnavailable and issubclass(ops.BackendUnavailable, RuntimeError)
    assert issubclass(UsageError, nft_fast.NFTError) and issubclass(UsageError, ValueError)
    with pytest.raises(nft_fast.DataError) as e:
        data.check_labels(torch.tensor([0, 5]), 3, "labels")
    assert isinstance(e.value, nft_fast.NFTError) and isinstance(e.value, ValueError)


def test_py_typed_ships():
    """PEP 561: the marker is in the package and in its package data (wheels carry it)."""
    assert (Path(nft_fast.__file__).parent / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in cfg["tool"]["setuptools"]["package-data"]["nft_fast"]


def test_api_md_is_current():
    assert gen_api.OUT.read_text() == gen_api.render(), "docs/api.md is stale: run python docs/gen_api.py"


def test_api_md_render_is_deterministic():
    assert gen_api.render() == gen_api.render()
