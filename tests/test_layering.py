"""The package's layers import downwards only: app -> harness -> core (``nft_fast`` itself,
``nft_fast.ops``, ``nft_fast.models``, ``nft_fast.kernels``)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "nft_fast"
LAYERS = {"core": 0, "harness": 1, "app": 2}


def _layer(module: str) -> str:
    parts = module.split(".")
    if module == "nft_fast.__main__":  # `python -m nft_fast` runs the command line
        return "app"
    if parts[0] != "nft_fast":
        return "external"
    return parts[1] if len(parts) > 1 and parts[1] in ("harness", "app") else "core"


def _sources():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        yield ".".join(rel.parts).removesuffix(".__init__"), path, path.name == "__init__.py"
    for path in sorted((ROOT / "kernels").glob("*.py")):  # installed as nft_fast.kernels
        yield "nft_fast.kernels." + path.stem, path, path.name == "__init__.py"


def _imports(module: str, path: Path, is_pkg: bool):
    """Absolute names of the modules ``path`` imports (at any depth: lazy imports count)."""
    package = module if is_pkg else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield target, node.lineno
            for a in node.names:  # `from . import attacks` imports a submodule
                yield f"{target}.{a.name}", node.lineno


def _violations():
    bad = []
    for module, path, is_pkg in _sources():
        mine = _layer(module)
        for target, line in _imports(module, path, is_pkg):
            theirs = _layer(target)
            if theirs != "external" and LAYERS[theirs] > LAYERS[mine]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mine} module {module} imports {theirs} module {target}")
    return bad


def test_imports_point_down_only():
    assert _violations() == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """A core module importing the harness, written the three ways code does it, is caught."""
    pkg = tmp_path / "nft_fast"
    (pkg / "harness").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "harness" / "__init__.py").write_text("from ..app import cli\n")
    (pkg / "core_mod.py").write_text("def f():\n    from .harness import attacks\n")
    (pkg / "other.py").write_text("import nft_fast.app.report\nfrom . import harness\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    found = "\n".join(_violations())
    assert "nft_fast/core_mod.py:2: core module nft_fast.core_mod imports harness module nft_fast.harness.attacks" in found
    assert "nft_fast/harness/__init__.py:1: harness module nft_fast.harness imports app module nft_fast.app.cli" in found
    assert "nft_fast/other.py:1: core module nft_fast.other imports app module nft_fast.app.report" in found
    assert "imports harness module nft_fast.harness\n" in found + "\n"


def test_importing_the_library_loads_neither_harness_nor_app():
    code = ("import sys, nft_fast, nft_fast.models, nft_fast.ops\n"
            "print(sorted(m for m in sys.modules if m.startswith(('nft_fast.harness', 'nft_fast.app'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["NFTConfig", "attach_masks", "mask_parameters", "mask_sites", "MaskSite",
                                  "fold_masks", "Purifier", "PurifyResult", "purify", "evaluate", "set_backend",
                                  "get_backend", "use_backend", "build_info", "reference"])
def test_public_names(name):
    import nft_fast

    assert name in nft_fast.__all__ and getattr(nft_fast, name) is not None
